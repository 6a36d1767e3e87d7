//! `${NAME}` variables: declared with defaults under a top-level `vars:` mapping, overridden
//! by the caller (`--var NAME=VALUE`), substituted in the plan's text before it is read.
//!
//! Substitution works line by line and never adds or removes a line, so a later error still
//! names the line it was written on; [`Seg`]s map its column back to the text as written (a
//! column inside a substituted value points at its `${`). Lines that are only a comment and the
//! `vars:` block itself are left alone. `$${` stands for a literal `${`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{PlanError, position, read_raw};

/// Longest variable name.
pub const MAX_VAR_NAME_LEN: usize = 64;
/// Longest variable value.
pub const MAX_VAR_VALUE_LEN: usize = 4096;

/// `[A-Za-z_][A-Za-z0-9_]{0,63}`.
pub(super) fn is_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_VAR_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why a value cannot be a variable's value, if it cannot.
pub(super) fn value_problem(value: &str) -> Option<String> {
    if value.len() > MAX_VAR_VALUE_LEN {
        Some(format!(
            "a variable's value is at most {MAX_VAR_VALUE_LEN} bytes"
        ))
    } else if value.chars().any(|c| c.is_control() && c != '\t') {
        Some("a variable's value must be a single line without control characters".into())
    } else {
        None
    }
}

/// Whether a line holds nothing but a comment.
pub(super) fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// The `vars:` of a plan: the lines of its block and its values.
#[derive(Debug, Default)]
pub(super) struct Declared {
    /// 0-based line range of the block, `vars:` line included.
    pub lines: std::ops::Range<usize>,
    pub values: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct RawVarsDoc {
    vars: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

/// Finds and reads the top-level `vars:` block. It is found by text, not by reading the whole
/// document, because the rest may not be valid YAML before substitution (`{ url: ${URL} }`):
/// it starts at a line `vars:` at column 1 and runs until the next line that starts at column
/// 1 with anything but a comment.
pub(super) fn declared(lines: &[&str]) -> Result<Declared, Vec<PlanError>> {
    let Some(start) = lines.iter().position(|line| line.starts_with("vars:")) else {
        return Ok(Declared::default());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|line| {
            line.chars()
                .next()
                .is_some_and(|c| !c.is_whitespace() && c != '#')
        })
        .map_or(lines.len(), |offset| start + 1 + offset);
    // Blank lines in front keep the block's positions those of the plan.
    let mut text = "\n".repeat(start);
    for line in &lines[start..end] {
        text.push_str(line);
        text.push('\n');
    }
    let raw = read_raw::<RawVarsDoc>(&text).map_err(|error| vec![error])?;
    let mut declared = Declared {
        lines: start..end,
        values: BTreeMap::new(),
    };
    let Some(vars) = raw.and_then(|doc| doc.value.vars) else {
        return Ok(declared);
    };
    let mut errors = Vec::new();
    for (name, value) in vars.value {
        let (line, column) = position(&value.referenced);
        let mut problem = |message: String| {
            errors.push(PlanError {
                line,
                column,
                field: format!("vars.{name}"),
                message,
                file: None,
            });
        };
        if !is_var_name(&name) {
            problem(format!(
                "invalid variable name {name:?}: use 1 to {MAX_VAR_NAME_LEN} of A-Z, a-z, 0-9 \
                 and _, not starting with a digit"
            ));
        } else if let Some(message) = value_problem(&value.value) {
            problem(message);
        } else if value.value.contains("${") {
            problem("a variable's value cannot refer to variables".into());
        } else {
            declared.values.insert(name, value.value);
        }
    }
    if errors.is_empty() {
        Ok(declared)
    } else {
        Err(errors)
    }
}

/// Columns `new_start..new_start + new_len` of a substituted line stand for
/// `old_start..old_start + old_len` of the line as written (0-based, in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seg {
    new_start: u32,
    new_len: u32,
    old_start: u32,
    old_len: u32,
}

/// The 1-based column as written of 1-based `column` of a substituted line.
pub(super) fn original_column(segs: &[Seg], column: u32) -> u32 {
    if column == 0 {
        return 0;
    }
    let at = i64::from(column - 1);
    let mut shift = 0i64;
    for seg in segs {
        let (new_start, new_end) = (
            i64::from(seg.new_start),
            i64::from(seg.new_start + seg.new_len),
        );
        if at < new_start {
            break;
        }
        if at < new_end {
            return seg.old_start + 1;
        }
        shift = i64::from(seg.old_start + seg.old_len) - new_end;
    }
    u32::try_from(at + shift + 1).unwrap_or(column)
}

/// A substituted line, how its columns map back, and the problems found (1-based column of the
/// `$`, message).
#[derive(Debug, Default)]
pub(super) struct Substituted {
    pub text: String,
    pub segs: Vec<Seg>,
    pub problems: Vec<(u32, String)>,
}

/// Replaces every `${NAME}` of `line` with its value and every `$${` with `${`, recording the
/// names used.
pub(super) fn substitute(
    line: &str,
    values: &BTreeMap<String, String>,
    used: &mut BTreeSet<String>,
) -> Substituted {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Substituted::default();
    let mut written = 0u32;
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let mut i = 0;
    while i < chars.len() {
        let next = |k: usize| chars.get(i + k).copied();
        if chars[i] == '$' && next(1) == Some('$') && next(2) == Some('{') {
            out.segs.push(Seg {
                new_start: written,
                new_len: 2,
                old_start: clamp(i),
                old_len: 3,
            });
            out.text.push_str("${");
            written += 2;
            i += 3;
            continue;
        }
        if chars[i] != '$' || next(1) != Some('{') {
            out.text.push(chars[i]);
            written += 1;
            i += 1;
            continue;
        }
        let column = clamp(i + 1);
        let close = chars[i + 2..].iter().position(|c| *c == '}');
        let name: Option<String> = close.map(|len| chars[i + 2..i + 2 + len].iter().collect());
        match (close, name) {
            (Some(len), Some(name)) if is_var_name(&name) => {
                let old_len = clamp(len + 3);
                match values.get(&name) {
                    Some(value) => {
                        let new_len = clamp(value.chars().count());
                        out.segs.push(Seg {
                            new_start: written,
                            new_len,
                            old_start: clamp(i),
                            old_len,
                        });
                        out.text.push_str(value);
                        written += new_len;
                    }
                    None => out.problems.push((
                        column,
                        format!(
                            "unknown variable ${{{name}}}: declare it under `vars:` or pass \
                             --var {name}=VALUE"
                        ),
                    )),
                }
                used.insert(name);
                i += len + 3;
            }
            _ => {
                out.problems.push((
                    column,
                    "invalid variable reference: write ${NAME} (A-Z, a-z, 0-9, _), or $${ for \
                     a literal ${"
                        .to_string(),
                ));
                // Keep the text, so that the rest of the line is still checked.
                out.text.push_str("${");
                written += 2;
                i += 2;
            }
        }
    }
    out
}

/// The text that [`substitute`] turns back into `substituted`: every `${` written `$${`.
pub(super) fn escape(substituted: &str) -> String {
    substituted.replace("${", "$${")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        [("HOST", "10.0.0.7"), ("PORT", "8080"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn substitution_table() {
        type Case = (&'static str, &'static str, Result<&'static str, Vec<u32>>);
        let cases: Vec<Case> = vec![
            ("no variables", "title: t", Ok("title: t")),
            (
                "two variables",
                "url: http://${HOST}:${PORT}/",
                Ok("url: http://10.0.0.7:8080/"),
            ),
            ("empty value", "a${EMPTY}b", Ok("ab")),
            ("escaped", "text: $${HOST}", Ok("text: ${HOST}")),
            ("escaped after a dollar", "$$${HOST}", Ok("$${HOST}")),
            ("a lone dollar", "cost: $5 and $", Ok("cost: $5 and $")),
            ("unknown", "x: ${NOPE} ${HOST}", Err(vec![4])),
            ("unterminated", "x: ${HOST", Err(vec![4])),
            ("bad name", "x: ${1A} y: ${A-B}", Err(vec![4, 13])),
            ("non-ascii before", "é: ${NOPE}", Err(vec![4])),
        ];
        for (name, line, expected) in cases {
            let mut used = BTreeSet::new();
            let out = substitute(line, &values(), &mut used);
            match expected {
                Ok(text) => {
                    assert_eq!(out.text, text, "{name}");
                    assert!(out.problems.is_empty(), "{name}: {:?}", out.problems);
                    // What escape writes substitutes back to the same text.
                    let again = substitute(&escape(&out.text), &values(), &mut used);
                    assert_eq!(again.text, out.text, "{name}: round trip");
                    assert!(again.problems.is_empty(), "{name}");
                }
                Err(columns) => {
                    let got: Vec<u32> = out.problems.iter().map(|(c, _)| *c).collect();
                    assert_eq!(got, columns, "{name}: {:?}", out.problems);
                }
            }
        }
        let mut used = BTreeSet::new();
        substitute("${HOST} ${NOPE} ${HOST}", &values(), &mut used);
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            ["HOST".to_string(), "NOPE".to_string()]
        );
    }

    #[test]
    fn columns_map_back_to_the_text_as_written() {
        let line = "a: ${HOST} b: $${x} c: ${PORT}!";
        let out = substitute(line, &values(), &mut BTreeSet::new());
        assert_eq!(out.text, "a: 10.0.0.7 b: ${x} c: 8080!");
        let find = |s: &str, needle: &str| u32::try_from(s.find(needle).unwrap() + 1).unwrap();
        // Before any substitution: unchanged.
        assert_eq!(original_column(&out.segs, 1), 1);
        // Inside a value: the `${` of its reference.
        assert_eq!(original_column(&out.segs, 6), find(line, "${HOST}"));
        // After values and escapes: shifted back.
        assert_eq!(
            original_column(&out.segs, find(&out.text, "b:")),
            find(line, "b:")
        );
        assert_eq!(
            original_column(&out.segs, find(&out.text, "c:")),
            find(line, "c:")
        );
        assert_eq!(
            original_column(&out.segs, find(&out.text, "!")),
            find(line, "!")
        );
        assert_eq!(original_column(&[], 7), 7);
        assert_eq!(original_column(&out.segs, 0), 0);
    }

    #[test]
    fn names_and_values() {
        for good in ["A", "_x", "HOST_1", &"a".repeat(64)] {
            assert!(is_var_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "é", &"a".repeat(65)] {
            assert!(!is_var_name(bad), "{bad}");
        }
        assert_eq!(value_problem("ok value\twith tab"), None);
        assert!(value_problem("two\nlines").is_some());
    }

    #[test]
    fn the_vars_block_is_found_by_text() {
        let text = "apiVersion: faultline/v1\nvars:\n  # comment\n  HOST: 10.0.0.7\n  PORT: 8080\n\
                    title: t ${HOST}\n";
        let lines: Vec<&str> = text.split('\n').collect();
        let declared = declared(&lines).unwrap();
        assert_eq!(declared.lines, 1..5);
        assert_eq!(declared.values["PORT"], "8080");
        assert_eq!(declared.values["HOST"], "10.0.0.7");

        let flow = ["title: t", "vars: { A: 1, B: two }"];
        let declared = super::declared(&flow).unwrap();
        assert_eq!(declared.lines, 1..2);
        assert_eq!(declared.values.len(), 2);

        let bad = ["title: t", "vars:", "  1A: x", "  B: ${A}", "  C: [1]"];
        let errors = super::declared(&bad).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].field.as_str()), (5, "vars.C"));
        let bad = ["title: t", "vars:", "  1A: x", "  B: ${A}"];
        let errors = super::declared(&bad).unwrap_err();
        let found: Vec<(u32, &str)> = errors.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert_eq!(found, [(3, "vars.1A"), (4, "vars.B")]);
    }
}
