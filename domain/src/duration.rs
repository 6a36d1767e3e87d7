//! Human-readable durations (`3s`, `500ms`, `1m 30s`) as written in plans and shown in reports.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text is not a humantime duration (no unit, unknown unit, overflow, ...).
    #[error("invalid duration {text:?}: {reason}")]
    Invalid {
        /// The text as written.
        text: String,
        /// What the duration parser objected to.
        reason: String,
    },
    /// The duration is not a whole number of milliseconds.
    #[error("invalid duration {text:?}: finer than a millisecond; use whole milliseconds")]
    SubMillisecond {
        /// The text as written.
        text: String,
    },
}

/// Parses a humantime duration such as `3s`, `500ms` or `1m 30s`.
///
/// Sub-millisecond precision is refused: agents schedule reverts with millisecond timers, so
/// `1500us` would silently become something else.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let parsed = humantime::parse_duration(text.trim()).map_err(|err| DurationError::Invalid {
        text: text.to_string(),
        reason: err.to_string(),
    })?;
    if parsed.subsec_nanos() % 1_000_000 != 0 {
        return Err(DurationError::SubMillisecond {
            text: text.to_string(),
        });
    }
    Ok(parsed)
}

/// Formats a duration the way plans write it, e.g. `1m 30s`; the inverse of [`parse_duration`].
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_strings() {
        let cases: &[(&str, Duration)] = &[
            ("3s", Duration::from_secs(3)),
            ("500ms", Duration::from_millis(500)),
            ("1m 30s", Duration::from_secs(90)),
            (" 2h ", Duration::from_secs(7200)),
            ("0s", Duration::ZERO),
            ("1s 5ms", Duration::from_millis(1005)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text).unwrap(), *expected, "{text}");
        }
    }

    #[test]
    fn refuses_garbage_and_sub_millisecond_values() {
        for text in ["", "3", "3x", "-1s", "s", "1 fortnight"] {
            let err = parse_duration(text).unwrap_err();
            assert!(
                matches!(err, DurationError::Invalid { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().starts_with("invalid duration"), "{err}");
        }
        for text in ["1500us", "1ms 1ns", "10ns"] {
            let err = parse_duration(text).unwrap_err();
            assert_eq!(
                err,
                DurationError::SubMillisecond {
                    text: text.to_string()
                }
            );
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["3s", "500ms", "1m 30s", "1h 5m"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
