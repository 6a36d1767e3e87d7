//! `load:`: an optional built-in HTTP load generator, so that the baseline, the faults and the
//! recovery all see the same traffic.
//!
//! ```yaml
//! load:
//!   url: http://10.0.0.7:8080/checkout   # http:// or https://
//!   rate: 50/s                # requests started per second (or /m, /h); at most 1000/s
//!   method: POST              # GET HEAD POST PUT PATCH DELETE OPTIONS; default GET
//!   headers: { Content-Type: application/json }
//!   body: '{"item": 1}'
//!   timeout: 2s               # per request (default 2s, 1ms..=1m)
//!   expect_status: 200-399    # what counts as success (default 200-399; `2xx`, `204`)
//!   max_in_flight: 64         # cap on concurrent requests (default 64, 1..=1024)
//! ```
//!
//! The load is open-loop: requests start on a fixed schedule (the `n`th at `n / rate` after the
//! start), never waiting for earlier ones, so a slow system sees the same arrival rate as a
//! fast one. A request due while `max_in_flight` are outstanding is not sent and counts as
//! dropped (an error). It runs from the start of the baseline until the recovery check ends
//! (without `steady_state`: while the stages run); the coordinator records its figures.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use serde_saphyr::Spanned;

use super::{Checker, child, units};
use crate::probe::{ProbeKind, ProbeSpec, StatusMatch};

/// Most requests per second a plan may ask for.
pub const MAX_LOAD_PER_SEC: u64 = 1000;
/// Concurrency cap when a plan sets none.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// Highest concurrency cap.
pub const MAX_IN_FLIGHT: u32 = 1024;
/// Per-request time-out when a plan sets none.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest per-request time-out.
pub const MAX_LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// `load:` of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadSpec {
    pub url: String,
    /// Upper case.
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub rate: LoadRate,
    pub timeout: Duration,
    #[serde(serialize_with = "display")]
    pub expect_status: StatusMatch,
    pub max_in_flight: u32,
}

fn display<S: Serializer>(value: &StatusMatch, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// `requests` every `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LoadRate {
    pub requests: u32,
    /// One second, minute or hour.
    pub per: Duration,
}

impl LoadRate {
    /// Reads `50/s`, `600/m` (or `/min`), `10/h`.
    pub fn parse(text: &str) -> Result<LoadRate, String> {
        let bad = || {
            format!("rate must be a count per second, minute or hour such as 50/s, got {text:?}")
        };
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let max = MAX_LOAD_PER_SEC * per.as_secs();
        let requests = units::whole(count.trim(), (1, max))
            .map_err(|message| format!("rate {message} (at most {MAX_LOAD_PER_SEC}/s)"))?;
        Ok(LoadRate {
            requests: u32::try_from(requests).map_err(|_| bad())?,
            per,
        })
    }

    /// Requests per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.requests) / self.per.as_secs_f64()
    }

    /// When request `n` (from 0) is due, after the start: `n * per / requests`, exactly.
    pub fn offset(&self, n: u64) -> Duration {
        let nanos = self.per.as_nanos() * u128::from(n) / u128::from(self.requests.max(1));
        let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, u32::try_from(nanos % 1_000_000_000).unwrap_or(0))
    }

    /// How many requests are due `elapsed` after the start (request 0 is due at once).
    pub fn due(&self, elapsed: Duration) -> u64 {
        let due = elapsed.as_nanos() * u128::from(self.requests) / self.per.as_nanos().max(1) + 1;
        u64::try_from(due).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for LoadRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.requests)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLoad {
    url: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    headers: Option<Spanned<BTreeMap<String, String>>>,
    body: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    expect_status: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<String>>,
}

impl Checker {
    /// `load:`; `Some(None)` when absent.
    pub(super) fn load(&mut self, raw: Option<&Spanned<RawLoad>>) -> Option<Option<LoadSpec>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let at = &raw.referenced;
        let load = &raw.value;
        let path = "load";
        let url = self.required(&load.url, at, path, "url");
        let rate = self.needed(&load.rate, at, path, "rate", LoadRate::parse);
        let method = load.method.as_ref().map_or_else(
            || "GET".to_string(),
            |m| m.value.trim().to_ascii_uppercase(),
        );
        let headers = load
            .headers
            .as_ref()
            .map(|h| h.value.clone())
            .unwrap_or_default();
        let timeout = match &load.timeout {
            None => Some(DEFAULT_LOAD_TIMEOUT),
            Some(timeout) => self.duration(
                timeout,
                &child(path, "timeout"),
                (Duration::from_millis(1), MAX_LOAD_TIMEOUT),
                "between 1ms and 1m",
            ),
        };
        let expect_status = self.with_default(
            &load.expect_status,
            &child(path, "expect_status"),
            StatusMatch::default(),
            StatusMatch::parse,
        );
        let max_in_flight = self.with_default(
            &load.max_in_flight,
            &child(path, "max_in_flight"),
            DEFAULT_MAX_IN_FLIGHT,
            |text| {
                units::whole(text, (1, u64::from(MAX_IN_FLIGHT)))
                    .map(|n| u32::try_from(n).unwrap_or(MAX_IN_FLIGHT))
                    .map_err(|message| format!("max_in_flight {message}"))
            },
        );
        // The HTTP rules are a probe's: check them as one, and report each problem at the
        // field it is about.
        let url = url?;
        let spec = ProbeSpec::new(
            "load",
            ProbeKind::Http {
                url: url.value.clone(),
                method: method.clone(),
                headers: headers.clone(),
                body: load.body.as_ref().map(|b| b.value.clone()),
                expect_status: expect_status.clone().unwrap_or_default(),
                max_latency: None,
                body_contains: None,
            },
        );
        let mut valid = true;
        if let Err(error) = spec.validate() {
            for problem in error.problems {
                valid = false;
                let (field, location) = if problem.starts_with("url") {
                    ("url", &url.referenced)
                } else if let (true, Some(method)) = (problem.starts_with("method"), &load.method) {
                    ("method", &method.referenced)
                } else if let (true, Some(headers)) = (problem.starts_with("header"), &load.headers)
                {
                    ("headers", &headers.referenced)
                } else if let (true, Some(status)) =
                    (problem.starts_with("expect_status"), &load.expect_status)
                {
                    ("expect_status", &status.referenced)
                } else {
                    ("url", at)
                };
                self.report(location, &child(path, field), problem);
            }
        }
        if !valid {
            return None;
        }
        Some(Some(LoadSpec {
            url: url.value.clone(),
            method,
            headers,
            body: load.body.as_ref().map(|b| b.value.clone()),
            rate: rate?,
            timeout: timeout?,
            expect_status: expect_status?,
            max_in_flight: max_in_flight?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_schedule_exactly() {
        let fifty = LoadRate::parse("50/s").unwrap();
        assert_eq!(fifty.to_string(), "50/s");
        assert_eq!(fifty.per_second(), 50.0);
        assert_eq!(fifty.offset(0), Duration::ZERO);
        assert_eq!(fifty.offset(1), Duration::from_millis(20));
        assert_eq!(fifty.offset(50), Duration::from_secs(1));
        assert_eq!(fifty.due(Duration::ZERO), 1);
        assert_eq!(fifty.due(Duration::from_millis(19)), 1);
        assert_eq!(fifty.due(Duration::from_millis(20)), 2);
        assert_eq!(fifty.due(Duration::from_secs(1)), 51);

        let thirds = LoadRate::parse("3/s").unwrap();
        assert_eq!(thirds.offset(1), Duration::new(0, 333_333_333));
        assert_eq!(thirds.offset(3), Duration::from_secs(1));

        let per_minute = LoadRate::parse(" 90 / min").unwrap();
        assert_eq!(per_minute.per, Duration::from_secs(60));
        assert_eq!(per_minute.to_string(), "90/m");
        assert_eq!(per_minute.per_second(), 1.5);
        assert_eq!(LoadRate::parse("10/h").unwrap().to_string(), "10/h");

        for bad in ["50", "50/d", "0/s", "1001/s", "-1/s", "x/s", "60001/m"] {
            assert!(LoadRate::parse(bad).is_err(), "{bad}");
        }
        assert!(LoadRate::parse("1000/s").is_ok());
        assert!(LoadRate::parse("60000/m").is_ok());
    }
}
