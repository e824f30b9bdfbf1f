//! Terminal presentation: colors and the live view of a task's log.
//!
//! Scripts scrape the CLI's stdout, so nothing here changes a byte of it unless stdout is a
//! terminal. On a terminal, lines keep their text and only gain ANSI colors (disabled by
//! `--no-color` or a non-empty `NO_COLOR`), and each phase of a task gets a progress bar drawn
//! below the lines: a spinner while groups build, a bar of started instances.
//!
//! Why the renderer reads the log's text rather than a typed event stream: a daemon sends a
//! task's log as text chunks (the original's wire protocol, which other clients speak too), and
//! the embedded engine hands the CLI the very same chunks, so recognising the engine's known line
//! shapes (`performing build for groups`, `build: ...`, `build succeeded`, `starting run`,
//! `started N/M instances`, instance lines) gives one display in both modes without a second,
//! daemon-only channel. The shapes are rendered by `tg-daemon`'s `engine::events::render` and
//! `tg-runner`'s `InstanceLine::render`; a line the renderer does not recognise is printed as
//! is, so a change there degrades the bars, never the output.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static NO_COLOR_FLAG: AtomicBool = AtomicBool::new(false);

/// `--no-color`.
pub fn set_no_color(v: bool) {
    NO_COLOR_FLAG.store(v, Ordering::Relaxed);
}

pub fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

/// Whether `NO_COLOR` asks for no color (<https://no-color.org>: any non-empty value).
fn no_color_env() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Whether stdout gets colors: only a terminal, and only when not disabled.
pub fn color() -> bool {
    stdout_is_tty() && !NO_COLOR_FLAG.load(Ordering::Relaxed) && !no_color_env()
}

/// `text` in an SGR color (e.g. `"31"` red, `"1;36"` bold cyan).
pub fn paint(text: &str, sgr: &str) -> String {
    format!("\x1b[{sgr}m{text}\x1b[0m")
}

/// zap's capital color level encoder.
fn level_sgr(level: &str) -> Option<&'static str> {
    match level {
        "DEBUG" => Some("35"),
        "INFO" => Some("34"),
        "WARN" => Some("33"),
        "ERROR" | "DPANIC" | "PANIC" | "FATAL" => Some("31"),
        _ => None,
    }
}

/// The class column of an instance line: outcomes green or red, the rest by kind.
fn kind_sgr(kind: &str) -> Option<&'static str> {
    match kind {
        "OK" => Some("32"),
        "FAIL" | "CRASH" | "ERROR" | "INTERNAL_ERR" | "INCOMPLETE" | "TIMEOUT" | "KILLED" => {
            Some("31")
        }
        "START" => Some("34"),
        "MESSAGE" => Some("36"),
        "METRIC" => Some("35"),
        _ => None,
    }
}

/// Splits a console line `<time>\t<LEVEL>\t<message>` into the level's byte range and the
/// message's offset; `None` for any other line.
fn split_log_line(line: &str) -> Option<(std::ops::Range<usize>, usize)> {
    let t1 = line.find('\t')?;
    let rest = &line[t1 + 1..];
    let t2 = rest.find('\t')?;
    let level = &rest[..t2];
    level_sgr(level)?;
    Some((t1 + 1..t1 + 1 + t2, t1 + 1 + t2 + 1))
}

/// The byte range of the class of an instance line's message
/// (`   2.0365s         OK << single[001] (95aa87) >> ...`).
fn instance_kind(msg: &str) -> Option<std::ops::Range<usize>> {
    let t = msg.trim_start();
    let off = msg.len() - t.len();
    let secs = t.find("s ")?;
    t[..secs].parse::<f64>().ok()?;
    let rest = &t[secs + 2..];
    let r = rest.trim_start();
    let start = off + secs + 2 + (rest.len() - r.len());
    let len = r.find(' ')?;
    let kind = &r[..len];
    let upper = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    (upper && r[len..].starts_with(" << ")).then_some(start..start + len)
}

/// Colors a console line's level, and an instance line's class; the text is unchanged.
pub fn color_line(line: &str) -> String {
    let Some((level, msg_at)) = split_log_line(line) else {
        return line.to_string();
    };
    let mut out = String::with_capacity(line.len() + 20);
    out.push_str(&line[..level.start]);
    let lv = &line[level.clone()];
    out.push_str(&paint(lv, level_sgr(lv).unwrap_or("0")));
    out.push_str(&line[level.end..msg_at]);
    let msg = &line[msg_at..];
    match instance_kind(msg) {
        Some(k) => {
            let kind = &msg[k.clone()];
            out.push_str(&msg[..k.start]);
            match kind_sgr(kind) {
                Some(sgr) => out.push_str(&paint(kind, sgr)),
                None => out.push_str(kind),
            }
            out.push_str(&msg[k.end..]);
        }
        None => out.push_str(msg),
    }
    out
}

/// What a task log line means to the live view.
#[derive(Debug, PartialEq)]
enum Shape<'a> {
    BuildStarted(&'a str),
    BuildOutput(&'a str),
    BuildSucceeded,
    RunStarted(u64),
    Started(u64, u64),
    RunEnded,
    Other,
}

fn shape(line: &str) -> Shape<'_> {
    let Some((_, msg_at)) = split_log_line(line) else {
        return Shape::Other;
    };
    let msg = &line[msg_at..];
    if let Some(fields) = msg.strip_prefix("performing build for groups") {
        return Shape::BuildStarted(fields.trim());
    }
    if let Some(out) = msg.strip_prefix("build: ") {
        return Shape::BuildOutput(out);
    }
    if msg.starts_with("build succeeded") {
        return Shape::BuildSucceeded;
    }
    if let Some(fields) = msg.strip_prefix("starting run\t") {
        let n = serde_json::from_str::<serde_json::Value>(fields)
            .ok()
            .and_then(|v| v.get("instances")?.as_u64());
        return n.map_or(Shape::Other, Shape::RunStarted);
    }
    if let Some(rest) = msg.strip_prefix("started ")
        && let Some(counts) = rest.strip_suffix(" instances")
        && let Some((a, b)) = counts.split_once('/')
        && let (Ok(a), Ok(b)) = (a.parse(), b.parse())
    {
        return Shape::Started(a, b);
    }
    if msg.starts_with("run finished with ")
        || msg == "run canceled"
        || msg.starts_with("task failed: ")
    {
        return Shape::RunEnded;
    }
    Shape::Other
}

/// Prints a task's log: verbatim when stdout is not a terminal; colored, with a progress bar
/// per phase, when it is.
pub struct LiveLog {
    live: Option<Live>,
}

struct Live {
    color: bool,
    multi: MultiProgress,
    build: Option<ProgressBar>,
    start: Option<ProgressBar>,
    /// Whether a bar was ever drawn: lines then go above the bars, through `multi`.
    bars: bool,
    /// The end of the last chunk when it was not a whole line.
    partial: Vec<u8>,
}

impl LiveLog {
    pub fn new() -> LiveLog {
        LiveLog {
            live: stdout_is_tty().then(|| Live {
                color: color(),
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                build: None,
                start: None,
                bars: false,
                partial: Vec::new(),
            }),
        }
    }

    /// Prints a chunk of the log. Errors are stdout's (e.g. a closed pipe).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.live {
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Some(l) => {
                l.partial.extend_from_slice(bytes);
                while let Some(nl) = l.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = l.partial.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line[..nl]).into_owned();
                    l.line(&line);
                }
                Ok(())
            }
        }
    }

    /// The log has ended (or is no longer followed): prints what is left and stops the bars,
    /// which stay on screen as the phases' summaries.
    pub fn finish(&mut self) {
        if let Some(l) = &mut self.live {
            if !l.partial.is_empty() {
                let rest = String::from_utf8_lossy(&std::mem::take(&mut l.partial)).into_owned();
                l.line(&rest);
            }
            for b in [l.build.take(), l.start.take()].into_iter().flatten() {
                b.abandon();
            }
        }
    }
}

impl Drop for LiveLog {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Live {
    fn line(&mut self, line: &str) {
        let mut show = true;
        match shape(line) {
            Shape::BuildStarted(fields) => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(style("{spinner} {prefix} {wide_msg} [{elapsed}]"));
                bar.set_prefix("build");
                bar.set_message(build_label(fields));
                bar.enable_steady_tick(Duration::from_millis(120));
                if let Some(old) = self.build.replace(bar) {
                    old.abandon();
                }
                self.bars = true;
            }
            Shape::BuildOutput(out) => {
                if let Some(b) = &self.build {
                    b.set_message(out.to_string());
                }
            }
            Shape::BuildSucceeded => {
                if let Some(b) = self.build.take() {
                    b.set_style(style("{prefix} {wide_msg} [{elapsed}]"));
                    b.finish_with_message("succeeded");
                }
            }
            Shape::RunStarted(n) => {
                let bar = self.multi.add(ProgressBar::new(n));
                bar.set_style(style(
                    "{prefix} [{bar:30}] {pos}/{len} instances [{elapsed}]",
                ));
                bar.set_prefix("started");
                bar.tick();
                if let Some(old) = self.start.replace(bar) {
                    old.abandon();
                }
                self.bars = true;
            }
            Shape::Started(n, total) => {
                if let Some(b) = &self.start {
                    // The bar says it: one line per step would scroll the instances' lines away.
                    show = false;
                    b.set_length(total);
                    b.set_position(n);
                    if n >= total {
                        b.finish();
                    }
                }
            }
            Shape::RunEnded => {
                for b in [self.build.take(), self.start.take()].into_iter().flatten() {
                    b.abandon();
                }
            }
            Shape::Other => {}
        }
        if !show {
            return;
        }
        let text = if self.color {
            color_line(line)
        } else {
            line.to_string()
        };
        if self.bars {
            let _ = self.multi.println(text);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}").and_then(|()| out.flush());
        }
    }
}

/// `plan [group, ...] with builder`, from the fields of `performing build for groups`.
fn build_label(fields: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(fields) else {
        return fields.to_string();
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let groups: Vec<&str> = v
        .get("groups")
        .and_then(|g| g.as_array())
        .map(|a| a.iter().filter_map(|g| g.as_str()).collect())
        .unwrap_or_default();
    format!(
        "{} [{}] with {}",
        s("plan"),
        groups.join(", "),
        s("builder")
    )
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        "Jan  6 08:15:50.651158\tINFO\t   2.0369s         OK << single[000] (acfc2b) >> ";

    #[test]
    fn instance_lines_keep_their_text_and_color_the_class() {
        let c = color_line(OK);
        assert_eq!(
            c,
            "Jan  6 08:15:50.651158\t\x1b[34mINFO\x1b[0m\t   2.0369s         \x1b[32mOK\x1b[0m << single[000] (acfc2b) >> "
        );
        let msg =
            "Jan  6 08:15:50.651158\tINFO\t   0.1000s    MESSAGE << single[000] >> hi << x >>";
        assert!(color_line(msg).contains("\x1b[36mMESSAGE\x1b[0m << single[000] >> hi"));
        let fail = "Jan  6 08:15:50.651158\tINFO\t   0.1000s INTERNAL_ERR << g[001] >> boom";
        assert!(color_line(fail).contains("\x1b[31mINTERNAL_ERR\x1b[0m"));
    }

    #[test]
    fn other_lines_color_the_level_only_or_nothing() {
        let w = "Jan  6 08:15:50.651158\tWARN\trun canceled";
        assert_eq!(
            color_line(w),
            "Jan  6 08:15:50.651158\t\x1b[33mWARN\x1b[0m\trun canceled"
        );
        assert_eq!(color_line("plain text"), "plain text");
        assert_eq!(color_line("a\tNOTALEVEL\tb"), "a\tNOTALEVEL\tb");
    }

    #[test]
    fn shapes_of_the_engines_lines() {
        let l = |m: &str| format!("Jan  6 08:15:50.651158\tINFO\t{m}");
        assert_eq!(
            shape(&l("performing build for groups\t{\"plan\": \"p\"}")),
            Shape::BuildStarted("{\"plan\": \"p\"}")
        );
        assert_eq!(
            shape(&l("build: compiling x")),
            Shape::BuildOutput("compiling x")
        );
        assert_eq!(
            shape(&l("build succeeded\t{\"took\": \"1.0s\"}")),
            Shape::BuildSucceeded
        );
        assert_eq!(
            shape(&l("starting run\t{\"run_id\": \"r\", \"instances\": 3}")),
            Shape::RunStarted(3)
        );
        assert_eq!(shape(&l("started 2/3 instances")), Shape::Started(2, 3));
        assert_eq!(
            shape(&l("run finished with outcome = success (single:1/1)\t{}")),
            Shape::RunEnded
        );
        assert_eq!(shape(&l("started a/b instances")), Shape::Other);
        assert_eq!(shape(OK), Shape::Other);
        assert_eq!(shape("started 1/2 instances"), Shape::Other);
        assert_eq!(
            build_label("{\"plan\": \"p\", \"groups\": [\"a\", \"b\"], \"builder\": \"exec:go\"}"),
            "p [a, b] with exec:go"
        );
    }
}
