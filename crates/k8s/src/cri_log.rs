//! The kubelet's container log files (`<podLogsDir>/<ns>_<pod>_<uid>/<container>/0.log`), read
//! on the node instead of streaming every instance's log through the API server: cheaper at
//! scale (the original stopped following logs past 200 instances), and stdout and stderr stay
//! apart. Each line is `<time> <stdout|stderr> <F|P> <content>`: `P` marks a part of a long
//! line that continues in the next record.

/// Which stream a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One record: its stream and the bytes to append (with the newline when the line is
/// complete).
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub stream: Stream,
    pub content: &'a [u8],
    pub full: bool,
}

/// Parses one record (without its trailing newline). `None` for a malformed one.
pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let _time = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let full = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(Record {
        stream,
        content: parts.next().unwrap_or(b""),
        full,
    })
}

/// The log file of `container` of a pod.
pub fn path(
    logs_dir: &std::path::Path,
    namespace: &str,
    pod: &str,
    uid: &str,
    container: &str,
) -> std::path::PathBuf {
    logs_dir
        .join(format!("{namespace}_{pod}_{uid}"))
        .join(container)
        .join("0.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        assert_eq!(
            parse(b"2026-12-01T22:00:00.1Z stdout F hello world"),
            Some(Record {
                stream: Stream::Stdout,
                content: b"hello world",
                full: true
            })
        );
        assert_eq!(
            parse(b"2026-12-01T22:00:00.1Z stderr P part"),
            Some(Record {
                stream: Stream::Stderr,
                content: b"part",
                full: false
            })
        );
        assert_eq!(
            parse(b"2026-12-01T22:00:00.1Z stdout F "),
            Some(Record {
                stream: Stream::Stdout,
                content: b"",
                full: true
            })
        );
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(b"t stdin F x"), None);
    }
}
