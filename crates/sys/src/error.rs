//! Errors that name the failed operation without losing the errno.
//!
//! `io::Error::new(kind, message)` would drop `raw_os_error()`, and callers (the sidecar
//! deciding whether "already exists" is fine, tests asserting on `EEXIST`) need the
//! errno. So context is attached as a [`ContextError`] payload that keeps the original
//! OS error as its source, and [`errno`] digs it back out.

use std::io;

/// An OS error plus a sentence saying what was being done (operation, interface,
/// address). It is the payload of the `io::Error`s this crate returns.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct ContextError {
    context: String,
    #[source]
    source: io::Error,
}

impl ContextError {
    /// What was being done when the error happened.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The underlying error (usually an OS error with an errno).
    pub fn inner(&self) -> &io::Error {
        &self.source
    }
}

/// Wraps `source` with `context`, keeping its kind (so `AlreadyExists`, `NotFound`,
/// `PermissionDenied` still match) and, through [`errno`], its errno.
pub(crate) fn with_context(source: io::Error, context: impl Into<String>) -> io::Error {
    with_context_kind(source.kind(), source, context)
}

/// Like [`with_context`] with an explicit kind, for errnos whose std mapping is
/// unhelpful (ENODEV is "uncategorized" in std but means "no such interface" here).
pub(crate) fn with_context_kind(
    kind: io::ErrorKind,
    source: io::Error,
    context: impl Into<String>,
) -> io::Error {
    io::Error::new(
        kind,
        ContextError {
            context: context.into(),
            source,
        },
    )
}

/// The errno behind an error returned by this crate (or any plain OS error), if any.
pub fn errno(err: &io::Error) -> Option<i32> {
    if let Some(code) = err.raw_os_error() {
        return Some(code);
    }
    err.get_ref()
        .and_then(|e| e.downcast_ref::<ContextError>())
        .and_then(|c| errno(&c.source))
}

/// Converts a nix errno into an `io::Error` with context.
pub(crate) fn nix_context(errno: nix::errno::Errno, context: impl Into<String>) -> io::Error {
    with_context(io::Error::from(errno), context)
}
