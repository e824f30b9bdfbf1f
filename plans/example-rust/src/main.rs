//! A small test plan that speaks the instance contract directly: it reads the
//! `TEST_*` environment and prints event lines in the Go SDK's JSON format, with no
//! Testground SDK. Cases: `ok`, `fail`, `params`, `output`.

use std::collections::BTreeMap;
use std::env;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

struct RunEnv {
    case: String,
    group: String,
    run: String,
    params: BTreeMap<String, String>,
    outputs: PathBuf,
}

impl RunEnv {
    fn from_env() -> Self {
        let var = |name: &str| env::var(name).unwrap_or_default();
        Self {
            case: var("TEST_CASE"),
            group: var("TEST_GROUP_ID"),
            run: var("TEST_RUN"),
            params: parse_params(&var("TEST_INSTANCE_PARAMS")),
            outputs: PathBuf::from(var("TEST_OUTPUTS_PATH")),
        }
    }

    fn emit(&self, event: Value) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let line = json!({
            "ts": ts,
            "msg": "",
            "group_id": self.group,
            "run_id": self.run,
            "event": event,
        });
        println!("{line}");
    }

    fn message(&self, message: &str) {
        self.emit(json!({ "message_event": { "message": message } }));
    }
}

/// Same rules as sdk-go: `k=v` pairs joined by `|`; entries that do not split into
/// exactly two parts are dropped.
fn parse_params(raw: &str) -> BTreeMap<String, String> {
    raw.split('|')
        .filter_map(|pair| {
            let parts: Vec<&str> = pair.split('=').collect();
            match parts.as_slice() {
                [k, v] => Some((k.to_string(), v.to_string())),
                _ => None,
            }
        })
        .collect()
}

fn run_case(env: &RunEnv) -> Result<(), String> {
    match env.case.as_str() {
        "ok" => {
            env.message("example-rust ok");
            Ok(())
        }
        "fail" => Err("example-rust failure requested".to_string()),
        "params" => {
            let params = serde_json::to_string(&env.params).map_err(|e| e.to_string())?;
            env.message(&format!("params: {params}"));
            Ok(())
        }
        "output" => {
            let path = env.outputs.join("hello.txt");
            std::fs::write(&path, "hello").map_err(|e| format!("write {}: {e}", path.display()))?;
            env.message(&format!("wrote {}", path.display()));
            Ok(())
        }
        other => Err(format!("unrecognized test case: {other}")),
    }
}

fn main() {
    let env = RunEnv::from_env();
    env.emit(json!({ "start_event": { "runenv": {
        "plan": env::var("TEST_PLAN").unwrap_or_default(),
        "case": env.case,
        "run": env.run,
        "params": env.params,
        "group": env.group,
    } } }));
    match run_case(&env) {
        Ok(()) => env.emit(json!({ "success_event": { "group": env.group } })),
        Err(error) => {
            env.emit(json!({ "failure_event": { "group": env.group, "error": error } }));
            std::process::exit(1);
        }
    }
}
