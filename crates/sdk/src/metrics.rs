//! Metrics in sdk-go's file format: one JSON object per line,
//! `{"ts":<ns>,"type":"point|counter|gauge|histogram|timer","name":"..","measures":{..}}`.
//!
//! Points are written at once. Counters, gauges, histograms and timers aggregate in memory and
//! are written by [`Metrics::flush`], which [`crate::invoke`] calls on a ticker as sdk-go does
//! (results every second, diagnostics every 5 s: [`flush_periodically`]) and once more when the
//! case ends. With an InfluxDB sink, every line written is also queued as a point.
//!
//! The registry and the aggregates sit behind plain mutexes rather than an actor: metric calls
//! come from synchronous plan code on any thread and hold the lock for a few instructions.
//!
//! Timer rates are an approximation of go-metrics' EWMAs: `m1`, `m5` and `m15` are the mean
//! rate (events per second) over the last 1, 5 and 15 minutes (or the timer's lifetime when that
//! is shorter), counted in one-second buckets; `meanrate` is events per second since creation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tg_api::metrics::{MetricLine, MetricSet};

use crate::influx::InfluxSink;
use crate::runenv::{RunEnv, now_ns};

/// sdk-go's flush intervals of `runenv.R()` and `runenv.D()`.
pub const RESULTS_FLUSH: Duration = Duration::from_secs(1);
pub const DIAGNOSTICS_FLUSH: Duration = Duration::from_secs(5);

/// Histograms keep at most this many samples for percentiles (reservoir sampling beyond it);
/// count, min, max, mean and variance stay exact.
const SAMPLE_CAP: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves the data usable for metrics.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One metric sink: `runenv.r()` (results.out) or `runenv.d()` (diagnostics.out).
pub struct Metrics {
    set: MetricSet,
    sink: Mutex<Option<File>>,
    influx: Option<Arc<InfluxSink>>,
    registry: Mutex<BTreeMap<(String, &'static str), Aggregate>>,
}

#[derive(Clone)]
enum Aggregate {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
    Timer(Timer),
}

impl Metrics {
    pub(crate) fn new(
        set: MetricSet,
        sink: Option<File>,
        influx: Option<Arc<InfluxSink>>,
    ) -> Metrics {
        Metrics {
            set,
            sink: Mutex::new(sink),
            influx,
            registry: Mutex::new(BTreeMap::new()),
        }
    }

    /// Writes a single point now. `name` may carry tags: `latency,peer=3`.
    pub fn record_point(&self, name: &str, value: f64) {
        self.write("point", name, &[("value", Num::F(value))]);
    }

    /// The counter named `name`, created on first use.
    pub fn counter(&self, name: &str) -> Counter {
        match self.get_or_insert(name, "counter", || {
            Aggregate::Counter(Counter(Arc::new(AtomicI64::new(0))))
        }) {
            Aggregate::Counter(c) => c,
            _ => unreachable!("registry keys include the kind"),
        }
    }

    /// The gauge named `name`, created on first use.
    pub fn gauge(&self, name: &str) -> Gauge {
        match self.get_or_insert(name, "gauge", || {
            Aggregate::Gauge(Gauge(Arc::new(AtomicU64::new(0f64.to_bits()))))
        }) {
            Aggregate::Gauge(g) => g,
            _ => unreachable!("registry keys include the kind"),
        }
    }

    /// The histogram named `name`, created on first use.
    pub fn histogram(&self, name: &str) -> Histogram {
        match self.get_or_insert(name, "histogram", || {
            Aggregate::Histogram(Histogram(Arc::new(Mutex::new(Samples::default()))))
        }) {
            Aggregate::Histogram(h) => h,
            _ => unreachable!("registry keys include the kind"),
        }
    }

    /// The timer named `name`, created on first use.
    pub fn timer(&self, name: &str) -> Timer {
        match self.get_or_insert(name, "timer", || {
            Aggregate::Timer(Timer(Arc::new(Mutex::new(TimerState::new(Instant::now())))))
        }) {
            Aggregate::Timer(t) => t,
            _ => unreachable!("registry keys include the kind"),
        }
    }

    fn get_or_insert(
        &self,
        name: &str,
        kind: &'static str,
        make: impl FnOnce() -> Aggregate,
    ) -> Aggregate {
        lock(&self.registry)
            .entry((name.to_owned(), kind))
            .or_insert_with(make)
            .clone()
    }

    /// Writes the current value of every aggregated metric, one line each.
    pub fn flush(&self) {
        let entries: Vec<_> = lock(&self.registry)
            .iter()
            .map(|((name, kind), agg)| (name.clone(), *kind, agg.clone()))
            .collect();
        for (name, kind, agg) in entries {
            let measures = match &agg {
                Aggregate::Counter(c) => vec![("count", Num::I(c.count()))],
                Aggregate::Gauge(g) => vec![("value", Num::F(g.value()))],
                Aggregate::Histogram(h) => lock(&h.0).measures(),
                Aggregate::Timer(t) => lock(&t.0).measures(Instant::now()),
            };
            self.write(kind, &name, &measures);
        }
        if let Some(f) = lock(&self.sink).as_mut() {
            let _ = f.flush();
        }
    }

    fn write(&self, kind: &str, name: &str, measures: &[(&str, Num)]) {
        let ts = now_ns();
        let line = metric_line(ts, kind, name, measures);
        if let Some(f) = lock(&self.sink).as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
        if let Some(influx) = &self.influx {
            // The values of the file's line, so that the engine's export of it is the same point.
            let measures = measures
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_f64()))
                .collect();
            influx.metric(
                self.set,
                &MetricLine {
                    ts,
                    kind: kind.to_owned(),
                    name: name.to_owned(),
                    measures,
                },
            );
        }
    }
}

/// Flushes `env`'s results every `results` and its diagnostics every `diagnostics`, forever
/// (the caller aborts it). The first flushes come one period after the start.
pub async fn flush_periodically(env: RunEnv, results: Duration, diagnostics: Duration) {
    use tokio::time::{Instant, MissedTickBehavior, interval_at};
    let now = Instant::now();
    let mut r = interval_at(now + results, results);
    let mut d = interval_at(now + diagnostics, diagnostics);
    r.set_missed_tick_behavior(MissedTickBehavior::Delay);
    d.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = r.tick() => env.r().flush(),
            _ = d.tick() => env.d().flush(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    /// The value the JSON line holds (non-finite floats are written as 0).
    fn as_f64(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) if f.is_finite() => f,
            Num::F(_) => 0.0,
        }
    }
}

/// One metric line, newline included, keys in sdk-go's order.
fn metric_line(ts: i64, kind: &str, name: &str, measures: &[(&str, Num)]) -> String {
    let mut m = String::from("{");
    for (i, (k, v)) in measures.iter().enumerate() {
        if i > 0 {
            m.push(',');
        }
        let v = match v {
            Num::I(i) => i.to_string(),
            // JSON has no NaN or infinity; 0 is what an empty go-metrics sample reports.
            Num::F(f) if f.is_finite() => serde_json::to_string(f).unwrap_or_else(|_| "0".into()),
            Num::F(_) => "0".into(),
        };
        let _ = write!(m, "\"{k}\":{v}");
    }
    m.push('}');
    let name = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into());
    format!("{{\"ts\":{ts},\"type\":\"{kind}\",\"name\":{name},\"measures\":{m}}}\n")
}

/// A counter: `inc`/`dec`; reports `count`.
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicI64>);

impl Counter {
    pub fn inc(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self, n: i64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn count(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge: the last value set; reports `value`.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn update(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn value(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A histogram of values; reports count, min, max, mean, stddev, variance and percentiles.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<Mutex<Samples>>);

impl Histogram {
    pub fn update(&self, v: f64) {
        lock(&self.0).add(v);
    }
    pub fn count(&self) -> u64 {
        lock(&self.0).count
    }
}

/// A timer: a histogram of durations in nanoseconds plus event rates.
#[derive(Clone, Debug)]
pub struct Timer(Arc<Mutex<TimerState>>);

impl Timer {
    /// Records one duration.
    pub fn update(&self, d: Duration) {
        lock(&self.0).add(Instant::now(), d);
    }

    /// Records the time elapsed since `start`.
    pub fn update_since(&self, start: Instant) {
        self.update(start.elapsed());
    }

    /// Runs `f`, records how long it took and returns its result.
    pub fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        self.update_since(start);
        r
    }

    pub fn count(&self) -> u64 {
        lock(&self.0).samples.count
    }
}

/// Exact running statistics plus a bounded sample for percentiles.
#[derive(Debug, Default)]
struct Samples {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    /// Sum of squared deviations (Welford), for the population variance go-metrics reports.
    m2: f64,
    sample: Vec<f64>,
    rng: u64,
}

impl Samples {
    fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.count += 1;
        if self.count == 1 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        if self.sample.len() < SAMPLE_CAP {
            self.sample.push(v);
        } else {
            // Algorithm R: keep each of the `count` values with equal probability.
            let j = (self.next_rand() % self.count) as usize;
            if j < SAMPLE_CAP {
                self.sample[j] = v;
            }
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64; statistical quality is ample for reservoir sampling.
        if self.rng == 0 {
            self.rng = 0x9E37_79B9_7F4A_7C15;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn variance(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.m2 / self.count as f64
        }
    }

    fn measures(&self) -> Vec<(&'static str, Num)> {
        let mut sorted = self.sample.clone();
        sorted.sort_by(f64::total_cmp);
        let var = self.variance();
        vec![
            (
                "count",
                Num::I(i64::try_from(self.count).unwrap_or(i64::MAX)),
            ),
            ("max", Num::F(self.max)),
            ("mean", Num::F(self.mean)),
            ("min", Num::F(self.min)),
            ("stddev", Num::F(var.sqrt())),
            ("variance", Num::F(var)),
            ("p50", Num::F(percentile(&sorted, 0.5))),
            ("p75", Num::F(percentile(&sorted, 0.75))),
            ("p95", Num::F(percentile(&sorted, 0.95))),
            ("p99", Num::F(percentile(&sorted, 0.99))),
            ("p999", Num::F(percentile(&sorted, 0.999))),
            ("p9999", Num::F(percentile(&sorted, 0.9999))),
        ]
    }
}

/// go-metrics' interpolation: position `p * (n + 1)`, clamped to the ends.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let pos = p * (n as f64 + 1.0);
    if pos < 1.0 {
        sorted[0]
    } else if pos >= n as f64 {
        sorted[n - 1]
    } else {
        let lower = sorted[pos as usize - 1];
        let upper = sorted[pos as usize];
        lower + (pos - pos.floor()) * (upper - lower)
    }
}

#[derive(Debug)]
struct TimerState {
    samples: Samples,
    created: Instant,
    /// Events per second since `created`, index = whole seconds elapsed.
    per_second: Vec<u64>,
}

impl TimerState {
    fn new(created: Instant) -> Self {
        TimerState {
            samples: Samples::default(),
            created,
            per_second: Vec::new(),
        }
    }

    fn add(&mut self, now: Instant, d: Duration) {
        self.samples.add(d.as_nanos().min(i64::MAX as u128) as f64);
        let sec = now.saturating_duration_since(self.created).as_secs() as usize;
        if self.per_second.len() <= sec {
            self.per_second.resize(sec + 1, 0);
        }
        self.per_second[sec] += 1;
    }

    fn rate_over(&self, now: Instant, window_secs: u64) -> f64 {
        let elapsed = now.saturating_duration_since(self.created);
        let span = elapsed.as_secs_f64().min(window_secs as f64);
        if span <= 0.0 {
            return 0.0;
        }
        let now_sec = elapsed.as_secs() as usize;
        let first = now_sec.saturating_sub(window_secs as usize - 1);
        let events: u64 = self
            .per_second
            .iter()
            .enumerate()
            .filter(|(s, _)| *s >= first && *s <= now_sec)
            .map(|(_, n)| n)
            .sum();
        events as f64 / span
    }

    fn measures(&self, now: Instant) -> Vec<(&'static str, Num)> {
        let mut m = self.samples.measures();
        let elapsed = now.saturating_duration_since(self.created).as_secs_f64();
        let mean_rate = if elapsed > 0.0 {
            self.samples.count as f64 / elapsed
        } else {
            0.0
        };
        m.push(("m1", Num::F(self.rate_over(now, 60))));
        m.push(("m5", Num::F(self.rate_over(now, 300))));
        m.push(("m15", Num::F(self.rate_over(now, 900))));
        m.push(("meanrate", Num::F(mean_rate)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_go_metrics() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.5);
        assert_eq!(percentile(&v, 0.99), 99.99);
        assert_eq!(percentile(&v, 0.9999), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[3.0], 0.001), 3.0);
    }

    #[test]
    fn histogram_statistics() {
        let mut s = Samples::default();
        for v in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            s.add(v);
        }
        s.add(f64::NAN);
        assert_eq!(s.count, 8);
        assert_eq!(s.mean, 5.0);
        assert_eq!(s.variance(), 4.0);
        assert_eq!((s.min, s.max), (2.0, 9.0));
    }

    #[test]
    fn reservoir_stays_bounded() {
        let mut s = Samples::default();
        for i in 0..(SAMPLE_CAP as u64 + 5000) {
            s.add(i as f64);
        }
        assert_eq!(s.sample.len(), SAMPLE_CAP);
        assert_eq!(s.count, SAMPLE_CAP as u64 + 5000);
    }

    #[test]
    fn timer_rates() {
        let t0 = Instant::now();
        let mut t = TimerState::new(t0);
        for i in 0..10 {
            t.add(t0 + Duration::from_secs(i), Duration::from_millis(5));
        }
        let m = t.measures(t0 + Duration::from_secs(10));
        let get = |k: &str| match m.iter().find(|(n, _)| *n == k).unwrap().1 {
            Num::F(f) => f,
            Num::I(i) => i as f64,
        };
        assert_eq!(get("count"), 10.0);
        assert_eq!(get("mean"), 5_000_000.0);
        assert!((get("meanrate") - 1.0).abs() < 1e-9);
        assert!((get("m1") - 1.0).abs() < 1e-9, "{}", get("m1"));
    }

    #[test]
    fn line_format() {
        let line = metric_line(5, "counter", "n,tag=a", &[("count", Num::I(3))]);
        assert_eq!(
            line,
            "{\"ts\":5,\"type\":\"counter\",\"name\":\"n,tag=a\",\"measures\":{\"count\":3}}\n"
        );
        let line = metric_line(5, "point", "x", &[("value", Num::F(f64::NAN))]);
        assert!(line.contains("{\"value\":0}"));
    }
}
