//! The lifecycle events test instances report: printed on stdout (and teed to `run.out`) and
//! published to the run's `run_events` sync topic.
//!
//! [`Event`] is the wire form (`{"success_event":{"group":"single"}}`), the JSON-tag encoding of
//! sdk-go's `Event` struct; serialising an [`Event`] yields exactly that form. On stdout the event
//! is wrapped in a log line, which [`parse_event_line`] unwraps for both SDK dialects:
//!
//! - sdk-go (zap): `{"ts":<ns>,"msg":"","group_id":"g","run_id":"r","event":{...}}`
//! - sdk-rust: `{"ts":<ns>,"event":{...}}`, with `ts` missing on message events, and the crash
//!   event's group under the misspelt key `groups`.
//!
//! Decoding is lenient where the SDKs differ (missing fields default to empty, non-string error
//! values are kept as their JSON text) so that no instance output is rejected for its dialect.

use serde::{Deserialize, Deserializer, Serialize};

/// One instance event, in its wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// sdk-go's `RecordStart`; `runenv` is kept verbatim (its shape differs between the log and
    /// the wire form).
    #[serde(rename = "start_event")]
    Start {
        #[serde(default)]
        runenv: serde_json::Value,
    },
    #[serde(rename = "message_event")]
    Message {
        #[serde(default, deserialize_with = "lenient_string")]
        message: String,
    },
    #[serde(rename = "success_event")]
    Success {
        #[serde(default, deserialize_with = "lenient_string")]
        group: String,
    },
    #[serde(rename = "failure_event")]
    Failure {
        #[serde(default, deserialize_with = "lenient_string")]
        group: String,
        #[serde(default, deserialize_with = "lenient_string")]
        error: String,
    },
    #[serde(rename = "crash_event")]
    Crash {
        /// sdk-rust spells this key `groups` (trap T14).
        #[serde(default, alias = "groups", deserialize_with = "lenient_string")]
        group: String,
        #[serde(default, deserialize_with = "lenient_string")]
        error: String,
        #[serde(default, deserialize_with = "lenient_string")]
        stacktrace: String,
    },
    #[serde(rename = "stage_start_event")]
    StageStart {
        #[serde(default, deserialize_with = "lenient_string")]
        name: String,
        #[serde(default, deserialize_with = "lenient_string")]
        group: String,
    },
    #[serde(rename = "stage_end_event")]
    StageEnd {
        #[serde(default, deserialize_with = "lenient_string")]
        name: String,
        #[serde(default, deserialize_with = "lenient_string")]
        group: String,
    },
}

impl Event {
    /// Success, failure and crash end an instance's test case.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Success { .. } | Event::Failure { .. } | Event::Crash { .. }
        )
    }

    /// The run-group id the event names, for the kinds that carry one.
    pub fn group(&self) -> Option<&str> {
        match self {
            Event::Start { .. } | Event::Message { .. } => None,
            Event::Success { group }
            | Event::Failure { group, .. }
            | Event::Crash { group, .. }
            | Event::StageStart { group, .. }
            | Event::StageEnd { group, .. } => Some(group),
        }
    }

    /// The wire key of the event kind, e.g. `success_event`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start_event",
            Event::Message { .. } => "message_event",
            Event::Success { .. } => "success_event",
            Event::Failure { .. } => "failure_event",
            Event::Crash { .. } => "crash_event",
            Event::StageStart { .. } => "stage_start_event",
            Event::StageEnd { .. } => "stage_end_event",
        }
    }
}

/// Decodes one stdout line of an instance. Returns the line's `ts` (unix nanoseconds, when
/// present) and its event, or `None` for anything that is not an event line: plain text, other
/// JSON (metrics, SDK debug logs) and events in an unknown shape (the pre-v0.2.6 format).
pub fn parse_event_line(line: &str) -> Option<(Option<i64>, Event)> {
    let line = line.trim();
    // Cheap pre-filter: most non-event output never reaches the JSON parser.
    if !line.starts_with('{') || !line.contains("\"event\"") {
        return None;
    }

    #[derive(Deserialize)]
    struct Line {
        #[serde(default)]
        ts: Option<serde_json::Value>,
        event: Option<Event>,
    }

    let parsed: Line = serde_json::from_str(line).ok()?;
    let event = parsed.event?;
    let ts = parsed.ts.as_ref().and_then(timestamp_ns);
    Some((ts, event))
}

/// sdk-go writes `ts` as i64 nanoseconds, sdk-rust as u128; a value past i64 saturates rather
/// than discarding the event.
fn timestamp_ns(v: &serde_json::Value) -> Option<i64> {
    let n = v.as_number()?;
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    if n.as_u64().is_some() {
        return Some(i64::MAX);
    }
    n.as_f64().map(|f| f as i64)
}

/// Strings as strings, `null` as empty, anything else as its JSON text: sdk-rust may
/// JSON-encode error values (trap T12) and a lost error message helps nobody.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_zap_line_is_decoded_with_its_timestamp() {
        let line = r#"{"ts":1609970197740780637,"msg":"","group_id":"single","run_id":"bvr31otnf4qajmq6dvu0","event":{"message_event":{"message":"influxdb: failed"}}}"#;
        assert_eq!(
            parse_event_line(line),
            Some((
                Some(1609970197740780637),
                Event::Message {
                    message: "influxdb: failed".into()
                }
            ))
        );
        let start = r#"{"ts":1,"msg":"","group_id":"single","run_id":"r","event":{"start_event":{"runenv":{"plan":"p","instances":2}}}}"#;
        let (_, ev) = parse_event_line(start).unwrap();
        assert_eq!(
            ev,
            Event::Start {
                runenv: json!({"plan":"p","instances":2})
            }
        );
        assert!(!ev.is_terminal());
    }

    #[test]
    fn rust_sdk_lines_with_and_without_ts() {
        let ok = r#"{"ts":1795555899292250835,"event":{"success_event":{"group":"single"}}}"#;
        let (ts, ev) = parse_event_line(ok).unwrap();
        assert_eq!(ts, Some(1795555899292250835));
        assert_eq!(
            ev,
            Event::Success {
                group: "single".into()
            }
        );
        assert!(ev.is_terminal());

        let msg = r#"{"event":{"message_event":{"message":"Hello, sdk-rust!"}}}"#;
        assert_eq!(
            parse_event_line(msg),
            Some((
                None,
                Event::Message {
                    message: "Hello, sdk-rust!".into()
                }
            ))
        );

        let stage = r#"{"ts":2,"event":{"stage_start_event":{"name":"network-initialized","group":"single"}}}"#;
        assert_eq!(
            parse_event_line(stage).unwrap().1,
            Event::StageStart {
                name: "network-initialized".into(),
                group: "single".into()
            }
        );
    }

    #[test]
    fn rust_crash_event_uses_groups() {
        let line = r#"{"ts":3,"event":{"crash_event":{"groups":"g","error":"boom","stacktrace":"at main"}}}"#;
        let (_, ev) = parse_event_line(line).unwrap();
        assert_eq!(
            ev,
            Event::Crash {
                group: "g".into(),
                error: "boom".into(),
                stacktrace: "at main".into()
            }
        );
        assert!(ev.is_terminal());
        assert_eq!(ev.group(), Some("g"));
    }

    #[test]
    fn non_event_lines_are_none() {
        for line in [
            "",
            "hello world",
            "{not json \"event\"",
            r#"{"ts":1,"msg":"debug log","level":"info"}"#,
            r#"{"ts":1,"type":"point","name":"x","measures":{"value":1}}"#,
            r#"{"type":"message","message":"old sdk","event":"x"}"#,
            r#"{"event":{"type":"message","message":"old sdk"}}"#,
            r#"{"event":null}"#,
            "[\"event\"]",
        ] {
            assert_eq!(parse_event_line(line), None, "{line}");
        }
    }

    #[test]
    fn serialising_gives_the_wire_form() {
        assert_eq!(
            serde_json::to_value(Event::Success { group: "g".into() }).unwrap(),
            json!({"success_event":{"group":"g"}})
        );
        assert_eq!(
            serde_json::to_value(Event::Crash {
                group: "g".into(),
                error: "e".into(),
                stacktrace: "s".into()
            })
            .unwrap(),
            json!({"crash_event":{"group":"g","error":"e","stacktrace":"s"}})
        );
        let failure: Event =
            serde_json::from_value(json!({"failure_event":{"group":"g","error":{"code":1}}}))
                .unwrap();
        assert_eq!(
            failure,
            Event::Failure {
                group: "g".into(),
                error: r#"{"code":1}"#.into()
            }
        );
        let back: Event = serde_json::from_str(&serde_json::to_string(&failure).unwrap()).unwrap();
        assert_eq!(back, failure);
    }

    #[test]
    fn oversized_rust_timestamp_saturates() {
        let line = r#"{"ts":18446744073709551615,"event":{"success_event":{"group":"g"}}}"#;
        assert_eq!(parse_event_line(line).unwrap().0, Some(i64::MAX));
    }
}
