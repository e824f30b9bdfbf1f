//! `testground`: the command-line interface of Testground in Rust.
//!
//! It parses the original's commands and flags (urfave/cli style), then either talks to a
//! daemon over HTTP (when `--endpoint` or `.env.toml [client] endpoint` names one) or runs the
//! engine in this very process (embedded mode), rendering the same output in both cases. It
//! owns presentation only: plans are parsed by `tg-plan`, tasks are run by `tg-daemon`'s engine.
//!
//! Modules:
//! - [`cli`]: the clap grammar.
//! - [`log`]: zap-console-style log lines on stdout (scraped by scripts).
//! - [`client`]: remote/embedded backends and the chunk renderer.
//! - [`cmd`]: one module per command family.
//! - [`out`]: stdout writing that ends quietly on a closed pipe.
//! - [`table`]: a small tabwriter.
//! - [`templates`]: `plan create` templates.
//! - [`term`]: colors and the live view (progress bars) on a terminal.

mod cli;
mod client;
mod cmd;
mod log;
mod out;
mod table;
mod templates;
mod term;

use std::fmt;
use std::process::ExitCode;

use clap::Parser;
use tg_api::exit;

/// An error that carries its exit code. Other errors exit with [`exit::FAILURE`].
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    pub fn new(code: i32, message: impl Into<String>) -> Exit {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// One line: scripts and humans both read the last line of a failed command.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Clap's usage errors span several lines (tips, usage, "for more information"); keep the
/// error itself on one line and point at `--help`.
fn usage_error(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("tip:") {
            continue;
        }
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        parts.push(l.to_string());
    }
    let msg = parts.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_string();
    format!("error: {msg} (see 'testground --help')")
}

fn init_tracing(global: &cli::GlobalArgs, daemon: bool) {
    // The engine reports through `tracing`. A client keeps stdout for the scraped lines and
    // shows only problems; the daemon's log is its output.
    let default = if global.v || global.vv {
        "debug"
    } else if daemon {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if daemon {
        builder.with_writer(std::io::stdout).try_init()
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
}

fn main() -> ExitCode {
    // A helper process of a large local:exec run (see tg-runner's `helper`): nothing else.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == tg_runner::HELPER_ARG)
    {
        return tg_runner::helper_main();
    }
    if let Ok(exe) = std::env::current_exe() {
        tg_runner::set_helper_program(exe);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    // Help on a closed stdout (`--help | head`) is not an error.
                    let _ = e.print();
                    ExitCode::from(
                        if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                            exit::USAGE as u8
                        } else {
                            exit::OK as u8
                        },
                    )
                }
                _ => {
                    out::error_line(&usage_error(&e));
                    ExitCode::from(exit::USAGE as u8)
                }
            };
        }
    };

    let level = std::env::var("LOG_LEVEL")
        .ok()
        .and_then(|l| log::Level::parse(&l))
        .unwrap_or(if cli.global.v || cli.global.vv {
            log::Level::Debug
        } else {
            log::Level::Info
        });
    log::set_level(level);
    term::set_no_color(cli.global.no_color);
    init_tracing(&cli.global, matches!(cli.command, cli::Command::Daemon));

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out::error_line(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(exit::FAILURE as u8);
        }
    };
    let res = rt.block_on(cmd::dispatch(cli));
    // Temp dirs of runs removed after their outcome was shown; what a 10-minute wait does not
    // finish stays on record for the next engine start.
    tg_runner::wait_for_cleanup(std::time::Duration::from_secs(600));
    // Do not wait for stray blocking tasks (e.g. a stdin reader) once the command is done.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match res {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(e) => {
            let (code, msg) = match e.downcast_ref::<Exit>() {
                Some(x) => (x.code, x.message.clone()),
                None => (exit::FAILURE, format!("{e:#}")),
            };
            if !msg.is_empty() {
                out::error_line(&format!("error: {}", one_line(&msg)));
            }
            ExitCode::from(code as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fit_on_one_line() {
        let e = cli::Cli::try_parse_from(["testground", "run", "single", "--nope"]).unwrap_err();
        let m = usage_error(&e);
        assert!(!m.contains('\n'), "{m}");
        assert!(m.starts_with("error: unexpected argument '--nope'"), "{m}");
        let e = cli::Cli::try_parse_from(["testground", "describe"]).unwrap_err();
        let m = usage_error(&e);
        assert!(!m.contains('\n') && m.contains("--plan"), "{m}");
    }

    #[test]
    fn one_line_joins() {
        assert_eq!(one_line("a\n  b\n\nc"), "a b c");
    }
}
