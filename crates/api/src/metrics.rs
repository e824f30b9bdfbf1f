//! The metric lines of `results.out` and `diagnostics.out`, in sdk-go's schema.
//!
//! sdk-go (`runtime/metrics*.go`) and our Rust SDK write one JSON object per line:
//! `{"ts":<unix ns>,"type":"point|counter|ewma|gauge|histogram|meter|timer","name":"...",
//! "measures":{...}}`. A name may carry tags after commas (`latency,peer=3`). Both the InfluxDB
//! exporter and the dashboard read these files through [`MetricLine::parse`].

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
}
