//! The dashboard's view of a run's metrics: the `results.out` / `diagnostics.out` lines of each
//! instance (`<run dir>/<group>/<index>/`), indexed, as series per instance, aggregated per
//! group, and reduced to one number per run for comparisons across runs.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tg_api::metrics::{MetricLine, MetricSet};

/// Lines read per file at most: a plan that writes without bound cannot stall the daemon.
const MAX_LINES_PER_FILE: usize = 1_000_000;

/// Which metric: its file, its name (tags included) and its type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MetricKey {
    pub set: MetricSet,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// One metric of a run, for the metric picker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricInfo {
    #[serde(flatten)]
    pub key: MetricKey,
    /// Its measures, the default one first.
    pub measures: Vec<String>,
    /// Lines across all instances.
    pub points: usize,
    /// Instances that wrote it.
    pub instances: usize,
}

/// The values of one measure of one instance over time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSeries {
    pub group: String,
    pub index: u32,
    /// Seconds since the run's first metric line.
    pub t: Vec<f64>,
    pub v: Vec<f64>,
}

/// A group's mean per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSeries {
    pub group: String,
    pub t: Vec<f64>,
    pub v: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub measure: String,
    /// Unix time (ns) of t = 0.
    pub t0_ns: i64,
    /// Points of all instances (also those beyond `max_instances`).
    pub points: usize,
    /// Instances that have the metric.
    pub instances_total: usize,
    pub instances: Vec<InstanceSeries>,
    pub groups: Vec<GroupSeries>,
}

/// The measure plotted by default for a metric type (the one sdk-go's dashboards showed).
pub fn default_measure(kind: &str) -> &'static str {
    match kind {
        "counter" | "meter" => "count",
        "ewma" => "rate",
        "histogram" | "timer" | "resettinghistogram" => "mean",
        _ => "value",
    }
}

/// Every instance directory of the run; an unreadable run directory shows as no instances.
fn instance_dirs(run_dir: &Path) -> Vec<(String, u32, PathBuf)> {
    tg_runner::instance_dirs(run_dir).unwrap_or_default()
}

/// Calls `f` with every metric line of `set` in `dir`.
fn for_each_line(dir: &Path, set: MetricSet, mut f: impl FnMut(MetricLine)) {
    let Ok(file) = std::fs::File::open(dir.join(set.file_name())) else {
        return;
    };
    for line in std::io::BufReader::new(file)
        .lines()
        .take(MAX_LINES_PER_FILE)
    {
        let Ok(line) = line else { break };
        if let Some(m) = MetricLine::parse(&line) {
            f(m);
        }
    }
}

/// Every metric the run's instances wrote.
pub fn index(run_dir: &Path) -> Vec<MetricInfo> {
    let mut found: BTreeMap<MetricKey, (Vec<String>, usize, usize)> = BTreeMap::new();
    for (_, _, dir) in instance_dirs(run_dir) {
        for set in MetricSet::ALL {
            let mut seen_here: BTreeMap<MetricKey, ()> = BTreeMap::new();
            for_each_line(&dir, set, |m| {
                let key = MetricKey {
                    set,
                    name: m.name.clone(),
                    kind: m.kind.clone(),
                };
                let e = found.entry(key.clone()).or_default();
                for k in m.measures.keys() {
                    if !e.0.contains(k) {
                        e.0.push(k.clone());
                    }
                }
                e.1 += 1;
                if seen_here.insert(key, ()).is_none() {
                    e.2 += 1;
                }
            });
        }
    }
    found
        .into_iter()
        .map(|(key, (mut measures, points, instances))| {
            let d = default_measure(&key.kind);
            measures.sort();
            if let Some(p) = measures.iter().position(|m| m == d) {
                let m = measures.remove(p);
                measures.insert(0, m);
            }
            MetricInfo {
                key,
                measures,
                points,
                instances,
            }
        })
        .collect()
}

/// The values of `measure` of metric `key`, per instance (the first `max_instances` that have
/// it) and per group (mean per second over all of them).
pub fn series(run_dir: &Path, key: &MetricKey, measure: &str, max_instances: usize) -> Series {
    // (group, index, [(ts, value)]) of each instance that has the metric.
    type Raw = (String, u32, Vec<(i64, f64)>);
    let mut raw: Vec<Raw> = Vec::new();
    for (group, index, dir) in instance_dirs(run_dir) {
        let mut pts = Vec::new();
        for_each_line(&dir, key.set, |m| {
            if m.name == key.name
                && m.kind == key.kind
                && let Some(v) = m.measures.get(measure)
            {
                pts.push((m.ts, *v));
            }
        });
        if !pts.is_empty() {
            pts.sort_by_key(|p| p.0);
            raw.push((group, index, pts));
        }
    }
    let instances_total = raw.len();
    let t0 = raw
        .iter()
        .filter_map(|(_, _, p)| p.first().map(|x| x.0))
        .min()
        .unwrap_or(0);
    let secs = |ts: i64| (ts - t0) as f64 / 1e9;
    let mut by_group: BTreeMap<String, BTreeMap<i64, (f64, u32)>> = BTreeMap::new();
    let mut points = 0;
    let mut instances = Vec::new();
    for (group, index, pts) in raw {
        points += pts.len();
        let buckets = by_group.entry(group.clone()).or_default();
        for &(ts, v) in &pts {
            let b = buckets.entry((ts - t0) / 1_000_000_000).or_default();
            b.0 += v;
            b.1 += 1;
        }
        if instances.len() < max_instances {
            instances.push(InstanceSeries {
                group,
                index,
                t: pts.iter().map(|p| secs(p.0)).collect(),
                v: pts.iter().map(|p| p.1).collect(),
            });
        }
    }
    let groups = by_group
        .into_iter()
        .map(|(group, buckets)| GroupSeries {
            group,
            t: buckets.keys().map(|&s| s as f64).collect(),
            v: buckets
                .values()
                .map(|(sum, n)| sum / f64::from(*n))
                .collect(),
        })
        .collect();
    Series {
        measure: measure.to_string(),
        t0_ns: t0,
        points,
        instances_total,
        instances,
        groups,
    }
}

/// One number for the run: the mean over instances of each one's last value of `measure`
/// (the final aggregate, for counters and histograms; the last point, for points).
pub fn final_value(run_dir: &Path, key: &MetricKey, measure: &str) -> Option<f64> {
    let mut sum = 0.0;
    let mut n = 0u32;
    for (_, _, dir) in instance_dirs(run_dir) {
        let mut last: Option<(i64, f64)> = None;
        for_each_line(&dir, key.set, |m| {
            if m.name == key.name
                && m.kind == key.kind
                && let Some(v) = m.measures.get(measure)
                && last.is_none_or(|l| m.ts >= l.0)
            {
                last = Some((m.ts, *v));
            }
        });
        if let Some((_, v)) = last {
            sum += v;
            n += 1;
        }
    }
    (n > 0).then(|| sum / f64::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, group: &str, index: u32, file: &str, lines: &[String]) {
        let d = dir.join(group).join(index.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(file), lines.join("\n") + "\n").unwrap();
    }

    fn point(ts_s: i64, name: &str, v: f64) -> String {
        format!(
            r#"{{"ts":{},"type":"point","name":"{name}","measures":{{"value":{v}}}}}"#,
            ts_s * 1_000_000_000
        )
    }

    #[test]
    fn indexes_and_aggregates() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        write(
            run,
            "a",
            0,
            "results.out",
            &[point(100, "x", 1.0), point(101, "x", 3.0)],
        );
        write(
            run,
            "a",
            1,
            "results.out",
            &[point(100, "x", 3.0), "garbage".into()],
        );
        write(
            run,
            "b",
            0,
            "results.out",
            &[
                point(102, "x", 10.0),
                r#"{"ts":1,"type":"histogram","name":"h,peer=1","measures":{"count":2,"mean":1.5}}"#
                    .to_string(),
            ],
        );
        write(run, "b", 0, "diagnostics.out", &[point(100, "d", 1.0)]);
        std::fs::create_dir_all(run.join("b").join("not-a-number")).unwrap();

        let idx = index(run);
        let names: Vec<_> = idx
            .iter()
            .map(|m| {
                (
                    m.key.set.as_str(),
                    m.key.name.as_str(),
                    m.points,
                    m.instances,
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("results", "h,peer=1", 1, 1),
                ("results", "x", 4, 3),
                ("diagnostics", "d", 1, 1)
            ]
        );
        assert_eq!(
            idx[0].measures,
            vec!["mean", "count"],
            "default measure first"
        );

        let key = MetricKey {
            set: MetricSet::Results,
            name: "x".into(),
            kind: "point".into(),
        };
        let s = series(run, &key, "value", usize::MAX);
        assert_eq!(s.points, 4);
        assert_eq!(s.instances_total, 3);
        assert_eq!(s.t0_ns, 100_000_000_000);
        assert_eq!(s.instances.len(), 3);
        assert_eq!(s.instances[0].t, vec![0.0, 1.0]);
        assert_eq!(s.groups[0].group, "a");
        assert_eq!(s.groups[0].t, vec![0.0, 1.0]);
        assert_eq!(s.groups[0].v, vec![2.0, 3.0], "mean of 1 and 3, then 3");
        assert_eq!(s.groups[1].v, vec![10.0]);
        let few = series(run, &key, "value", 1);
        assert_eq!((few.instances.len(), few.instances_total), (1, 3));
        assert_eq!(few.points, 4);
        assert_eq!(few.groups, s.groups, "groups aggregate every instance");
        // Last values 3, 3, 10.
        assert_eq!(final_value(run, &key, "value"), Some(16.0 / 3.0));
        assert_eq!(final_value(run, &key, "nope"), None);
    }
}
