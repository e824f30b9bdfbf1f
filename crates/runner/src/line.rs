use std::fmt;
use std::time::Duration;

/// What an instance line reports; the class column of the original pretty printer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    Start,
    Message,
    Ok,
    Fail,
    Crash,
    /// The instance ended without reporting an outcome.
    Incomplete,
    /// A stderr line.
    Error,
    /// A stdout line that is not an event.
    Other,
    /// The runner's own finding about an instance (e.g. non-zero exit after success).
    InternalErr,
    /// Killed because the run timeout elapsed.
    Timeout,
    /// Killed because the run was canceled.
    Killed,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Start => "START",
            LineKind::Message => "MESSAGE",
            LineKind::Ok => "OK",
            LineKind::Fail => "FAIL",
            LineKind::Crash => "CRASH",
            LineKind::Incomplete => "INCOMPLETE",
            LineKind::Error => "ERROR",
            LineKind::Other => "OTHER",
            LineKind::InternalErr => "INTERNAL_ERR",
            LineKind::Timeout => "TIMEOUT",
            LineKind::Killed => "KILLED",
        }
    }
}

impl fmt::Display for LineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One line about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceLine {
    /// Run-group id.
    pub group: String,
    /// Index of the instance within its group, from 0.
    pub index: u32,
    /// The container's short id under the container runners.
    pub tag: Option<String>,
    /// Time since the run started.
    pub elapsed: Duration,
    pub kind: LineKind,
    pub text: String,
}

impl InstanceLine {
    /// The original pretty printer's line: `   2.0365s         OK << single[001] >> `, with
    /// the container's short id as `single[001] (95aa87)` under the container runners.
    pub fn render(&self) -> String {
        let tag = match &self.tag {
            Some(t) => format!(" ({t})"),
            None => String::new(),
        };
        format!(
            "{:>9.4}s {:>10} << {}[{:03}]{tag} >> {}",
            self.elapsed.as_secs_f64(),
            self.kind.as_str(),
            self.group,
            self.index,
            self.text
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: LineKind, elapsed: Duration, text: &str) -> InstanceLine {
        InstanceLine {
            group: "single".into(),
            index: 1,
            tag: None,
            elapsed,
            kind,
            text: text.into(),
        }
    }

    #[test]
    fn render_matches_the_original_pretty_printer() {
        assert_eq!(
            line(LineKind::Ok, Duration::from_micros(2_036_500), "").render(),
            "   2.0365s         OK << single[001] >> "
        );
        assert_eq!(
            line(
                LineKind::InternalErr,
                Duration::from_millis(12_345_600),
                "boom"
            )
            .render(),
            "12345.6000s INTERNAL_ERR << single[001] >> boom"
        );
        let mut l = line(LineKind::Message, Duration::ZERO, "hi");
        l.index = 12;
        l.group = "g".into();
        assert_eq!(l.render(), "   0.0000s    MESSAGE << g[012] >> hi");
        l.tag = Some("a5d263".into());
        assert_eq!(l.render(), "   0.0000s    MESSAGE << g[012] (a5d263) >> hi");
    }

    #[test]
    fn kind_names() {
        let all = [
            (LineKind::Start, "START"),
            (LineKind::Message, "MESSAGE"),
            (LineKind::Ok, "OK"),
            (LineKind::Fail, "FAIL"),
            (LineKind::Crash, "CRASH"),
            (LineKind::Incomplete, "INCOMPLETE"),
            (LineKind::Error, "ERROR"),
            (LineKind::Other, "OTHER"),
            (LineKind::InternalErr, "INTERNAL_ERR"),
            (LineKind::Timeout, "TIMEOUT"),
            (LineKind::Killed, "KILLED"),
        ];
        for (k, s) in all {
            assert_eq!(k.to_string(), s);
        }
    }
}
