//! The plan's text before it is read as YAML: `${VAR}` substitution ([`super::vars`]) and
//! probe includes, with a map from every line of the result back to the file, line and column
//! it was written at, so that every later error points at what the author wrote.
//!
//! # Includes
//!
//! An item of `steady_state.probes` may be `- include: FILE` (or `- { include: FILE }`), alone
//! on its line, in a block list. FILE holds a block list of probe specs (`- name: ...` items
//! starting at column 1) and may include further files the same way. Paths are relative to
//! the including file's directory and may not be absolute or leave the plan's directory;
//! includes nest at most [`MAX_INCLUDE_DEPTH`] deep and never in a cycle. Reading a file is
//! the caller's business ([`super::PlanInputs::include`]): the domain does no I/O, and the
//! coordinator only ever sees plans whose includes were already inlined
//! ([`super::ExpandedPlan::text`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use super::vars::{self, Seg, Substituted};
use super::{PlanError, PlanInputs};

/// Deepest nesting of includes (the plan including a file is depth 1).
pub const MAX_INCLUDE_DEPTH: usize = 4;

/// Where a line of the expanded text was written.
#[derive(Debug, Clone)]
struct Origin {
    /// The included file (relative to the plan's directory); `None` for the plan itself.
    file: Option<Arc<str>>,
    /// 1-based.
    line: u32,
    /// Columns added in front of the line (the indentation of an include).
    indent: u32,
    /// Substitutions on the line.
    segs: Vec<Seg>,
}

#[derive(Debug)]
struct Line {
    /// What the YAML reader sees.
    parse: String,
    /// What substitutes to `parse` (see [`vars::escape`]).
    canonical: String,
    origin: Origin,
}

/// The plan's text with variables substituted and includes inlined.
#[derive(Debug)]
pub(super) struct Expanded {
    lines: Vec<Line>,
}

impl Expanded {
    /// The text to read as YAML.
    pub(super) fn parse_text(&self) -> String {
        join(self.lines.iter().map(|line| line.parse.as_str()))
    }

    /// A self-contained plan that parses, without inputs, to what [`Self::parse_text`] holds.
    pub(super) fn canonical_text(&self) -> String {
        join(self.lines.iter().map(|line| line.canonical.as_str()))
    }

    /// Points `error`, located in [`Self::parse_text`], at the text as written.
    pub(super) fn locate(&self, error: &mut PlanError) {
        if error.line == 0 {
            return;
        }
        let index = usize::try_from(error.line - 1).unwrap_or(usize::MAX);
        let Some(line) = self.lines.get(index) else {
            // Past the end (an error at the end of the text): after the plan's last line.
            if let Some(last) = self.lines.iter().rev().find(|l| l.origin.file.is_none()) {
                error.line = last.origin.line + 1;
            }
            return;
        };
        let origin = &line.origin;
        error.line = origin.line;
        error.file = origin.file.as_deref().map(str::to_string);
        if error.column > 0 {
            let column = error.column.saturating_sub(origin.indent).max(1);
            error.column = vars::original_column(&origin.segs, column);
        }
    }
}

fn join<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for (index, line) in lines.enumerate() {
        if index > 0 {
            text.push('\n');
        }
        text.push_str(line);
    }
    text
}

/// Substitutes the variables of `yaml` and inlines its includes.
pub(super) fn expand(yaml: &str, inputs: &PlanInputs<'_>) -> Result<Expanded, Vec<PlanError>> {
    let lines: Vec<&str> = yaml.split('\n').collect();
    let declared = vars::declared(&lines)?;
    let mut errors = Vec::new();
    let mut values = declared.values.clone();
    for (name, value) in inputs.vars {
        let problem = if !vars::is_var_name(name) {
            Some("is not a valid variable name (A-Z, a-z, 0-9, _)".to_string())
        } else {
            vars::value_problem(value)
        };
        match problem {
            Some(problem) => errors.push(unlocated(format!("--var {name}: {problem}"))),
            None => {
                values.insert(name.clone(), value.clone());
            }
        }
    }
    let mut expander = Expander {
        values,
        used: BTreeSet::new(),
        errors,
        resolve: inputs.include,
        out: Vec::new(),
    };
    let mut plan_lines = Vec::with_capacity(lines.len());
    for (index, text) in lines.iter().enumerate() {
        let number = line_number(index);
        if declared.lines.contains(&index) || vars::is_comment(text) {
            plan_lines.push(Line {
                parse: (*text).to_string(),
                canonical: (*text).to_string(),
                origin: origin(None, number, 0, Vec::new()),
            });
        } else {
            plan_lines.push(expander.substitute(text, None, number, 0));
        }
    }
    for index in 0..plan_lines.len() {
        let line = &plan_lines[index];
        match include_directive(&line.parse) {
            Some(directive) => {
                let at = Site {
                    file: None,
                    line: line.origin.line,
                    column: directive.column,
                };
                if !in_probe_list(&plan_lines, index, directive.indent) {
                    expander.error(
                        &at,
                        "`include` may only be an item of steady_state.probes, written as \
                         `- include: FILE` on its own line",
                    );
                    continue;
                }
                let mut stack = Vec::new();
                expander.include(&directive, &at, "", &mut stack);
            }
            None => {
                let line = Line {
                    parse: line.parse.clone(),
                    canonical: line.canonical.clone(),
                    origin: line.origin.clone(),
                };
                expander.out.push(line);
            }
        }
    }
    for (name, _) in inputs.vars {
        if vars::is_var_name(name)
            && !declared.values.contains_key(name)
            && !expander.used.contains(name)
        {
            let message = format!(
                "--var {name}: the plan neither declares (under `vars:`) nor uses ${{{name}}}"
            );
            expander.errors.push(unlocated(message));
        }
    }
    if expander.errors.is_empty() {
        Ok(Expanded {
            lines: expander.out,
        })
    } else {
        let mut errors = expander.errors;
        errors.sort_by(|a, b| {
            (a.line == 0, &a.file, a.line, a.column).cmp(&(b.line == 0, &b.file, b.line, b.column))
        });
        Err(errors)
    }
}

fn line_number(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

fn origin(file: Option<&Arc<str>>, line: u32, indent: u32, segs: Vec<Seg>) -> Origin {
    Origin {
        file: file.cloned(),
        line,
        indent,
        segs,
    }
}

fn unlocated(message: String) -> PlanError {
    PlanError {
        line: 0,
        column: 0,
        field: String::new(),
        message,
        file: None,
    }
}

/// A place in a file as written.
#[derive(Debug, Clone)]
struct Site {
    file: Option<Arc<str>>,
    line: u32,
    column: u32,
}

struct Expander<'a> {
    values: BTreeMap<String, String>,
    used: BTreeSet<String>,
    errors: Vec<PlanError>,
    resolve: Option<super::IncludeResolver<'a>>,
    out: Vec<Line>,
}

impl Expander<'_> {
    fn error(&mut self, at: &Site, message: impl Into<String>) {
        self.errors.push(PlanError {
            line: at.line,
            column: at.column,
            field: String::new(),
            message: message.into(),
            file: at.file.as_deref().map(str::to_string),
        });
    }

    /// Line `number` of `file`, substituted and indented by `indent` columns.
    fn substitute(
        &mut self,
        text: &str,
        file: Option<&Arc<str>>,
        number: u32,
        indent: u32,
    ) -> Line {
        let Substituted {
            text: parse,
            segs,
            problems,
        } = vars::substitute(text, &self.values, &mut self.used);
        for (column, message) in problems {
            let at = Site {
                file: file.cloned(),
                line: number,
                column,
            };
            self.error(&at, message);
        }
        let pad = " ".repeat(usize::try_from(indent).unwrap_or(0));
        Line {
            canonical: format!("{pad}{}", vars::escape(&parse)),
            parse: format!("{pad}{parse}"),
            origin: origin(file, number, indent, segs),
        }
    }

    /// Inlines the file `directive` names (relative to `base_dir`), written at `at`; `stack`
    /// holds the files being included around it, outermost first.
    fn include(
        &mut self,
        directive: &Directive,
        at: &Site,
        base_dir: &str,
        stack: &mut Vec<String>,
    ) {
        let path = match &directive.path {
            Ok(path) => match normalize(base_dir, path) {
                Ok(path) => path,
                Err(message) => return self.error(at, message),
            },
            Err(message) => return self.error(at, message.clone()),
        };
        if stack.contains(&path) {
            let mut chain = stack.clone();
            chain.push(path);
            return self.error(at, format!("include cycle: {}", chain.join(" -> ")));
        }
        if stack.len() >= MAX_INCLUDE_DEPTH {
            return self.error(
                at,
                format!("includes nest at most {MAX_INCLUDE_DEPTH} deep; {path} is one too many"),
            );
        }
        let Some(resolve) = self.resolve else {
            return self.error(
                at,
                format!(
                    "cannot include {path} here: includes are read from files by `faultline plan \
                     validate` and `faultline run`, which send the plan with its includes inlined"
                ),
            );
        };
        let text = match resolve(&path) {
            Ok(text) => text,
            Err(message) => return self.error(at, format!("cannot include {path}: {message}")),
        };
        let file: Arc<str> = Arc::from(path.as_str());
        let dir = parent(&path).to_string();
        stack.push(path.clone());
        let mut lines: Vec<&str> = text.split('\n').collect();
        if lines.last().is_some_and(|line| line.trim().is_empty()) {
            lines.pop();
        }
        let indent = directive.indent;
        let mut items = 0usize;
        let mut malformed = false;
        for (index, raw) in lines.iter().enumerate() {
            let number = line_number(index);
            let blank = raw.trim().is_empty();
            if blank || vars::is_comment(raw) || (items == 0 && raw.trim_end() == "---") {
                let text = if blank || raw.trim_end() == "---" {
                    String::new()
                } else {
                    format!("{}{raw}", " ".repeat(usize::try_from(indent).unwrap_or(0)))
                };
                self.out.push(Line {
                    parse: text.clone(),
                    canonical: text,
                    origin: origin(Some(&file), number, indent, Vec::new()),
                });
                continue;
            }
            let site = Site {
                file: Some(file.clone()),
                line: number,
                column: 1,
            };
            let starts_item = raw.starts_with('-');
            if !starts_item && (items == 0 || !raw.starts_with([' ', '\t'])) {
                self.error(
                    &site,
                    "an included file is a list of probes: each item starts with `- ` at \
                     column 1 (`- { name: api, kind: tcp, address: \"host:port\" }`)",
                );
                malformed = true;
                break;
            }
            if starts_item {
                items += 1;
            }
            let line = self.substitute(raw, Some(&file), number, indent);
            let pad = usize::try_from(indent).unwrap_or(0);
            let written = line.parse.get(pad..).unwrap_or_default();
            if let Some(nested) = include_directive(written).filter(|d| d.indent == 0) {
                let nested = Directive {
                    indent: indent + nested.indent,
                    ..nested
                };
                let site = Site {
                    column: nested.column,
                    ..site
                };
                self.include(&nested, &site, &dir, stack);
                continue;
            }
            self.out.push(line);
        }
        stack.pop();
        if items == 0 && !malformed {
            self.error(at, format!("{path} holds no probes"));
        }
    }
}

/// `- include: FILE` or `- { include: FILE }` as a line holds it.
#[derive(Debug, Clone)]
struct Directive {
    /// Column (0-based) of the `-`.
    indent: u32,
    /// 1-based column of `include`.
    column: u32,
    /// The path as written, or why the line is not a well-formed include.
    path: Result<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInclude {
    include: String,
}

/// The include a list item line holds, if it is one.
fn include_directive(line: &str) -> Option<Directive> {
    let line = line.trim_end_matches('\r');
    let item = line.trim_start_matches(' ');
    let indent = line.len() - item.len();
    let rest = item.strip_prefix('-')?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim_start();
    let flow = rest
        .strip_prefix('{')
        .is_some_and(|inner| inner.trim_start().starts_with("include"));
    if !(rest.starts_with("include:") || flow) {
        return None;
    }
    let column = line
        .find("include")
        .map_or(indent + 1, |at| line[..at].chars().count() + 1);
    let path = match serde_saphyr::from_str::<RawInclude>(rest) {
        Ok(raw) if !raw.include.trim().is_empty() => Ok(raw.include.trim().to_string()),
        Ok(_) => Err("an include needs a file: `- include: probes/api.yaml`".to_string()),
        Err(_) => Err(
            "an include is `- include: FILE` (or `- { include: FILE }`) alone on its line, \
             with nothing else in the item"
                .to_string(),
        ),
    };
    Some(Directive {
        indent: u32::try_from(indent).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
        path,
    })
}

/// Whether the item whose `-` is at column `indent` (0-based) of `lines[index]` belongs to the
/// block list under `probes:` under the top-level `steady_state:`.
fn in_probe_list(lines: &[Line], index: usize, indent: u32) -> bool {
    let indent = usize::try_from(indent).unwrap_or(usize::MAX);
    let content = |line: &Line| -> Option<(usize, String)> {
        let text = line.parse.trim_end_matches('\r');
        let trimmed = text.trim_start_matches(' ');
        (!trimmed.is_empty() && !trimmed.starts_with('#'))
            .then(|| (text.len() - trimmed.len(), trimmed.to_string()))
    };
    // The key the list hangs from: the nearest line above that is neither deeper nor a
    // sibling item.
    let mut parent = None;
    for (at, line) in lines[..index].iter().enumerate().rev() {
        let Some((column, text)) = content(line) else {
            continue;
        };
        if column > indent || (column == indent && text.starts_with('-')) {
            continue;
        }
        parent = Some((at, column, text));
        break;
    }
    let Some((at, column, text)) = parent else {
        return false;
    };
    if !is_key_line(&text, "probes") {
        return false;
    }
    // And its own parent: `steady_state:` at column 1.
    for line in lines[..at].iter().rev() {
        let Some((outer, text)) = content(line) else {
            continue;
        };
        if outer < column {
            return outer == 0 && is_key_line(&text, "steady_state");
        }
    }
    false
}

/// `key:` with nothing but a comment after it.
fn is_key_line(text: &str, key: &str) -> bool {
    text.strip_prefix(key)
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .is_some_and(|rest| {
            let rest = rest.trim();
            rest.is_empty() || rest.starts_with('#')
        })
}

/// The directory part of a normalized relative path (`""` for a file in the plan's directory).
fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// `path` relative to `base_dir` (itself relative to the plan's directory), normalized: no
/// `.`, no `..`, no empty segments. Absolute paths and paths that leave the plan's directory
/// are refused.
fn normalize(base_dir: &str, path: &str) -> Result<String, String> {
    if path.starts_with(['/', '\\']) {
        return Err(format!(
            "include {path:?} is an absolute path; includes are relative to the plan's directory"
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(format!("include {path:?} has control characters"));
    }
    let mut parts: Vec<&str> = base_dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "include {path:?} leaves the plan's directory; includes must stay inside it"
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!("include {path:?} names no file"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_kept_inside_the_plan_directory() {
        type Case = (
            &'static str,
            &'static str,
            Result<&'static str, &'static str>,
        );
        let cases: Vec<Case> = vec![
            ("", "probes/api.yaml", Ok("probes/api.yaml")),
            ("", "./probes//api.yaml", Ok("probes/api.yaml")),
            ("probes", "db.yaml", Ok("probes/db.yaml")),
            ("probes", "../common.yaml", Ok("common.yaml")),
            ("probes/a", "../../x.yaml", Ok("x.yaml")),
            ("", "../secrets.yaml", Err("leaves the plan's directory")),
            ("probes", "../../x.yaml", Err("leaves the plan's directory")),
            ("", "/etc/passwd", Err("absolute path")),
            ("", ".", Err("names no file")),
        ];
        for (base, path, expected) in cases {
            match (normalize(base, path), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{base} {path}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{base} {path}: {got}"),
                (got, want) => panic!("{base} {path}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn include_lines_are_recognised() {
        type Case = (&'static str, Option<(u32, u32, Result<&'static str, ()>)>);
        let cases: Vec<Case> = vec![
            (
                "    - include: probes/api.yaml",
                Some((4, 7, Ok("probes/api.yaml"))),
            ),
            (
                "  - { include: \"a b.yaml\" }  # c",
                Some((2, 7, Ok("a b.yaml"))),
            ),
            ("- include: x.yaml # comment", Some((0, 3, Ok("x.yaml")))),
            ("  - { include: x.yaml, name: api }", Some((2, 7, Err(())))),
            ("  - include:", Some((2, 5, Err(())))),
            ("  - name: include", None),
            ("  -include: x", None),
            ("  include: x", None),
            ("  - { name: api, kind: tcp }", None),
        ];
        for (line, expected) in cases {
            let got = include_directive(line).map(|d| (d.indent, d.column, d.path.map_err(|_| ())));
            let expected = expected.map(|(i, c, p)| (i, c, p.map(str::to_string)));
            assert_eq!(got, expected, "{line}");
        }
    }
}
