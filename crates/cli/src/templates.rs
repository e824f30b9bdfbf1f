//! Templates for `testground plan create`: the smallest plans that build and succeed.
//!
//! The original fetched its templates from `testground/plan-templates`; we ship them in the
//! binary so creating a plan needs no network.

/// Files (relative path, contents) of a new plan.
pub fn files(target: &str, name: &str, module: &str) -> Option<Vec<(&'static str, String)>> {
    match target {
        "go" => Some(go(name, module)),
        "rust" => Some(rust(name)),
        _ => None,
    }
}

fn go(name: &str, module: &str) -> Vec<(&'static str, String)> {
    let go_mod =
        format!("module {module}\n\ngo 1.16\n\nrequire github.com/testground/sdk-go v0.3.0\n");
    let main_go = r#"package main

import (
	"github.com/testground/sdk-go/run"
	"github.com/testground/sdk-go/runtime"
)

func main() {
	run.Invoke(test)
}

func test(runenv *runtime.RunEnv) error {
	runenv.RecordMessage("Hello, Testground!")
	return nil
}
"#
    .to_string();
    let manifest = format!(
        r#"name = "{name}"

[defaults]
builder = "exec:go"
runner = "local:exec"

[builders."exec:go"]
enabled = true
module_path = "{module}"

[builders."docker:go"]
enabled = true
module_path = "{module}"
exec_pkg = "."

[runners."local:exec"]
enabled = true

[runners."local:netns"]
enabled = true

[[testcases]]
name = "quickstart"
instances = {{ min = 1, max = 5, default = 1 }}
"#
    );
    vec![
        ("go.mod", go_mod),
        ("main.go", main_go),
        ("manifest.toml", manifest),
    ]
}

/// A crate name cargo accepts, derived from the plan name (which may be `suite/plan`).
fn crate_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').to_string();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s = format!("plan-{s}");
    }
    s
}

fn rust(name: &str) -> Vec<(&'static str, String)> {
    let cargo = format!(
        r#"[package]
name = "{}"
version = "0.1.0"
edition = "2021"

# A plan is its own workspace, so it builds even when it sits inside another one.
[workspace]

[dependencies]
"#,
        crate_name(name)
    );
    // No SDK dependency: the event lines are the whole contract, and a plan without
    // dependencies builds offline.
    let main_rs = r#"//! A minimal Testground test plan: it reports success.

use std::time::{SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() {
    let group = std::env::var("TEST_GROUP_ID").unwrap_or_default();
    let case = std::env::var("TEST_CASE").unwrap_or_default();
    let message = format!("Hello, Testground! (test case {case})");
    println!(
        "{{\"ts\":{},\"event\":{{\"message_event\":{{\"message\":{}}}}}}}",
        now_ns(),
        json_str(&message)
    );
    println!(
        "{{\"ts\":{},\"event\":{{\"success_event\":{{\"group\":{}}}}}}}",
        now_ns(),
        json_str(&group)
    );
}
"#
    .to_string();
    let manifest = format!(
        r#"name = "{name}"

[defaults]
builder = "exec:rust"
runner = "local:exec"

[builders."exec:rust"]
enabled = true

[runners."local:exec"]
enabled = true

[runners."local:netns"]
enabled = true

[[testcases]]
name = "quickstart"
instances = {{ min = 1, max = 5, default = 1 }}
"#
    );
    vec![
        ("Cargo.toml", cargo),
        ("src/main.rs", main_rs),
        ("manifest.toml", manifest),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_names_are_valid() {
        assert_eq!(crate_name("suite/My_Plan"), "suite-my-plan");
        assert_eq!(crate_name("1st"), "plan-1st");
    }

    #[test]
    fn unknown_target() {
        assert!(files("python", "x", "m").is_none());
        assert_eq!(files("rust", "x", "m").unwrap().len(), 3);
    }
}
