//! The metric lines of `results.out` and `diagnostics.out`, in sdk-go's schema.
//!
//! sdk-go (`runtime/metrics*.go`) and our Rust SDK write one JSON object per line:
//! `{"ts":<unix ns>,"type":"point|counter|ewma|gauge|histogram|meter|timer","name":"...",
//! "measures":{...}}`. A name may carry tags after commas (`latency,peer=3`). Both the InfluxDB
//! exporter and the dashboard read these files through [`MetricLine::parse`].
//!
//! It also encodes the original's InfluxDB 1.x points (line protocol, pure string building), so
//! that the Rust SDK and the engine's exporter write byte-identical points: InfluxDB keeps one
//! point per measurement, tag set and timestamp, so the same metric written twice (once by an
//! SDK, once by the engine after the run) is overwritten, not counted twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which file a metric came from: `results.out` (`runenv.R()`) or `diagnostics.out`
/// (`runenv.D()`). Its name is the first word of the original's InfluxDB measurement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricSet {
    Results,
    Diagnostics,
}

impl MetricSet {
    pub const ALL: [MetricSet; 2] = [MetricSet::Results, MetricSet::Diagnostics];

    pub fn as_str(self) -> &'static str {
        match self {
            MetricSet::Results => "results",
            MetricSet::Diagnostics => "diagnostics",
        }
    }

    /// The file an instance writes this set to, in its outputs directory.
    pub fn file_name(self) -> &'static str {
        match self {
            MetricSet::Results => "results.out",
            MetricSet::Diagnostics => "diagnostics.out",
        }
    }
}

/// One metric line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricLine {
    /// Unix time in nanoseconds.
    pub ts: i64,
    /// `point`, `counter`, `ewma`, `gauge`, `histogram`, `meter`, `timer`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The metric's name, tags included (`name,tag1=v1`).
    pub name: String,
    /// The measures (`value`, `count`, `mean`, `p99`, ...).
    pub measures: BTreeMap<String, f64>,
}

impl MetricLine {
    /// Parses one line; `None` for a line that is not a metric (blank, truncated, other JSON).
    pub fn parse(line: &str) -> Option<MetricLine> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        serde_json::from_str(line).ok()
    }

    /// The name without its tags.
    pub fn base_name(&self) -> &str {
        self.name.split(',').next().unwrap_or_default()
    }

    /// The tags carried in the name (`name,k=v,k2=v2`), in order; pieces without `=` ignored.
    pub fn tags(&self) -> Vec<(&str, &str)> {
        self.name
            .split(',')
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .collect()
    }

    /// The original's InfluxDB measurement: `<results|diagnostics>.<plan>-<case>.<name>.<type>`
    /// (the name without its tags, which become InfluxDB tags).
    pub fn measurement(&self, set: MetricSet, plan: &str, case: &str) -> String {
        format!(
            "{}.{plan}-{case}.{}.{}",
            set.as_str(),
            self.base_name(),
            self.kind
        )
    }
}

/// The InfluxDB database sdk-go writes to.
pub const INFLUX_DB: &str = "testground";

/// The measurement of lifecycle events.
pub const EVENTS_MEASUREMENT: &str = "events";

/// The `run` and `group_id` tags every point carries.
#[derive(Debug, Clone, Copy)]
pub struct PointTags<'a> {
    pub run: &'a str,
    pub group_id: &'a str,
}

impl MetricLine {
    /// This metric as one InfluxDB line-protocol point (no newline), exactly as sdk-go writes
    /// it: measurement [`MetricLine::measurement`], tags `run`, `group_id` and the name's own
    /// `k=v` tags (which may override them, as in sdk-go), fields = the measures, time = `ts`
    /// in nanoseconds. `None` when nothing is left to write (no finite measure).
    pub fn line_protocol(
        &self,
        set: MetricSet,
        plan: &str,
        case: &str,
        tags: PointTags<'_>,
    ) -> Option<String> {
        let mut all: BTreeMap<&str, &str> = BTreeMap::new();
        all.insert("run", tags.run);
        all.insert("group_id", tags.group_id);
        // sdk-go splits each custom tag on every `=` and skips it unless that gives exactly two
        // parts.
        for piece in self.name.split(',').skip(1) {
            let mut kv = piece.split('=');
            if let (Some(k), Some(v), None) = (kv.next(), kv.next(), kv.next()) {
                all.insert(k, v);
            }
        }
        let mut out = String::with_capacity(128);
        escape_into(&mut out, &self.measurement(set, plan, case), &[',', ' ']);
        push_tags(&mut out, &all);
        let mut first = true;
        for (k, v) in &self.measures {
            if !v.is_finite() || k.is_empty() {
                continue;
            }
            out.push(if first { ' ' } else { ',' });
            first = false;
            escape_into(&mut out, k, &[',', '=', ' ']);
            out.push('=');
            if integer_field(set, &self.kind, k) {
                // Go's int64: a float here would conflict with the integer sdk-go wrote.
                out.push_str(&format!("{}i", *v as i64));
            } else {
                out.push_str(&format!("{v}"));
            }
        }
        if first {
            return None;
        }
        out.push(' ');
        out.push_str(&self.ts.to_string());
        Some(out)
    }
}

/// Whether sdk-go writes this field as an InfluxDB integer. Only diagnostics counters: they
/// reach InfluxDB straight from go-metrics (`Count() int64`), whereas results are re-read from
/// `results.out` as JSON numbers (float64). InfluxDB refuses a field whose type changes, so we
/// must agree.
fn integer_field(set: MetricSet, kind: &str, field: &str) -> bool {
    set == MetricSet::Diagnostics && kind == "counter" && field == "count"
}

/// sdk-go's lifecycle event names as written to the `event_type` tag (sic: `SuccessEvent`).
pub fn influx_event_type(event_key: &str) -> Option<&'static str> {
    Some(match event_key {
        "start_event" => "start_event",
        "success_event" => "SuccessEvent",
        "failure_event" => "failure_event",
        "crash_event" => "crash_event",
        _ => return None,
    })
}

/// A lifecycle event point: measurement `events`, tags `run`, `group_id`, `event_type`, field
/// `count=1i` (no newline). `event_type` is sdk-go's name (see [`influx_event_type`]).
pub fn event_line_protocol(tags: PointTags<'_>, event_type: &str, ts: i64) -> String {
    let mut all = BTreeMap::new();
    all.insert("run", tags.run);
    all.insert("group_id", tags.group_id);
    all.insert("event_type", event_type);
    let mut out = String::from(EVENTS_MEASUREMENT);
    push_tags(&mut out, &all);
    out.push_str(&format!(" count=1i {ts}"));
    out
}

/// `,k=v` for each tag, sorted by key (what InfluxDB stores); empty keys or values are left
/// out, as InfluxDB does not keep them.
fn push_tags(out: &mut String, tags: &BTreeMap<&str, &str>) {
    for (k, v) in tags {
        if k.is_empty() || v.is_empty() {
            continue;
        }
        out.push(',');
        escape_into(out, k, &[',', '=', ' ']);
        out.push('=');
        escape_into(out, v, &[',', '=', ' ']);
    }
}

/// Line-protocol escaping: a backslash before each special character; newlines, which would end
/// the point, become spaces (escaped).
fn escape_into(out: &mut String, s: &str, special: &[char]) {
    for c in s.chars() {
        let c = if c == '\n' || c == '\r' { ' ' } else { c };
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sdk_go_lines() {
        let l = MetricLine::parse(
            r#"{"ts":1609970197740780637,"type":"histogram","name":"rtt,peer=2","measures":{"count":3,"max":2.5,"p99":2.5}}"#,
        )
        .unwrap();
        assert_eq!(l.ts, 1609970197740780637);
        assert_eq!(l.kind, "histogram");
        assert_eq!(l.base_name(), "rtt");
        assert_eq!(l.tags(), vec![("peer", "2")]);
        assert_eq!(l.measures["count"], 3.0);
        assert_eq!(
            l.measurement(MetricSet::Results, "ping", "pong"),
            "results.ping-pong.rtt.histogram"
        );
        assert!(MetricLine::parse("").is_none());
        assert!(MetricLine::parse("{\"ts\":1").is_none());
        assert!(MetricLine::parse("not json").is_none());
    }

    #[test]
    fn line_protocol_matches_sdk_go() {
        let tags = PointTags {
            run: "r1",
            group_id: "single",
        };
        let l = MetricLine::parse(
            r#"{"ts":17,"type":"histogram","name":"rtt,peer=2,bad,x=a=b","measures":{"count":3,"max":2.5,"nan_is_not_json":0}}"#,
        )
        .unwrap();
        assert_eq!(
            l.line_protocol(MetricSet::Results, "ping", "pong", tags)
                .unwrap(),
            "results.ping-pong.rtt.histogram,group_id=single,peer=2,run=r1 count=3,max=2.5,nan_is_not_json=0 17"
        );
        // Diagnostics counters are integers, as go-metrics hands them to sdk-go's writer.
        let c = MetricLine::parse(
            r#"{"ts":5,"type":"counter","name":"a b,k=v w","measures":{"count":4}}"#,
        )
        .unwrap();
        assert_eq!(
            c.line_protocol(MetricSet::Diagnostics, "p", "c", tags)
                .unwrap(),
            r"diagnostics.p-c.a\ b.counter,group_id=single,k=v\ w,run=r1 count=4i 5"
        );
        assert_eq!(
            c.line_protocol(MetricSet::Results, "p", "c", tags).unwrap(),
            r"results.p-c.a\ b.counter,group_id=single,k=v\ w,run=r1 count=4 5"
        );
        let empty = MetricLine {
            ts: 1,
            kind: "point".into(),
            name: "x".into(),
            measures: [("value".to_string(), f64::NAN)].into_iter().collect(),
        };
        assert!(
            empty
                .line_protocol(MetricSet::Results, "p", "c", tags)
                .is_none()
        );
        assert_eq!(
            event_line_protocol(tags, influx_event_type("success_event").unwrap(), 9),
            "events,event_type=SuccessEvent,group_id=single,run=r1 count=1i 9"
        );
        assert_eq!(influx_event_type("message_event"), None);
    }
}
