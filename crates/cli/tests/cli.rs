//! The `testground` binary's own behaviour: flags, errors, exit codes and the local commands
//! (`plan`, `describe`, `version`), each test in a temporary `$TESTGROUND_HOME`. Nothing here
//! builds or runs a plan (see `e2e.rs`), and nothing reaches an address other than loopback.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Home, Out};

const MANIFEST: &str = r#"
name = "demo"

[defaults]
builder = "exec:go"
runner = "local:exec"

[builders."exec:go"]
enabled = true

[runners."local:exec"]
enabled = true

[[testcases]]
name = "ping"
instances = { min = 1, max = 4, default = 2 }

[[testcases]]
name = "storm"
instances = { min = 2, max = 100 }
  [testcases.params]
  conn_count = { type = "int", desc = "number of sockets", default = 5 }
  word = { type = "string", default = "never" }
"#;

#[test]
fn bad_flags_are_usage_errors_on_one_line() {
    let home = Home::new();
    let out = home.run(&["run", "single", "--plan", "x", "--bogus"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.error_line().contains("--bogus"), "{out}");

    // A missing required flag names it.
    let out = home.run(&["describe"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.error_line().contains("--plan"), "{out}");

    // A non-numeric instance count.
    let out = home.run(&[
        "run",
        "single",
        "-p",
        "x",
        "-t",
        "y",
        "-b",
        "exec:go",
        "-r",
        "local:exec",
        "-i",
        "two",
    ]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.error_line().contains("two"), "{out}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let home = Home::new();
    let out = home.run(&["frobnicate"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.error_line().contains("frobnicate"), "{out}");
}

#[test]
fn help_exits_zero() {
    let home = Home::new();
    let out = home.run(&["--help"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("run"), "{out}");
}

#[test]
fn version_prints_the_original_lines() {
    let home = Home::new();
    let out = home.run(&["version"]);
    assert_eq!(out.code, Some(0), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "Testground", "{out}");
    assert!(lines[1].starts_with("Git commit: "), "{out}");
}

#[test]
fn run_single_for_a_missing_plan_names_the_plan() {
    let home = Home::new();
    let out = home.run(&[
        "run",
        "single",
        "--plan",
        "nope",
        "--testcase",
        "ping",
        "--builder",
        "exec:go",
        "--runner",
        "local:exec",
        "--instances",
        "1",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    let e = out.error_line();
    assert!(e.contains("\"nope\"") && e.contains("plan import"), "{out}");
    // The first lines every command prints.
    assert!(
        out.stdout.contains("\tINFO\tcreating home directory at ")
            || out.stdout.contains("\tINFO\tusing home directory: "),
        "{out}"
    );
    assert!(out.stdout.contains("no .env.toml found at "), "{out}");
}

#[test]
fn malformed_manifest_error_names_the_file() {
    let home = Home::new();
    let src = home.plan_src("broken", "name = \"broken\"\n[[testcases]\nname = 1\n");
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    // The manifest is read before the plan is linked: a failed import leaves nothing behind.
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("manifest.toml"), "{out}");
    assert!(
        home.path().join("plans/broken").symlink_metadata().is_err(),
        "{out}"
    );
    // A plan that broke after its import (edited in place) is reported by file.
    std::os::unix::fs::symlink(&src, home.path().join("plans/broken")).unwrap();
    for args in [
        vec!["describe", "--plan", "broken"],
        vec![
            "run",
            "single",
            "-p",
            "broken",
            "-t",
            "ping",
            "-b",
            "exec:go",
            "-r",
            "local:exec",
            "-i",
            "1",
        ],
    ] {
        let out = home.run(&args);
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.error_line().contains("manifest.toml"), "{out}");
    }
}

#[test]
fn import_list_describe_rm() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    let dst = home.path().join("plans/demo");
    assert!(dst.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(out.stdout.contains("created symlink "), "{out}");
    assert!(
        out.stdout
            .contains("imported plans:\ndemo ping\ndemo storm\n"),
        "{out}"
    );

    // Importing again: a warning, exit 0, nothing changed.
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("\tWARN\tdestination dir already exists"),
        "{out}"
    );

    // A nested suite/plan and a custom name.
    let nested = home.plan_src("suite/inner", &MANIFEST.replace("\"demo\"", "\"inner\""));
    let out = home.run(&[
        "plan",
        "import",
        "--from",
        nested.parent().unwrap().to_str().unwrap(),
        "--name",
        "suite",
    ]);
    assert_eq!(out.code, Some(0), "{out}");

    let out = home.run(&["plan", "list"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.ends_with("demo\nsuite/inner\n"), "{out}");
    let out = home.run(&["plan", "list", "--testcases"]);
    assert!(
        out.stdout.ends_with(
            "demo        ping\ndemo        storm\nsuite/inner ping\nsuite/inner storm\n"
        ),
        "{out}"
    );

    let out = home.run(&["describe", "--plan", "demo"]);
    assert_eq!(out.code, Some(0), "{out}");
    let s = &out.stdout;
    for want in [
        "This test plan is called \"demo\".\n\n",
        "It can be built with strategies: [exec:go].\n\n",
        "It can be run with strategies: [local:exec].\n\n",
        "It has 2 test cases.\n\n",
        "TEST CASES:\n----------\n\n",
        "- Test case: ping\n  Instances:\n    minimum: 1\n    maximum: 4\n  Parameters:\n\n",
        "- Test case: storm\n",
        "    conn_count | int    | number of sockets |  | default: 5\n",
        "    word       | string |                   |  | default: never\n",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = home.run(&["describe", "--plan", "suite/inner"]);
    assert!(out.stdout.contains("called \"inner\""), "{out}");

    // rm asks first, removes the link only, never the sources.
    let out = home.run(&["plan", "rm", "--plan", "demo"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("really delete? pass --yes flag to confirm."),
        "{out}"
    );
    assert!(dst.symlink_metadata().is_ok());
    let out = home.run(&["plan", "rm", "--plan", "demo", "--yes"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains(&format!("plan at {} removed.", dst.display())),
        "{out}"
    );
    assert!(dst.symlink_metadata().is_err());
    assert!(src.join("manifest.toml").exists());
    let out = home.run(&["plan", "rm", "--plan", "demo", "--yes"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("not found"), "{out}");
}

#[test]
fn import_rejects_git_and_remote_urls() {
    let home = Home::new();
    let out = home.run(&[
        "plan",
        "import",
        "--git",
        "--from",
        "https://example.invalid/x.git",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("not supported yet"), "{out}");
    let out = home.run(&["plan", "import", "--from", "https://example.invalid/x.git"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.error_line().contains("did you forget to pass --git?"),
        "{out}"
    );
    let out = home.run(&["plan", "import", "--from", "/definitely/not/here"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("/definitely/not/here"), "{out}");
}

#[test]
fn created_plans_are_importable_and_describable() {
    let home = Home::new();
    for (target, files) in [
        ("go", vec!["go.mod", "main.go", "manifest.toml"]),
        ("rust", vec!["Cargo.toml", "src/main.rs", "manifest.toml"]),
    ] {
        let name = format!("new-{target}");
        let out = home.run(&[
            "plan",
            "create",
            "--plan",
            &name,
            "--target",
            target,
            "--module",
            "example.com/new",
        ]);
        assert_eq!(out.code, Some(0), "{out}");
        let dir = home.path().join("plans").join(&name);
        assert!(
            out.stdout
                .contains(&format!("new test plan created under: {}", dir.display())),
            "{out}"
        );
        for f in files {
            assert!(dir.join(f).is_file(), "{target}: {f} missing");
        }
        let out = home.run(&["describe", "--plan", &name]);
        assert_eq!(out.code, Some(0), "{out}");
        assert!(
            out.stdout
                .contains(&format!("This test plan is called \"{name}\".")),
            "{out}"
        );
        assert!(out.stdout.contains("- Test case: quickstart"), "{out}");

        // Moved out and imported back, it is still a plan.
        let moved = home.path().join("moved").join(&name);
        std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
        std::fs::rename(&dir, &moved).unwrap();
        let out = home.run(&["plan", "import", "--from", moved.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{out}");
        assert!(out.stdout.contains(&format!("{name} quickstart")), "{out}");
    }
    let go_mod = std::fs::read_to_string(home.path().join("moved/new-go/go.mod")).unwrap();
    assert!(go_mod.contains("module example.com/new"));
    assert!(go_mod.contains("github.com/testground/sdk-go v0.3.0"));
    let main_go = std::fs::read_to_string(home.path().join("moved/new-go/main.go")).unwrap();
    assert!(main_go.contains("run.Invoke("));
    let cargo = std::fs::read_to_string(home.path().join("moved/new-rust/Cargo.toml")).unwrap();
    assert!(cargo.contains("[workspace]"));
    let manifest =
        std::fs::read_to_string(home.path().join("moved/new-rust/manifest.toml")).unwrap();
    assert!(manifest.contains("[builders.\"exec:rust\"]"));

    let out = home.run(&["plan", "create", "--plan", "x", "--target", "cobol"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("cobol"), "{out}");
    // new-go is taken by the import above.
    let out = home.run(&["plan", "create", "--plan", "new-go"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("already exists"), "{out}");
}

#[test]
fn rust_template_prints_a_success_event() {
    let home = Home::new();
    let out = home.run(&["plan", "create", "--plan", "r", "--target", "rust"]);
    assert_eq!(out.code, Some(0), "{out}");
    let main_rs = std::fs::read_to_string(home.path().join("plans/r/src/main.rs")).unwrap();
    assert!(main_rs.contains("success_event"));
}

#[test]
fn link_sdk_is_rejected_clearly() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    let out = home.run(&[
        "build",
        "single",
        "-p",
        "demo",
        "-b",
        "exec:go",
        "--link-sdk",
        "sdk",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.error_line().contains("--link-sdk is not supported yet"),
        "{out}"
    );
}

#[test]
fn bad_flag_values_name_the_flag() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    let base = [
        "run",
        "single",
        "-p",
        "demo",
        "-t",
        "ping",
        "-b",
        "exec:go",
        "-r",
        "local:exec",
        "-i",
        "1",
    ];
    for (flag, value) in [("--build-cfg", "novalue"), ("--tp", "=x"), ("--dep", "a=b")] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        let out = home.run(&args);
        assert_eq!(out.code, Some(1), "{out}");
        let e = out.error_line();
        assert!(
            e.contains(flag.trim_start_matches('-')) || e.contains("test-param"),
            "{out}"
        );
    }
}

#[test]
fn status_of_an_unknown_task_fails_clearly() {
    let home = Home::new();
    let out = home.run(&["status", "-t", "nonexistent"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("nonexistent"), "{out}");
    assert!(
        out.stdout
            .contains("testground client initialized\t{\"addr\": \"embedded\"}"),
        "{out}"
    );
}

#[test]
fn tasks_on_an_empty_home() {
    let home = Home::new();
    let out = home.run(&["tasks"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "ID", "DATE", "TEST", "PLAN", "TEST", "CASE", "DURATION", "STATE", "TYPE",
                    "OUTCOME"
                ]),
        "{out}"
    );
}

#[test]
fn terminate_needs_exactly_one_component() {
    let home = Home::new();
    let out = home.run(&["terminate"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.error_line().contains("specify something to terminate"),
        "{out}"
    );
    let out = home.run(&["terminate", "--runner", "a", "--builder", "b"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("one at a time"), "{out}");
}

#[test]
fn unreachable_endpoint_is_a_clear_error() {
    let home = Home::new();
    // Port 1 on loopback: nothing listens there.
    let out = home.run(&["--endpoint", "http://127.0.0.1:1", "tasks"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.error_line()
            .contains("cannot reach the daemon at http://127.0.0.1:1"),
        "{out}"
    );
    assert!(
        out.stdout.contains("{\"addr\": \"http://127.0.0.1:1\"}"),
        "{out}"
    );
}

/// A daemon on a free loopback port, stopped (by its pid) when dropped.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(home: &Home, tokens: &[&str]) -> Daemon {
        Daemon::start_with(home, tokens, "")
    }

    /// `daemon_keys` are more `[daemon]` lines of `.env.toml`.
    fn start_with(home: &Home, tokens: &[&str], daemon_keys: &str) -> Daemon {
        let tokens: Vec<String> = tokens.iter().map(|t| format!("{t:?}")).collect();
        std::fs::write(
            home.path().join(".env.toml"),
            format!(
                "[daemon]\nlisten = \"127.0.0.1:0\"\ntokens = [{}]\n{daemon_keys}[sync]\nport = 0\n",
                tokens.join(", ")
            ),
        )
        .unwrap();
        let mut child = home
            .cmd()
            .arg("daemon")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("daemon listening\t{\"addr\": \"").nth(1) {
                    let _ = tx.send(rest.trim_end_matches("\"}").to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("daemon did not report its address");
        Daemon { child, addr }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn remote_mode_talks_to_a_daemon() {
    let home = Home::new();
    let daemon = Daemon::start(&home, &[]);
    let endpoint = format!("http://{}", daemon.addr);
    let out = home.run(&["--endpoint", &endpoint, "tasks"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains(&format!("{{\"addr\": \"{endpoint}\"}}")),
        "{out}"
    );
    assert!(out.stdout.contains("ID  DATE"), "{out}");

    let out = home.run(&["--endpoint", &endpoint, "status", "-t", "nonexistent"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("nonexistent"), "{out}");

    let out = home.run(&[
        "--endpoint",
        &endpoint,
        "healthcheck",
        "--runner",
        "local:exec",
    ]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("finished checking runner local:exec"),
        "{out}"
    );
    assert!(out.stdout.contains("Checks:\n"), "{out}");

    let out = home.run(&[
        "--endpoint",
        &endpoint,
        "collect",
        "nonexistent",
        "-r",
        "local:exec",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("\tERROR\tno such testplan run"),
        "{out}"
    );
    assert!(!home.path().join("nonexistent.tgz").exists());
}

#[test]
fn remote_mode_sends_the_token() {
    let home = Home::new();
    let daemon = Daemon::start(&home, &["s3cret"]);
    let endpoint = format!("http://{}", daemon.addr);
    let out = home.run(&["--endpoint", &endpoint, "tasks"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("403"), "{out}");
    // The client's token comes from the same .env.toml.
    let env = home.path().join(".env.toml");
    let text = std::fs::read_to_string(&env).unwrap();
    std::fs::write(&env, format!("{text}[client]\ntoken = \"s3cret\"\n")).unwrap();
    let out = home.run(&["--endpoint", &endpoint, "tasks"]);
    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn standalone_sidecar_is_rejected_clearly() {
    let home = Home::new();
    let out = home.run(&["sidecar", "--runner", "docker"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("not supported"), "{out}");
    assert!(out.error_line().contains("local:netns"), "{out}");
}

// ---- input checked before anything runs ---------------------------------------------------

/// `run single` of the `demo` plan (never built: every case here fails validation first).
fn run_demo(home: &Home, extra: &[&str]) -> Out {
    let mut args = vec![
        "run",
        "single",
        "-p",
        "demo",
        "-b",
        "exec:go",
        "-r",
        "local:exec",
    ];
    args.extend_from_slice(extra);
    home.run(&args)
}

#[test]
fn bad_test_params_cases_and_counts_name_the_choices() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");

    let out = run_demo(
        &home,
        &["-t", "storm", "-i", "2", "--tp", "conn_count=many"],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.error_line(),
        "error: --test-param: test parameter \"conn_count\": expected an integer (type \"int\"), found \"many\""
    );
    let out = run_demo(&home, &["-t", "storm", "-i", "2", "--tp", "conn=5"]);
    assert_eq!(
        out.error_line(),
        "error: --test-param: unknown test parameter \"conn\": test case storm has parameters [conn_count word]"
    );
    let out = run_demo(&home, &["-t", "strom", "-i", "2"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.error_line(),
        "error: --testcase: test case strom not found in plan demo; its test cases: [ping storm]"
    );
    let out = run_demo(&home, &["-t", "ping", "-i", "0"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.error_line(),
        "error: --instances: expected at least 1 instance; test case ping allows from 1 to 4 instances"
    );
    // Nothing was queued or built for any of them.
    assert!(!out.stdout.contains("queued"), "{out}");

    // A composition names the field.
    let comp = home.path().join("c.toml");
    let write = |params: &str| {
        std::fs::write(
            &comp,
            format!(
                "[global]\nplan = \"demo\"\ncase = \"storm\"\nbuilder = \"exec:go\"\nrunner = \"local:exec\"\n[[groups]]\nid = \"g\"\ninstances = {{ count = 2 }}\n[groups.run]\ntest_params = {{ {params} }}\n"
            ),
        )
        .unwrap()
    };
    write("conn_count = \"1.5\"");
    let out = home.run(&["run", "composition", "-f", comp.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.error_line()
            .contains("c.toml: groups[0].run.test_params.conn_count: test parameter \"conn_count\": expected an integer"),
        "{out}"
    );
}

#[test]
fn plan_list_reports_a_broken_plan_and_lists_the_others() {
    let home = Home::new();
    let good = home.plan_src("demo", MANIFEST);
    let out = home.run(&["plan", "import", "--from", good.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    let bad = home.plan_src("bad", "name = \"bad\"\n[[testcases]]\nname = 3\n");
    let out = home.run(&["plan", "import", "--from", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.error_line().contains("testcases[0].name"), "{out}");
    // Nothing was left behind: the list still works.
    let out = home.run(&["plan", "list", "--testcases"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("demo ping"), "{out}");
    // A plan that breaks after its import is reported; the others are still listed.
    std::os::unix::fs::symlink(&bad, home.path().join("plans/bad")).unwrap();
    let out = home.run(&["plan", "list", "--testcases"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("demo ping") && out.stdout.contains("demo storm"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("WARN\tcannot read test plan; skipped\t{\"plan\": \"bad\""),
        "{out}"
    );
    assert!(
        out.error_line()
            .contains("1 test plan(s) could not be read"),
        "{out}"
    );
    // Nested import names: a failed import removes the directories it made.
    let out = home.run(&[
        "plan",
        "import",
        "--from",
        bad.to_str().unwrap(),
        "--name",
        "suite/bad",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(!home.path().join("plans/suite").exists(), "{out}");
}

#[test]
fn misspelt_env_toml_keys_are_warned_about() {
    let home = Home::new();
    std::fs::write(
        home.path().join(".env.toml"),
        "[client]\nendpont = \"http://127.0.0.1:1\"\n[runners.\"local:exec\"]\nfree_form = 1\n",
    )
    .unwrap();
    let out = home.run(&["tasks"]);
    assert_eq!(out.code, Some(0), "{out}");
    let env = home.path().join(".env.toml");
    assert!(
        out.stdout.contains(&format!(
            "WARN\t{}: unknown key client.endpont (ignored)",
            env.display()
        )),
        "{out}"
    );
    assert!(!out.stdout.contains("free_form"), "{out}");
    // The misspelt endpoint is not used: the command ran embedded.
    assert!(out.stdout.contains("{\"addr\": \"embedded\"}"), "{out}");
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    let daemon = Daemon::start(&home, &[]);
    let endpoint = format!("http://{}", daemon.addr);
    for args in [
        vec!["version"],
        vec!["plan", "list", "--testcases"],
        vec!["describe", "--plan", "demo"],
        vec!["tasks"],
        // `testground tasks | head` in daemon mode panicked with a backtrace.
        vec!["--endpoint", &endpoint, "tasks"],
        vec![
            "--endpoint",
            &endpoint,
            "healthcheck",
            "--runner",
            "local:exec",
        ],
    ] {
        // A pipe whose reader has gone: every write fails with EPIPE.
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let o = home
            .cmd()
            .args(&args)
            .stdout(Stdio::from(writer))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.trim().is_empty(), "{args:?}: {stderr}");
        assert_eq!(o.status.code(), Some(141), "{args:?}: {stderr}");
    }
}

#[test]
fn a_request_over_the_daemons_body_limit_is_refused_clearly() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    // 64 KiB of sources that do not compress against a 16 KiB limit.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let blob: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("blob.bin"), blob).unwrap();
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    let daemon = Daemon::start_with(&home, &[], "max_request_body = \"16KiB\"\n");
    let endpoint = format!("http://{}", daemon.addr);
    let out = home.run(&[
        "--endpoint",
        &endpoint,
        "run",
        "single",
        "-p",
        "demo",
        "-t",
        "ping",
        "-b",
        "exec:go",
        "-r",
        "local:exec",
        "-i",
        "1",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    let e = out.error_line();
    assert!(e.contains("413"), "{out}");
    assert!(
        e.contains("max_request_body") && e.contains("16384 bytes"),
        "{out}"
    );
    // Small requests still pass.
    let out = home.run(&["--endpoint", &endpoint, "tasks"]);
    assert_eq!(out.code, Some(0), "{out}");
}

/// A stand-in daemon on loopback whose task never ends: `/run` queues `FAKE_TASK`, `/logs`
/// streams progress until the client goes away, `/terminate` is recorded and answered, and
/// `/status` always says `processing`. Lets a test see what the CLI does when a cancel does not
/// end the task.
struct NeverEndingDaemon {
    addr: String,
    /// `(path, body)` of every request.
    requests: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

const FAKE_TASK: &str = "dc7fake0000000000000";

impl NeverEndingDaemon {
    fn start() -> NeverEndingDaemon {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let log = log.clone();
                std::thread::spawn(move || Self::serve(conn, &log));
            }
        });
        NeverEndingDaemon { addr, requests }
    }

    fn serve(
        mut conn: std::net::TcpStream,
        log: &std::sync::Mutex<Vec<(String, String)>>,
    ) -> Option<()> {
        use std::io::{Read, Write};
        let mut reader = BufReader::new(conn.try_clone().ok()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).ok()?;
        let path = request_line.split_whitespace().nth(1)?.to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).ok()?;
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        log.lock()
            .unwrap()
            .push((path.clone(), String::from_utf8_lossy(&body).into_owned()));
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n";
        let task = format!(
            r#"{{"priority":1,"id":"{FAKE_TASK}","states":[{{"created":"2026-01-01T00:00:00Z","state":"processing"}}],"type":"run"}}"#
        );
        let one = |result: String| {
            let body = format!("{{\"t\":114,\"p\":{result}}}\n");
            format!("{head}Content-Length: {}\r\n\r\n{body}", body.len())
        };
        match path.as_str() {
            "/run" => conn
                .write_all(one(format!("\"{FAKE_TASK}\"")).as_bytes())
                .ok(),
            "/terminate" => conn.write_all(one("\"Done\"".into()).as_bytes()).ok(),
            "/status" => conn.write_all(one(task).as_bytes()).ok(),
            "/logs" => {
                // No length: the body runs until the connection closes. "hello\n" in base64.
                conn.write_all(format!("{head}\r\n").as_bytes()).ok()?;
                let burst = "{\"t\":112,\"p\":\"aGVsbG8K\"}\n".repeat(100);
                loop {
                    conn.write_all(burst.as_bytes()).ok()?;
                }
            }
            _ => None,
        }
    }

    fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

#[test]
fn ctrl_c_twice_exits_with_the_interrupted_status_when_a_cancel_does_not_end_the_task() {
    let home = Home::new();
    let src = home.plan_src("demo", MANIFEST);
    let out = home.run(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    let daemon = NeverEndingDaemon::start();
    let endpoint = format!("http://{}", daemon.addr);
    let mut child = home
        .cmd()
        .args([
            "--endpoint",
            &endpoint,
            "run",
            "single",
            "-p",
            "demo",
            "-t",
            "ping",
            "-b",
            "exec:go",
            "-r",
            "local:exec",
            "-i",
            "1",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = lines.clone();
    std::thread::spawn(move || {
        for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("heavy output", &|| {
        lines.load(std::sync::atomic::Ordering::Relaxed) > 10_000
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    // The first Ctrl-C asks the daemon to cancel this one task, then waits for its end.
    wait_for("the cancel and a status poll", &|| {
        let paths = daemon.paths();
        paths.iter().any(|p| p == "/terminate") && paths.iter().any(|p| p == "/status")
    });
    let terminate = daemon
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| p == "/terminate")
        .map(|(_, b)| b.clone())
        .unwrap();
    assert_eq!(terminate, format!("{{\"task_id\":\"{FAKE_TASK}\"}}"));
    assert!(child.try_wait().unwrap().is_none(), "it waits for the task");
    // The second one stops waiting.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let interrupted = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            interrupted.elapsed() < Duration::from_secs(2),
            "no exit within 2 s of the second Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("error: interrupted: stopped waiting for task {FAKE_TASK}")
    );
}
