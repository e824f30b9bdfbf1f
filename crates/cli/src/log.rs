//! Client log lines in the original's zap console format, on stdout.
//!
//! Scripts scrape these lines with awk (`run is queued with ID: <id>` is field 10), so the layout
//! is fixed: `<Mon dd HH:MM:SS.micros>\t<LEVEL>\t<message>[\t{"k": "v", ...}]`. The day is
//! space-padded (`Jan  6`) exactly like Go's `time.StampMicro`, which keeps the field count stable.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }

    /// Parses a zap level name (`LOG_LEVEL`); unknown names yield `None`.
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "debug" => Some(Level::Debug),
            "info" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warn),
            "error" | "dpanic" | "panic" | "fatal" => Some(Level::Error),
            _ => None,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

pub fn enabled(l: Level) -> bool {
    l as u8 >= LEVEL.load(Ordering::Relaxed)
}

/// The original's `time.StampMicro` in UTC, e.g. `Jan  6 08:15:50.651158`.
pub fn timestamp() -> String {
    chrono::Utc::now().format("%b %e %H:%M:%S%.6f").to_string()
}

/// Formats one line (without the trailing newline). Field values are JSON, as zap prints them.
pub fn format_line(level: Level, msg: &str, fields: &[(&str, serde_json::Value)]) -> String {
    let mut line = format!("{}\t{}\t{}", timestamp(), level.as_str(), msg);
    if !fields.is_empty() {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}: {}", serde_json::Value::from(*k), v))
            .collect();
        line.push_str(&format!("\t{{{}}}", body.join(", ")));
    }
    line
}

pub fn log(level: Level, msg: &str, fields: &[(&str, serde_json::Value)]) {
    if !enabled(level) {
        return;
    }
    let mut line = format_line(level, msg, fields);
    if crate::term::color() {
        line = crate::term::color_line(&line);
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) must not turn into a panic.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn info(msg: impl AsRef<str>) {
    log(Level::Info, msg.as_ref(), &[]);
}

pub fn warn(msg: impl AsRef<str>) {
    log(Level::Warn, msg.as_ref(), &[]);
}

pub fn debug(msg: impl AsRef<str>) {
    log(Level::Debug, msg.as_ref(), &[]);
}

/// A log line with structured fields: `info_kv("x", &[("addr", "y".into())])`.
pub fn info_kv(msg: impl AsRef<str>, fields: &[(&str, serde_json::Value)]) {
    log(Level::Info, msg.as_ref(), fields);
}

pub fn warn_kv(msg: impl AsRef<str>, fields: &[(&str, serde_json::Value)]) {
    log(Level::Warn, msg.as_ref(), fields);
}

pub fn error_kv(msg: impl AsRef<str>, fields: &[(&str, serde_json::Value)]) {
    log(Level::Error, msg.as_ref(), fields);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_line_keeps_the_awk_field_positions() {
        let line = format_line(Level::Info, "run is queued with ID: abc", &[]);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[9], "abc", "{line}");
        let line = format_line(Level::Info, "finished run with ID: abc", &[]);
        assert_eq!(line.split_whitespace().nth(8), Some("abc"));
    }

    #[test]
    fn fields_are_zap_console_json() {
        let line = format_line(
            Level::Info,
            "testground client initialized",
            &[("addr", "embedded".into()), ("n", 3.into())],
        );
        assert!(
            line.ends_with(
                "\tINFO\ttestground client initialized\t{\"addr\": \"embedded\", \"n\": 3}"
            ),
            "{line}"
        );
    }

    #[test]
    fn level_names() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse("nope"), None);
    }
}
