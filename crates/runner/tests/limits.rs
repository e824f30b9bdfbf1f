//! Bounded memory against hostile instance output. A test binary of its own, so that the
//! process's peak memory is this test's alone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tg_api::task::{GroupOutcome, Outcome};
use tg_runner::{LineKind, MAX_LINE, RunGroup, RunInput, RunnerEvent, run};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Peak resident memory of this process so far, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_line_is_cut_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("long.sh");
    // 1 GiB without a newline, then a newline and the success event on its own line.
    std::fs::write(
        &script,
        "#!/bin/sh\nhead -c 1073741824 /dev/zero | tr '\\0' a\necho\n\
         echo '{\"ts\":1,\"event\":{\"success_event\":{\"group\":\"g\"}}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let input = RunInput {
        run_id: "longline".into(),
        plan: "plan".into(),
        case: "case".into(),
        runner: "local:exec".into(),
        total_instances: 1,
        groups: vec![RunGroup {
            id: "g".into(),
            instances: 1,
            artifact: script.to_str().unwrap().into(),
            params: BTreeMap::new(),
            profiles: BTreeMap::new(),
        }],
        run_config: serde_json::Map::new(),
        outputs_root: dir.path().join("outputs"),
        sync_host: "127.0.0.1".into(),
        sync_port: 5151,
        disable_metrics: true,
        timeout: Duration::from_secs(600),
        sync_service: None,
    };
    let before = peak_rss_kib();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let out = run(input, tx, CancellationToken::new()).await.unwrap();
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    println!("peak memory grew by {grown_mib} MiB for a 1 GiB line");
    assert!(grown_mib < 100, "peak memory grew by {grown_mib} MiB");
    assert_eq!(out.result.outcome, Outcome::Success);
    assert_eq!(out.result.outcomes["g"], GroupOutcome { ok: 1, total: 1 });
    // The line reached the log cut to MAX_LINE; the file has all of it.
    let mut longest = 0;
    while let Ok(e) = rx.try_recv() {
        if let RunnerEvent::Instance(l) = e
            && l.kind == LineKind::Other
        {
            longest = longest.max(l.text.len());
        }
    }
    assert_eq!(longest, MAX_LINE);
    let run_out = out.outputs_dir.join("g/0/run.out");
    let len = std::fs::metadata(&run_out).unwrap().len();
    assert!(len > 1 << 30, "run.out has {len} bytes");
}
