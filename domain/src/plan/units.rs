//! Numbers with units as plans write them: percentages, CPU counts, byte sizes, bit rates.
//!
//! Every conversion is exact: a value that does not land on a whole unit of the stored integer
//! (`0.001%` in basis points, `0.0001` cpus in milli-cpus, `1.5B`) is refused instead of being
//! rounded, the same way durations finer than a millisecond are.
//!
//! | Quantity | Written as | Stored as |
//! |---|---|---|
//! | percentage | `30`, `30%`, `0.5`, `0.01%` | basis points (`30` -> 3000) |
//! | cpus | `2`, `0.5`, `0.001` | milli-cpus (`0.5` -> 500) |
//! | size | `1024`, `512B`, `64k`/`64K`/`64KB`, `64Ki`/`64KiB`, `256M`/`256MB`, `256Mi`/`256MiB`, `1G`/`1GB`, `1Gi`/`1GiB`, `1T`/`1TB`, `1Ti`/`1TiB`, `1.5Gi` | bytes; `k M G T` are powers of 1000, `Ki Mi Gi Ti` powers of 1024 |
//! | rate | `bit kbit mbit gbit tbit` (x1000 bits/s), `kibit mibit gibit tibit` (x1024 bits/s), `bps kbps mbps gbps tbps` (x1000 **bytes**/s), `kibps mibps gibps tibps` (x1024 bytes/s) - as `tc` reads them, any case but `Kbps`/`Mbps`/`Gbps`/`Tbps` (refused as ambiguous) | bits per second |
//!
//! Lower-case `m` and `g` are refused as size units: Docker reads them as MiB and GiB,
//! Kubernetes reads `m` as milli; a plan must say `Mi` or `M`.

/// Why a number was refused; callers word the message with the field's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NumberError {
    /// Not a plain decimal number (`12`, `0.5`).
    Invalid,
    /// A fraction of the smallest stored unit.
    NotWhole,
    /// Too large for the stored integer.
    TooLarge,
}

/// Most significant digits a number may have: keeps `mantissa * multiplier` inside `u128`.
const MAX_DIGITS: usize = 24;

/// `number * multiplier`, exactly: `number` is a plain decimal such as `12` or `0.25`.
pub(crate) fn exact(number: &str, multiplier: u128) -> Result<u128, NumberError> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (number.contains('.') && frac.is_empty())
    {
        return Err(NumberError::Invalid);
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    if int.len() + frac.len() > MAX_DIGITS {
        return Err(NumberError::TooLarge);
    }
    let mut mantissa: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa * 10 + u128::from(b - b'0');
    }
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| NumberError::TooLarge)?);
    let product = mantissa
        .checked_mul(multiplier)
        .ok_or(NumberError::TooLarge)?;
    if product % scale != 0 {
        return Err(NumberError::NotWhole);
    }
    Ok(product / scale)
}

/// `exact`, bounded to `u64`.
fn exact_u64(number: &str, multiplier: u128) -> Result<u64, NumberError> {
    u64::try_from(exact(number, multiplier)?).map_err(|_| NumberError::TooLarge)
}

/// Splits `12.5Mi` into `("12.5", "Mi")`, allowing blanks between number and unit.
fn split_unit(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim_start())
}

/// A percentage (`30`, `30%`, `0.25`) as basis points, in `(0, 100]`.
pub(crate) fn basis_points(text: &str) -> Result<u32, String> {
    let number = text.trim().trim_end_matches('%').trim_end();
    match exact(number, 100) {
        Ok(bp) if (1..=10_000).contains(&bp) => Ok(u32::try_from(bp).unwrap_or(u32::MAX)),
        Ok(_) | Err(NumberError::TooLarge) => Err(format!(
            "must be greater than 0% and at most 100%, got {text}"
        )),
        Err(NumberError::NotWhole) => Err(format!(
            "must have at most two decimals (steps of 0.01%), got {text}"
        )),
        Err(NumberError::Invalid) => Err(format!(
            "must be a percentage such as 30, 2.5 or 0.1%, got {text:?}"
        )),
    }
}

/// A whole percentage (`50`, `50%`) in `1..=100`.
pub(crate) fn whole_percent(text: &str) -> Result<u8, String> {
    let number = text.trim().trim_end_matches('%').trim_end();
    match exact(number, 1) {
        Ok(p) if (1..=100).contains(&p) => Ok(u8::try_from(p).unwrap_or(u8::MAX)),
        Ok(_) | Err(NumberError::TooLarge) => {
            Err(format!("must be between 1% and 100%, got {text}"))
        }
        Err(NumberError::NotWhole) => Err(format!("must be a whole percentage, got {text}")),
        Err(NumberError::Invalid) => Err(format!(
            "must be a whole percentage such as 50 or 50%, got {text:?}"
        )),
    }
}

/// A CPU count (`2`, `0.5`) as milli-cpus, in `1..=max`.
pub(crate) fn millicpus(text: &str, max: u64) -> Result<u64, String> {
    let most = max / 1000;
    match exact_u64(text.trim(), 1000) {
        Ok(milli) if (1..=max).contains(&milli) => Ok(milli),
        Ok(_) | Err(NumberError::TooLarge) => Err(format!(
            "must be greater than 0 and at most {most} cpus, got {text}"
        )),
        Err(NumberError::NotWhole) => Err(format!(
            "must have at most three decimals (steps of 0.001 cpus), got {text}"
        )),
        Err(NumberError::Invalid) => Err(format!(
            "must be a number of cpus such as 2 or 0.5, got {text:?}"
        )),
    }
}

/// Byte multipliers of the size units; case-sensitive.
const SIZE_UNITS: &[(&str, u128)] = &[
    ("", 1),
    ("B", 1),
    ("k", 1_000),
    ("K", 1_000),
    ("kB", 1_000),
    ("KB", 1_000),
    ("Ki", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1_000_000),
    ("MB", 1_000_000),
    ("Mi", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1_000_000_000),
    ("GB", 1_000_000_000),
    ("Gi", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1_000_000_000_000),
    ("TB", 1_000_000_000_000),
    ("Ti", 1 << 40),
    ("TiB", 1 << 40),
];

const SIZE_UNITS_HELP: &str = "use B, K/KB, Ki/KiB, M/MB, Mi/MiB, G/GB, Gi/GiB, T/TB or Ti/TiB \
                               (M is 1000000 bytes, Mi is 1048576)";

/// A size such as `256Mi`, `1G`, `512MiB` or `4096` (bytes), in `1..=u64::MAX` bytes.
pub(crate) fn bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = split_unit(text);
    let Some((_, multiplier)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        let hint = match unit {
            "m" | "mb" | "g" | "gb" | "t" | "tb" => format!(
                "must not use the ambiguous size unit {unit:?}: write {}i (powers of 1024) or \
                 {} (powers of 1000)",
                unit[..1].to_ascii_uppercase(),
                unit[..1].to_ascii_uppercase()
            ),
            _ => format!("must use a known size unit, not {unit:?}: {SIZE_UNITS_HELP}"),
        };
        return Err(hint);
    };
    match exact_u64(number, *multiplier) {
        Ok(0) => Err(format!("must be greater than 0 bytes, got {text}")),
        Ok(bytes) => Ok(bytes),
        Err(NumberError::TooLarge) => Err(format!("must fit in 64 bits, got {text}")),
        Err(NumberError::NotWhole) => Err(format!("must be a whole number of bytes, got {text}")),
        Err(NumberError::Invalid) => Err(format!(
            "must be a size such as 256Mi, 1G or 4096 (bytes), got {text:?}"
        )),
    }
}

/// A byte rate such as `1Mi`, `10MB/s` or `4096`: a size, optionally followed by `/s`.
pub(crate) fn bytes_per_second(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    bytes(trimmed.strip_suffix("/s").unwrap_or(trimmed))
}

/// Bits-per-second multipliers of the rate units, as `tc` reads them (lower-cased).
const RATE_UNITS: &[(&str, u128)] = &[
    ("bit", 1),
    ("kbit", 1_000),
    ("mbit", 1_000_000),
    ("gbit", 1_000_000_000),
    ("tbit", 1_000_000_000_000),
    ("kibit", 1 << 10),
    ("mibit", 1 << 20),
    ("gibit", 1 << 30),
    ("tibit", 1 << 40),
    ("bps", 8),
    ("kbps", 8_000),
    ("mbps", 8_000_000),
    ("gbps", 8_000_000_000),
    ("tbps", 8_000_000_000_000),
    ("kibps", 8 << 10),
    ("mibps", 8 << 20),
    ("gibps", 8 << 30),
    ("tibps", 8 << 40),
];

/// A bandwidth such as `1mbit` or `500kbit` as bits per second, in `1..=u64::MAX`.
///
/// Units follow `tc`: `bit`, `kbit`, `mbit`, `gbit`, `tbit` are bits per second (powers of
/// 1000; `kibit`... powers of 1024) and `bps`, `kbps`, `mbps`, `gbps`, `tbps` are **bytes**
/// per second. Case does not matter, except that `Kbps`, `Mbps`, `Gbps` and `Tbps` are
/// refused: people write them for bits, `tc` reads them as bytes. A unit is required.
pub(crate) fn bits_per_second(text: &str) -> Result<u64, String> {
    let (number, unit) = split_unit(text);
    let lower = unit.to_ascii_lowercase();
    if lower.is_empty() {
        return Err(format!(
            "must have a unit, such as 1mbit or 500kbit (bits per second) or 1mbps (bytes per \
             second), got {text:?}"
        ));
    }
    if matches!(unit, "Kbps" | "Mbps" | "Gbps" | "Tbps") {
        return Err(format!(
            "must not use {unit:?}: tc reads it as {}bytes per second, but it usually means \
             bits; write {number}{}bit for bits or {number}{} for bytes per second",
            match unit {
                "Kbps" => "kilo",
                "Mbps" => "mega",
                "Gbps" => "giga",
                _ => "tera",
            },
            lower.trim_end_matches("bps"),
            lower
        ));
    }
    let Some((_, multiplier)) = RATE_UNITS.iter().find(|(name, _)| *name == lower) else {
        return Err(format!(
            "must use a known rate unit, not {unit:?}: bit, kbit, mbit, gbit, tbit (bits per \
             second) or bps, kbps, mbps, gbps, tbps (bytes per second); kibit, mibps... for \
             powers of 1024"
        ));
    };
    match exact_u64(number, *multiplier) {
        Ok(0) => Err(format!("must be greater than 0, got {text}")),
        Ok(rate) => Ok(rate),
        Err(NumberError::TooLarge) => Err(format!("must fit in 64 bits, got {text}")),
        Err(NumberError::NotWhole) => Err(format!(
            "must be a whole number of bits per second, got {text}"
        )),
        Err(NumberError::Invalid) => Err(format!(
            "must be a rate such as 1mbit or 500kbit, got {text:?}"
        )),
    }
}

/// A plain whole number in `min..=max`.
pub(crate) fn whole(text: &str, (min, max): (u64, u64)) -> Result<u64, String> {
    match exact_u64(text.trim(), 1) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumberError::TooLarge) => {
            Err(format!("must be between {min} and {max}, got {text}"))
        }
        Err(NumberError::NotWhole | NumberError::Invalid) => Err(format!(
            "must be a whole number between {min} and {max}, got {text:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_scales_decimals_without_rounding() {
        assert_eq!(exact("12", 1), Ok(12));
        assert_eq!(exact("0.5", 1000), Ok(500));
        assert_eq!(exact("0.250", 100), Ok(25));
        assert_eq!(exact("007", 1), Ok(7));
        assert_eq!(exact("0.001", 100), Err(NumberError::NotWhole));
        for bad in [
            "", ".", "1.", ".5", "-1", "+1", "1e3", "1,5", " 1", "1.2.3", "x",
        ] {
            assert_eq!(exact(bad, 1), Err(NumberError::Invalid), "{bad:?}");
        }
        assert_eq!(exact(&"9".repeat(25), 1), Err(NumberError::TooLarge));
        assert_eq!(exact(&format!("{}1", "0".repeat(40)), 1), Ok(1));
    }

    #[test]
    fn percentages_become_basis_points() {
        let good: &[(&str, u32)] = &[
            ("30", 3000),
            ("30%", 3000),
            ("30 %", 3000),
            ("0.01", 1),
            ("2.5", 250),
            ("100", 10_000),
            ("100.00%", 10_000),
        ];
        for (text, bp) in good {
            assert_eq!(basis_points(text), Ok(*bp), "{text}");
        }
        for (text, fragment) in [
            ("0", "greater than 0%"),
            ("100.01", "at most 100%"),
            ("1000000000000000000000000", "at most 100%"),
            ("0.005", "two decimals"),
            ("abc", "must be a percentage"),
            ("-5", "must be a percentage"),
            ("", "must be a percentage"),
        ] {
            let err = basis_points(text).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
        }
        assert_eq!(whole_percent("90%"), Ok(90));
        assert_eq!(whole_percent("1"), Ok(1));
        assert!(
            whole_percent("0")
                .unwrap_err()
                .contains("between 1% and 100%")
        );
        assert!(
            whole_percent("101%")
                .unwrap_err()
                .contains("between 1% and 100%")
        );
        assert!(
            whole_percent("50.5")
                .unwrap_err()
                .contains("whole percentage")
        );
    }

    #[test]
    fn cpus_become_millicpus() {
        assert_eq!(millicpus("0.1", 1_024_000), Ok(100));
        assert_eq!(millicpus("2", 1_024_000), Ok(2000));
        assert_eq!(millicpus("0.001", 1_024_000), Ok(1));
        assert_eq!(millicpus("1024", 1_024_000), Ok(1_024_000));
        assert!(
            millicpus("0", 1_024_000)
                .unwrap_err()
                .contains("greater than 0")
        );
        assert!(
            millicpus("1025", 1_024_000)
                .unwrap_err()
                .contains("at most 1024 cpus")
        );
        assert!(
            millicpus("0.0005", 1_024_000)
                .unwrap_err()
                .contains("three decimals")
        );
        assert!(
            millicpus("half", 1_024_000)
                .unwrap_err()
                .contains("number of cpus")
        );
    }

    #[test]
    fn sizes_use_si_and_binary_units() {
        let good: &[(&str, u64)] = &[
            ("4096", 4096),
            ("512B", 512),
            ("1k", 1000),
            ("1K", 1000),
            ("1KB", 1000),
            ("1Ki", 1024),
            ("256Mi", 256 << 20),
            ("512MiB", 512 << 20),
            ("256M", 256_000_000),
            ("1G", 1_000_000_000),
            ("1GB", 1_000_000_000),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("2 Ti", 2 << 40),
            ("1T", 1_000_000_000_000),
        ];
        for (text, expected) in good {
            assert_eq!(bytes(text), Ok(*expected), "{text}");
        }
        for (text, fragment) in [
            ("0", "greater than 0 bytes"),
            ("0Mi", "greater than 0 bytes"),
            ("512m", "ambiguous size unit \"m\": write Mi"),
            ("1g", "ambiguous size unit \"g\""),
            ("1 parsec", "known size unit, not \"parsec\""),
            ("1.5B", "whole number of bytes"),
            ("99999999999Ti", "fit in 64 bits"),
            ("Mi", "must be a size"),
            ("1.Mi", "must be a size"),
        ] {
            let err = bytes(text).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
        }
        assert_eq!(bytes_per_second("1Mi/s"), Ok(1 << 20));
        assert_eq!(bytes_per_second("1Mi"), Ok(1 << 20));
        assert_eq!(bytes_per_second("10MB/s"), Ok(10_000_000));
    }

    #[test]
    fn rates_read_like_tc() {
        let good: &[(&str, u64)] = &[
            ("1mbit", 1_000_000),
            ("500kbit", 500_000),
            ("1Mbit", 1_000_000),
            ("1.5gbit", 1_500_000_000),
            ("100bit", 100),
            ("1mibit", 1 << 20),
            ("10mbps", 80_000_000),
            ("1kbps", 8000),
            ("1bps", 8),
            ("2 KiBps", 16 << 10),
            ("10MBps", 80_000_000),
            ("10MBit", 10_000_000),
        ];
        for (text, expected) in good {
            assert_eq!(bits_per_second(text), Ok(*expected), "{text}");
        }
        for (text, fragment) in [
            ("100", "must have a unit"),
            ("0mbit", "greater than 0"),
            ("1 furlong", "known rate unit, not \"furlong\""),
            ("0.5bit", "whole number of bits"),
            ("fast", "known rate unit"),
            ("mbit", "must be a rate"),
            (
                "10Mbps",
                "write 10mbit for bits or 10mbps for bytes per second",
            ),
            ("1Gbps", "gigabytes per second"),
        ] {
            let err = bits_per_second(text).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
        }
    }

    #[test]
    fn whole_numbers_are_bounded() {
        assert_eq!(whole("4", (1, 256)), Ok(4));
        assert!(
            whole("0", (1, 256))
                .unwrap_err()
                .contains("between 1 and 256, got 0")
        );
        assert!(whole("1.5", (1, 256)).unwrap_err().contains("whole number"));
        assert!(whole("-1", (1, 256)).unwrap_err().contains("whole number"));
    }
}
