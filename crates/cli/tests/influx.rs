//! Metrics export to a real InfluxDB 1.x (`influxd` from Debian's `influxdb` package), started
//! by the test on loopback with its own configuration and data in a temporary directory.
//!
//! Skips with a reason when `influxd` is not installed; fails instead when
//! `TG_REQUIRE_PRIVILEGED=1` (CI installs it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Home, free_port, queued_id, text};
use serde_json::Value;

fn influxd_binary() -> Option<PathBuf> {
    let found = ["/usr/bin/influxd", "/usr/local/bin/influxd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!(
                "TG_REQUIRE_PRIVILEGED=1 but influxd is not installed (Debian package influxdb)"
            );
        }
        eprintln!("skipping: influxd is not installed (Debian package influxdb)");
    }
    found
}

/// An `influxd` bound to loopback only, with its files in a temporary directory; killed on drop
/// (a failing assertion included).
struct Influxd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Influxd {
    fn start(bin: &Path) -> Influxd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let rpc = free_port();
        let d = dir.path().display();
        // The stock configuration reports usage to InfluxData and binds every interface: never
        // use it. Everything here stays on loopback and in the temporary directory.
        let config = format!(
            r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"#
        );
        let path = dir.path().join("influxdb.conf");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("influxd.log")).unwrap();
        let child = Command::new(bin)
            .args(["run", "-config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut db = Influxd { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/ping", "").map(|(s, _)| s) != Some(204) {
            if Instant::now() > deadline || db.child.try_wait().unwrap().is_some() {
                panic!("influxd did not start:\n{}", db.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        db.query("CREATE DATABASE testground");
        db
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// Runs an InfluxQL statement; returns the first result's series.
    fn query(&self, q: &str) -> Vec<Value> {
        let (status, body) = http(
            self.port,
            "POST",
            &format!("/query?db=testground&q={}", urlencode(q)),
            "",
        )
        .expect("influxd answers");
        assert_eq!(status, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["results"][0].get("error").is_none(), "{q}: {body}");
        v["results"][0]["series"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Points of the measurements matching `regex` in run `run`: per series, the largest
    /// `count_<field>` (every point of a measurement has all its fields).
    fn points(&self, regex: &str, run: &str) -> u64 {
        self.query(&format!(
            "SELECT count(*) FROM /{regex}/ WHERE run = '{run}'"
        ))
        .iter()
        .map(|s| {
            s["values"][0]
                .as_array()
                .unwrap()
                .iter()
                .skip(1)
                .filter_map(Value::as_u64)
                .max()
                .unwrap_or(0)
        })
        .sum()
    }

    /// Lifecycle event points of run `run`, per `event_type`.
    fn events(&self, run: &str) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .query(&format!(
                "SELECT count(\"count\") FROM events WHERE run = '{run}' GROUP BY event_type"
            ))
            .iter()
            .map(|s| {
                (
                    s["tags"]["event_type"].as_str().unwrap().to_string(),
                    s["values"][0][1].as_u64().unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-shot HTTP/1.0 exchange on loopback: (status, body), `None` if nobody answers.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Metric lines of a run's files, per set, over all its instances.
fn metric_lines(home: &Home, plan: &str, run: &str, file: &str) -> u64 {
    let dir = home
        .path()
        .join(format!("data/outputs/local_exec/{plan}/{run}"));
    let mut n = 0;
    for g in std::fs::read_dir(dir).unwrap().flatten() {
        for i in std::fs::read_dir(g.path()).unwrap().flatten() {
            let text = std::fs::read_to_string(i.path().join(file)).unwrap_or_default();
            n += text
                .lines()
                .filter(|l| tg_api::metrics::MetricLine::parse(l).is_some())
                .count() as u64;
        }
    }
    n
}

fn run(home: &Home, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = home
        .cmd()
        .env_remove("INFLUXDB_URL")
        .args(args)
        .output()
        .unwrap();
    (out, start.elapsed())
}

fn exported(out: &Output) -> u64 {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s
        .lines()
        .find(|l| l.contains("exported ") && l.contains(" metric points to InfluxDB"))
        .unwrap_or_else(|| panic!("no export line in:\n{}", text(out)));
    let rest = &line[line.find("exported ").unwrap() + "exported ".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn runs_are_queryable_in_influxdb_and_a_dead_one_costs_a_warning() {
    let Some(bin) = influxd_binary() else { return };
    let db = Influxd::start(&bin);
    let home = Home::new();
    std::fs::write(
        home.path().join(".env.toml"),
        format!("[daemon]\ninfluxdb_endpoint = \"{}\"\n", db.url()),
    )
    .unwrap();
    home.import("placebo");
    home.import("example-sdk");

    // sdk-go, two instances: local:exec instances get INFLUXDB_URL and write their own points;
    // the engine's export of the same lines overwrites them, so points = lines.
    let (out, _) = run(
        &home,
        &[
            "run",
            "single",
            "--plan",
            "placebo",
            "--testcase",
            "metrics",
            "--builder",
            "exec:go",
            "--runner",
            "local:exec",
            "--instances",
            "2",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let results = metric_lines(&home, "placebo", &id, "results.out");
    let diagnostics = metric_lines(&home, "placebo", &id, "diagnostics.out");
    assert!(
        results >= 2 * 3,
        "point, counter, histogram per instance: {results}"
    );
    assert_eq!(db.points(r"^results\.placebo-metrics\.", &id), results);
    assert_eq!(
        db.points(r"^diagnostics\.placebo-metrics\.", &id),
        diagnostics
    );
    assert_eq!(exported(&out), results + diagnostics);
    // The original's names and tags.
    let series = db.query(&format!(
        "SELECT * FROM \"results.placebo-metrics.answer.point\" WHERE run = '{id}'"
    ));
    assert_eq!(series.len(), 1, "{series:?}");
    let cols: Vec<&str> = series[0]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["group_id", "kind", "run", "value"] {
        assert!(cols.contains(&c), "{cols:?}");
    }
    assert_eq!(series[0]["values"].as_array().unwrap().len(), 2);
    assert!(db.points(r"^results\.placebo-metrics\.iterations\.counter$", &id) >= 2);
    assert!(db.points(r"^results\.placebo-metrics\.value\.histogram$", &id) >= 2);
    // A diagnostics counter, an integer field for sdk-go and for the engine alike.
    assert!(db.points(r"^diagnostics\.placebo-metrics\.ticks\.counter$", &id) >= 2);
    // Lifecycle events: sdk-go's own, not doubled by the engine.
    assert_eq!(
        db.events(&id),
        vec![("SuccessEvent".into(), 2), ("start_event".into(), 2)]
    );

    // The Rust SDK, with INFLUXDB_URL: the same identity of points.
    let rust = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "single",
            "--plan",
            "example-sdk",
            "--testcase",
            "metrics",
            "--builder",
            "exec:rust",
            "--runner",
            "local:exec",
            "-i",
            "2",
            "--build-cfg",
            "profile=dev",
            "--wait",
        ];
        args.extend_from_slice(extra);
        run(&home, &args)
    };
    let (out, _) = rust(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let results = metric_lines(&home, "example-sdk", &id, "results.out");
    let diagnostics = metric_lines(&home, "example-sdk", &id, "diagnostics.out");
    assert!(results >= 2 * 5, "{results}");
    assert_eq!(db.points(r"^results\.example-sdk-metrics\.", &id), results);
    assert_eq!(
        db.points(r"^diagnostics\.example-sdk-metrics\.", &id),
        diagnostics
    );
    assert_eq!(
        db.points(r"^results\.example-sdk-metrics\.value\.histogram$", &id),
        metric_lines_named(&home, &id, "value")
    );
    assert_eq!(
        db.events(&id),
        vec![("SuccessEvent".into(), 2), ("start_event".into(), 2)]
    );

    // Instances told no URL (an explicit empty run config wins): only the engine writes, the
    // lifecycle events included.
    let (out, _) = rust(&["--run-cfg", "influxdb_url="]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let results = metric_lines(&home, "example-sdk", &id, "results.out");
    let diagnostics = metric_lines(&home, "example-sdk", &id, "diagnostics.out");
    assert_eq!(db.points(r"^results\.example-sdk-metrics\.", &id), results);
    assert_eq!(
        db.points(r"^diagnostics\.example-sdk-metrics\.", &id),
        diagnostics
    );
    assert_eq!(
        db.events(&id),
        vec![("SuccessEvent".into(), 2), ("start_event".into(), 2)]
    );
    assert_eq!(exported(&out), results + diagnostics + 4);

    // --disable-metrics: nothing exported.
    let (out, _) = rust(&["--disable-metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    assert_eq!(db.points(r"^results\.", &id), 0);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("metric points to InfluxDB"));

    // InfluxDB stopped: the run succeeds; one warning in the task log; no long wait.
    drop(db);
    let (out, took) = rust(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    let warnings: Vec<&str> = s
        .lines()
        .filter(|l| l.contains("influxdb: metrics export failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{s}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        s.contains("run finished with outcome = success (single:2/2)"),
        "{s}"
    );
    eprintln!("run with InfluxDB stopped took {took:?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

/// Lines of the histogram `name` in a Rust SDK run's results.
fn metric_lines_named(home: &Home, run: &str, name: &str) -> u64 {
    let dir = home
        .path()
        .join(format!("data/outputs/local_exec/example-sdk/{run}/single"));
    let mut n = 0;
    for i in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(i.path().join("results.out")).unwrap();
        n += text
            .lines()
            .filter_map(tg_api::metrics::MetricLine::parse)
            .filter(|m| m.base_name() == name && m.kind == "histogram")
            .count() as u64;
    }
    n
}
