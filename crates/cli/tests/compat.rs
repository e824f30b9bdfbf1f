//! sdk-go compatibility suite: the published Go SDK (v0.3.0, plans/sync-compat) against the
//! engine's sync service, through the real `testground` binary in embedded mode. Each test has
//! its own temporary `$TESTGROUND_HOME`; Go's build cache is shared, so rebuilding per home is
//! cheap.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Instant;

use common::{Home, queued_id, text};

const PLAN: &str = "sync-compat";
const N: usize = 30;

/// A fresh home with sync-compat imported.
fn compat_home() -> Home {
    let home = Home::new();
    home.import(PLAN);
    home
}

/// What the compatibility suite adds to [`Home`].
trait CompatHome {
    fn run_single(&self, case: &str, n: usize) -> (Output, String);
    fn instance_dir(&self, id: &str, group: &str, i: usize) -> PathBuf;
    fn panicked(&self, id: &str, group: &str, n: usize) -> Vec<usize>;
    fn run_out(&self, id: &str, group: &str, i: usize) -> String;
}

impl CompatHome for Home {
    /// `run single` of one case with `n` instances; returns the output and the run id.
    fn run_single(&self, case: &str, n: usize) -> (Output, String) {
        let n = n.to_string();
        let started = Instant::now();
        let out = self.tg(&[
            "run",
            "single",
            "-p",
            PLAN,
            "-t",
            case,
            "-b",
            "exec:go",
            "-r",
            "local:exec",
            "-i",
            &n,
            "--wait",
        ]);
        // Visible with --nocapture; useful to keep an eye on the suite's cost in CI.
        eprintln!("{case} x{n}: {:?}", started.elapsed());
        let id = queued_id(&out);
        (out, id)
    }

    fn instance_dir(&self, id: &str, group: &str, i: usize) -> PathBuf {
        self.path()
            .join(format!("data/outputs/local_exec/{PLAN}/{id}/{group}/{i}"))
    }

    /// Instances of `group` whose run.err mentions a panic. A panic after success means the
    /// Go client's `Close()` failed, i.e. the close handshake did not complete.
    fn panicked(&self, id: &str, group: &str, n: usize) -> Vec<usize> {
        (0..n)
            .filter(|&i| {
                let path = self.instance_dir(id, group, i).join("run.err");
                let err = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                err.contains("panic")
            })
            .collect()
    }

    fn run_out(&self, id: &str, group: &str, i: usize) -> String {
        let path = self.instance_dir(id, group, i).join("run.out");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// A case where every instance must succeed: exit 0, N/N, no panic in any run.err, and the
/// plan's own completion message (`marker`) in the run.out of exactly `with_marker` instances,
/// which proves the checks in the plan actually ran.
fn assert_all_succeed(case: &str, marker: &str, with_marker: usize) {
    let home = compat_home();
    let (out, id) = home.run_single(case, N);
    assert!(out.status.success(), "{case}: {}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains(&format!(
            "run finished with outcome = success (single:{N}/{N})"
        )),
        "{case}: {s}"
    );
    let panicked = home.panicked(&id, "single", N);
    assert!(panicked.is_empty(), "{case}: panics in {panicked:?}");
    let marked = (0..N)
        .filter(|&i| home.run_out(&id, "single", i).contains(marker))
        .count();
    assert_eq!(marked, with_marker, "{case}: instances with {marker:?}");
}

/// A case where the instance with GlobalSeq 1 must fail: exit 1, (N-1)/N.
fn assert_one_fails(case: &str) -> (Home, String) {
    let home = compat_home();
    let (out, id) = home.run_single(case, N);
    assert_eq!(out.status.code(), Some(1), "{case}: {}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    let ok = N - 1;
    assert!(
        s.contains(&format!(
            "run finished with outcome = failure (single:{ok}/{N})"
        )),
        "{case}: {s}"
    );
    (home, id)
}

/// `(global_seq, group_seq)` from the plan's `compat seq:` message in run.out.
fn seqs(run_out: &str) -> (usize, usize) {
    let line = run_out
        .lines()
        .find(|l| l.contains("compat seq: "))
        .unwrap_or_else(|| panic!("no seq message in:\n{run_out}"));
    let field = |name: &str| -> usize {
        let rest = &line[line.find(name).unwrap() + name.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    (field("global_seq="), field("group_seq="))
}

#[test]
fn seq_global_seqs_are_a_permutation() {
    assert_all_succeed("seq", "compat seq: ", N);
}

#[test]
fn seq_group_seqs_are_a_permutation_per_group() {
    let home = compat_home();
    let comp = home.path().join("seq-groups.toml");
    std::fs::write(
        &comp,
        format!(
            r#"
[metadata]
name = "seq-groups"

[global]
plan = "{PLAN}"
case = "seq"
builder = "exec:go"
runner = "local:exec"
total_instances = 30

[[groups]]
id = "big"
instances = {{ count = 20 }}

[[groups]]
id = "small"
instances = {{ count = 10 }}
"#
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = home.tg(&["run", "composition", "-f", comp.to_str().unwrap(), "--wait"]);
    eprintln!("seq composition 20+10: {:?}", started.elapsed());
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("run finished with outcome = success (big:20/20, small:10/10)"),
        "{s}"
    );

    let mut globals = Vec::new();
    for (group, n) in [("big", 20), ("small", 10)] {
        assert!(home.panicked(&id, group, n).is_empty(), "{group}");
        let mut group_seqs = Vec::new();
        for i in 0..n {
            let (global, in_group) = seqs(&home.run_out(&id, group, i));
            globals.push(global);
            group_seqs.push(in_group);
        }
        group_seqs.sort_unstable();
        assert_eq!(group_seqs, (1..=n).collect::<Vec<_>>(), "{group}");
    }
    globals.sort_unstable();
    assert_eq!(globals, (1..=30).collect::<Vec<_>>());
}

#[test]
fn barriers_ten_rounds() {
    assert_all_succeed("barriers", "compat barriers: 10 rounds passed", N);
}

#[test]
fn pubsub_all_to_all() {
    assert_all_succeed(
        "pubsub",
        &format!("compat pubsub: received all {N} items"),
        N,
    );
}

#[test]
fn late_subscriber_gets_the_full_history() {
    // Only instance 1 subscribes late; it alone reports the replay.
    assert_all_succeed(
        "late-subscriber",
        &format!("compat late-subscriber: replayed all {N} items"),
        1,
    );
}

#[test]
fn failure_of_one_instance_fails_only_that_instance() {
    let (home, id) = assert_one_fails("failure");
    // Returning an error is not a panic: every client still closes cleanly.
    let panicked = home.panicked(&id, "single", N);
    assert!(panicked.is_empty(), "panics in {panicked:?}");
}

#[test]
fn panic_of_one_instance_fails_only_that_instance() {
    let (home, id) = assert_one_fails("panic");
    // Only the instance that panicked on purpose shows a panic.
    let panicked = home.panicked(&id, "single", N);
    assert_eq!(panicked.len(), 1, "panics in {panicked:?}");
    let i = panicked[0];
    let run_out = home.run_out(&id, "single", i);
    assert!(run_out.contains("crash_event"), "{run_out}");
    assert!(run_out.contains("sync-compat panic requested"), "{run_out}");
}
