//! Exit codes of the `testground` CLI, as in the original.

/// Everything went well.
pub const OK: i32 = 0;
/// A command failed, or a run finished with an outcome other than `success`.
pub const FAILURE: i32 = 1;
/// Bad command-line usage (what clap reports).
pub const USAGE: i32 = 2;
/// `--collect` was asked for and collecting the outputs failed.
pub const COLLECT_FAILED: i32 = 3;
