//! The order model and the validation of what clients send.

use serde::{Deserialize, Serialize};

/// Longest accepted ticker symbol.
pub const SYMBOL_MAX_LEN: usize = 12;
/// Smallest accepted quantity.
pub const QTY_MIN: i64 = 1;
/// Largest accepted quantity.
pub const QTY_MAX: i64 = 1_000_000;

/// An order as stored and as returned to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub symbol: String,
    pub qty: i32,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// A validated order request: only these can reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub symbol: String,
    pub qty: i32,
}

/// The body of `POST /orders`, before validation. `qty` is wide so that out-of-range numbers
/// get a range error rather than a parse error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrder {
    symbol: String,
    qty: i64,
}

/// Why an order request was refused; the message goes back to the client verbatim.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("invalid JSON body: {0} (expected {{\"symbol\":\"ACME\",\"qty\":1}})")]
    Json(String),
    #[error("symbol must be 1-{SYMBOL_MAX_LEN} uppercase letters or digits, got {0:?}")]
    Symbol(String),
    #[error("qty must be an integer in {QTY_MIN}..={QTY_MAX}, got {0}")]
    Qty(i64),
}

impl NewOrder {
    /// Parses and validates a request body.
    pub fn from_json(body: &[u8]) -> Result<NewOrder, ValidationError> {
        let raw: RawOrder =
            serde_json::from_slice(body).map_err(|e| ValidationError::Json(e.to_string()))?;
        NewOrder::new(raw.symbol, raw.qty)
    }

    /// Validates a symbol and a quantity.
    pub fn new(symbol: String, qty: i64) -> Result<NewOrder, ValidationError> {
        if !valid_symbol(&symbol) {
            return Err(ValidationError::Symbol(symbol));
        }
        if !(QTY_MIN..=QTY_MAX).contains(&qty) {
            return Err(ValidationError::Qty(qty));
        }
        // In range, so it fits: the column is an INTEGER.
        let qty = i32::try_from(qty).map_err(|_| ValidationError::Qty(qty))?;
        Ok(NewOrder { symbol, qty })
    }
}

/// 1 to [`SYMBOL_MAX_LEN`] characters of `A-Z0-9`.
pub fn valid_symbol(symbol: &str) -> bool {
    (1..=SYMBOL_MAX_LEN).contains(&symbol.len())
        && symbol
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Parses the `{id}` path segment; anything that is not a positive integer names no order.
pub fn parse_id(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_orders() {
        assert_eq!(
            NewOrder::from_json(br#"{"symbol":"ACME","qty":1}"#),
            Ok(NewOrder {
                symbol: "ACME".into(),
                qty: 1
            })
        );
        assert!(NewOrder::from_json(br#"{"symbol":"A1B2C3D4E5F6","qty":1000000}"#).is_ok());
        assert!(NewOrder::from_json(br#"{"symbol":"9","qty":42}"#).is_ok());
    }

    #[test]
    fn rejects_bad_symbols() {
        for symbol in [
            "",
            "acme",
            "AC ME",
            "ACME-1",
            "ABCDEFGHIJKLM",
            "ÄCME",
            "AC\u{0}",
        ] {
            assert_eq!(
                NewOrder::new(symbol.to_string(), 1),
                Err(ValidationError::Symbol(symbol.to_string())),
                "{symbol:?}"
            );
        }
    }

    #[test]
    fn rejects_bad_quantities() {
        for qty in [0, -1, 1_000_001, i64::MAX, i64::MIN] {
            assert_eq!(
                NewOrder::new("ACME".into(), qty),
                Err(ValidationError::Qty(qty))
            );
        }
    }

    #[test]
    fn rejects_malformed_bodies_with_a_clear_message() {
        for body in [
            &b""[..],
            b"not json",
            br#"{"symbol":"ACME"}"#,
            br#"{"qty":1}"#,
            br#"{"symbol":"ACME","qty":"1"}"#,
            br#"{"symbol":"ACME","qty":1.5}"#,
            br#"{"symbol":"ACME","qty":1,"side":"buy"}"#,
            br#"[1,2]"#,
        ] {
            let err = NewOrder::from_json(body).err();
            assert!(
                matches!(err, Some(ValidationError::Json(_))),
                "{:?} -> {err:?}",
                String::from_utf8_lossy(body)
            );
            let message = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains("invalid JSON body"), "{message}");
        }
    }

    #[test]
    fn parses_ids() {
        assert_eq!(parse_id("17"), Some(17));
        assert_eq!(parse_id("0"), None);
        assert_eq!(parse_id("-3"), None);
        assert_eq!(parse_id("abc"), None);
        assert_eq!(parse_id("99999999999999999999"), None);
    }
}
