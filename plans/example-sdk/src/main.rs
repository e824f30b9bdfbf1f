//! An example test plan on tg-sdk: one case per SDK feature.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use tg_sdk::{CaseResult, InitContext, RunEnv, TestCase};

fn main() {
    tg_sdk::invoke([
        ("ok", TestCase::plain(ok)),
        ("params", TestCase::plain(params)),
        ("sync", TestCase::initialized(sync)),
        ("barriers", TestCase::initialized(barriers)),
        ("metrics", TestCase::plain(metrics)),
        ("output", TestCase::plain(output)),
        ("panic", TestCase::plain(crash)),
    ]);
}

fn ok(env: &RunEnv) -> CaseResult {
    env.record_message(format!(
        "hello from instance of group {} ({} instances)",
        env.test_group_id, env.test_instance_count
    ));
    Ok(())
}

fn params(env: &RunEnv) -> CaseResult {
    let greeting = env.string_param("greeting")?;
    let count = env.int_param("count")?;
    let ratio = env.float_param("ratio")?;
    let verbose = env.bool_param("verbose")?;
    let chunk = env.size_param("chunk")?;
    let peers = env.string_array_param("peers")?;
    let ports = env.int_array_param("ports")?;
    env.record_message(format!(
        "greeting={greeting} count={count} ratio={ratio} verbose={verbose} chunk={chunk} \
         peers={peers:?} ports={ports:?}"
    ));
    Ok(())
}

/// Every instance publishes its sequence number; each checks it saw everyone's.
async fn sync(env: &RunEnv, ic: &InitContext) -> CaseResult {
    let n = env.test_instance_count;
    ic.wait_all_instances_initialized().await?;
    let mut sub = ic.sync.subscribe::<u64>("hello")?;
    ic.sync.publish("hello", &ic.global_seq).await?;
    let mut seen = BTreeSet::new();
    while seen.len() < n as usize {
        let seq = sub.next().await.ok_or("subscription ended early")??;
        seen.insert(seq);
    }
    if seen != (1..=n).collect::<BTreeSet<u64>>() {
        return Err(format!("saw {seen:?} from {n} instances").into());
    }
    env.record_message(format!("instance {} saw all {n} instances", ic.global_seq));
    // Nobody leaves before everyone has checked.
    ic.sync.signal_and_wait("done", n as i64).await?;
    Ok(())
}

/// `rounds` barriers of all instances, one after the other: the load of many live instances
/// on the sync service and the engine (the 10,000-instance benchmark).
async fn barriers(env: &RunEnv, ic: &InitContext) -> CaseResult {
    let n = env.test_instance_count as i64;
    let rounds = env.int_param("rounds")?;
    for round in 0..rounds {
        ic.sync
            .signal_and_wait(&format!("round-{round}"), n)
            .await?;
    }
    if ic.global_seq == 1 {
        env.record_message(format!("{n} instances passed {rounds} barriers"));
    }
    Ok(())
}

fn metrics(env: &RunEnv) -> CaseResult {
    let samples = env.int_param("samples")?;
    let hist = env.r().histogram("value");
    let count = env.r().counter("iterations");
    let timer = env.r().timer("work");
    for i in 0..samples {
        hist.update(i as f64);
        count.inc(1);
        timer.time(|| std::thread::sleep(Duration::from_micros(50)));
    }
    env.r().record_point("final", samples as f64);
    env.r().gauge("last").update((samples - 1) as f64);
    env.d().record_point("diagnostic", 1.0);
    for i in 0..env.int_param("points")? {
        env.r().record_point("step", i as f64);
    }
    if env.bool_param("fail")? {
        return Err("failing on purpose, after recording the metrics".into());
    }
    Ok(())
}

fn output(env: &RunEnv) -> CaseResult {
    let mut f = env.create_raw_asset("greeting.txt")?;
    writeln!(f, "hello from {}", env.test_group_id)?;
    env.record_message(format!(
        "wrote {}",
        env.test_outputs_path().join("greeting.txt").display()
    ));
    Ok(())
}

fn crash(_env: &RunEnv) -> CaseResult {
    panic!("this case panics on purpose");
}
