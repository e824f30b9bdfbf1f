//! Command output on stdout that survives a closed pipe.
//!
//! Rust ignores SIGPIPE, so writing to a closed stdout (`testground tasks | head`) fails with
//! `BrokenPipe`, and `println!` turns that into a panic with a backtrace. Every command prints
//! through [`write`] instead: a reader that went away ends the process quietly, with the status
//! a shell reports for a process killed by SIGPIPE (as the original, a Go program, was).

use std::io::Write;

/// The status of a process ended by a closed output pipe: 128 + SIGPIPE.
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// Writes `args` to stdout and flushes. A closed stdout exits the process quietly; any other
/// error is ignored, as a failing terminal must not fail the command.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let res = out.write_fmt(args).and_then(|()| out.flush());
    if let Err(e) = res {
        exit_if_broken_pipe(&e);
    }
}

/// Ends the process quietly when `e` says the reader of stdout went away.
pub fn exit_if_broken_pipe(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(BROKEN_PIPE_EXIT);
    }
}

/// Writes one line to stderr; a closed stderr is ignored (`eprintln!` would panic).
pub fn error_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// `print!` that does not panic on a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// `println!` that does not panic on a closed stdout.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};
