//! What a build produces, and its string form in a composition (`run.artifact`).

use std::fmt;
use std::path::{Path, PathBuf};

/// The kind of artifact a builder produces and a runner accepts (shared with the runners).
pub use tg_api::artifact::ArtifactKind;

/// A built artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// Path of an executable file.
    Executable(PathBuf),
    /// A container image: its id (e.g. `sha256:…`) and the tags the builder gave it.
    Image { id: String, tags: Vec<String> },
}

/// A `run.artifact` value that cannot be an artifact of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} artifact {value:?}: {reason}")]
pub struct ArtifactError {
    pub kind: ArtifactKind,
    pub value: String,
    pub reason: &'static str,
}

impl Artifact {
    pub fn kind(&self) -> ArtifactKind {
        match self {
            Artifact::Executable(_) => ArtifactKind::Executable,
            Artifact::Image { .. } => ArtifactKind::Image,
        }
    }

    /// The executable's path, for executables.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Artifact::Executable(p) => Some(p),
            Artifact::Image { .. } => None,
        }
    }

    /// Reads back the string form ([`fmt::Display`]) of an artifact of `kind`. The kind comes
    /// from the builder (or the runner) rather than from the string, since a file may well be
    /// named like an image id. Tags are not part of the string form and come back empty.
    pub fn parse(kind: ArtifactKind, value: &str) -> Result<Artifact, ArtifactError> {
        let bad = |reason| ArtifactError {
            kind,
            value: value.to_owned(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("it is empty"));
        }
        if value.contains('\0') {
            return Err(bad("it contains a NUL byte"));
        }
        match kind {
            ArtifactKind::Executable => Ok(Artifact::Executable(PathBuf::from(value))),
            ArtifactKind::Image => {
                if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad("an image id has no spaces or control characters"));
                }
                Ok(Artifact::Image {
                    id: value.to_owned(),
                    tags: Vec::new(),
                })
            }
        }
    }
}

/// The stable string form: the path of an executable, the id of an image.
impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Artifact::Executable(p) => write!(f, "{}", p.display()),
            Artifact::Image { id, .. } => f.write_str(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_form_round_trips() {
        let exe = Artifact::Executable(PathBuf::from("/work/exec-go--p-0123456789abcdef"));
        let s = exe.to_string();
        assert_eq!(s, "/work/exec-go--p-0123456789abcdef");
        assert_eq!(Artifact::parse(ArtifactKind::Executable, &s).unwrap(), exe);
        assert_eq!(exe.path(), Some(Path::new(&s)));

        let img = Artifact::Image {
            id: "sha256:abcd".into(),
            tags: vec!["tg-plan:latest".into()],
        };
        assert_eq!(img.to_string(), "sha256:abcd");
        assert_eq!(img.kind(), ArtifactKind::Image);
        assert_eq!(img.path(), None);
        let back = Artifact::parse(ArtifactKind::Image, "sha256:abcd").unwrap();
        assert_eq!(
            back,
            Artifact::Image {
                id: "sha256:abcd".into(),
                tags: vec![]
            }
        );
    }

    #[test]
    fn bad_values_name_kind_and_value() {
        let err = Artifact::parse(ArtifactKind::Image, "a b").unwrap_err();
        assert_eq!(err.kind, ArtifactKind::Image);
        assert!(
            err.to_string()
                .starts_with("invalid image artifact \"a b\""),
            "{err}"
        );
        assert!(Artifact::parse(ArtifactKind::Executable, "").is_err());
        assert!(Artifact::parse(ArtifactKind::Executable, "a\0b").is_err());
    }
}
