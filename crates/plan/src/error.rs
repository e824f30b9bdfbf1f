//! The one error type of this crate, and the TOML-path formatting its messages share.

use std::fmt;

/// A 1-based position in a file, as editors count (columns in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The position of byte `offset` in `text` (clamped to the end).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location { line, column }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Everything that can go wrong loading, validating or resolving a plan. Each message is one
/// line naming the file (as the user gave it), the TOML field and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{file}: cannot read file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A syntax, type or validation error in a file. `field` is a TOML path such as
    /// `groups[1].instances`; it is empty for pure syntax errors.
    #[error("{file}: {}{message}", prefix(.location, .field))]
    Invalid {
        file: String,
        field: String,
        location: Option<Location>,
        message: String,
    },
    /// A malformed command-line value such as `--build-cfg foo`.
    #[error("{flag}: {message}, found {value:?}")]
    Flag {
        flag: String,
        value: String,
        message: String,
    },
    /// A command-line value that is well-formed but not acceptable for the plan, such as a
    /// `--test-param` the test case does not declare.
    #[error("{flag}: {message}")]
    Param { flag: String, message: String },
    #[error("cannot write composition as toml: {message}")]
    Serialize { message: String },
}

fn prefix(location: &Option<Location>, field: &str) -> String {
    let mut out = String::new();
    if let Some(loc) = location {
        out.push_str(&format!("{loc}: "));
    }
    if !field.is_empty() {
        out.push_str(field);
        out.push_str(": ");
    }
    out
}

impl PlanError {
    pub(crate) fn invalid(
        file: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        PlanError::Invalid {
            file: file.into(),
            field: field.into(),
            location: None,
            message: message.into(),
        }
    }

    /// The file the error is about, if it is about one.
    pub fn file(&self) -> Option<&str> {
        match self {
            PlanError::Read { file, .. } | PlanError::Invalid { file, .. } => Some(file),
            PlanError::Flag { .. } | PlanError::Param { .. } | PlanError::Serialize { .. } => None,
        }
    }

    /// The TOML path of the offending field, if known.
    pub fn field(&self) -> Option<&str> {
        match self {
            PlanError::Invalid { field, .. } if !field.is_empty() => Some(field),
            _ => None,
        }
    }
}

/// One step of a TOML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Formats a path the way a user would write it in TOML: `groups[0].build_config."a.b"`.
pub(crate) fn format_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        let off = text.find('=').unwrap();
        assert_eq!(
            Location::of_offset(text, off),
            Location { line: 1, column: 3 }
        );
        let off = text.rfind('=').unwrap();
        assert_eq!(
            Location::of_offset(text, off),
            Location { line: 2, column: 4 }
        );
        assert_eq!(Location::of_offset(text, 999).line, 3);
    }

    #[test]
    fn paths_quote_keys_that_are_not_bare() {
        let p = [
            Seg::Key("builders".into()),
            Seg::Key("docker:go".into()),
            Seg::Key("x".into()),
        ];
        assert_eq!(format_path(&p), r#"builders."docker:go".x"#);
        let p = [
            Seg::Key("groups".into()),
            Seg::Index(1),
            Seg::Key("instances".into()),
        ];
        assert_eq!(format_path(&p), "groups[1].instances");
    }

    #[test]
    fn display_is_one_line_with_file_location_and_field() {
        let e = PlanError::Invalid {
            file: "m.toml".into(),
            field: "testcases[0].instances.min".into(),
            location: Some(Location { line: 3, column: 9 }),
            message: "invalid type".into(),
        };
        assert_eq!(
            e.to_string(),
            "m.toml: line 3, column 9: testcases[0].instances.min: invalid type"
        );
        let e = PlanError::invalid("c.toml", "", "oops");
        assert_eq!(e.to_string(), "c.toml: oops");
        assert_eq!(e.field(), None);
    }
}
