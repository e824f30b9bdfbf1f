//! The image builders against a real Docker engine: each builds a small plan twice (the second
//! is a cache hit), the image runs and prints what the plan says, bad configuration names its
//! key, cancellation stops the build, and purge removes the plan's images.
//!
//! Without an engine (or without the base images, which `tg_docker::base::ensure` makes when it
//! can) the tests print why and pass, unless `TG_REQUIRE_PRIVILEGED=1`: then they fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tg_builder::{Artifact, BuildError, BuildInput, BuildOutput, build, purge};
use tg_docker::{Docker, OneShot, labels};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn required() -> bool {
    std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

fn skip(reason: impl std::fmt::Display) {
    if required() {
        panic!("TG_REQUIRE_PRIVILEGED=1 but {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// The engine with `images` present (made by `ensure` if it can), or `None` after saying why.
async fn engine(images: &[&str]) -> Option<Docker> {
    let docker = match Docker::connect().await {
        Ok(d) => d,
        Err(e) => {
            skip(e);
            return None;
        }
    };
    let say = |line: &str| eprintln!("{line}");
    for image in images {
        if let Err(e) =
            tg_docker::base::ensure(&docker, image, &say, &CancellationToken::new()).await
        {
            skip(e);
            return None;
        }
    }
    Some(docker)
}

/// A plan name no other test (or earlier run) uses, so images never collide.
fn plan_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("tgtest-{prefix}-{}-{nanos:x}", std::process::id())
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
}

fn input(builder: &str, plan: &str, plan_dir: &Path, work_dir: &Path, config: Value) -> BuildInput {
    BuildInput {
        build_id: format!("d0test{:x}", std::process::id()),
        plan: plan.into(),
        plan_dir: plan_dir.to_owned(),
        builder: builder.into(),
        config: config.as_object().cloned().unwrap_or_default(),
        selectors: vec![],
        dependencies: vec![],
        work_dir: work_dir.to_owned(),
    }
}

async fn build_logged(
    input: &BuildInput,
    cancel: &CancellationToken,
) -> (Result<BuildOutput, BuildError>, Vec<String>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let res = build(input, &tx, cancel).await;
    drop(tx);
    let mut lines = Vec::new();
    while let Some(l) = rx.recv().await {
        lines.push(l);
    }
    (res, lines)
}

async fn build_ok(input: &BuildInput) -> BuildOutput {
    let (res, lines) = build_logged(input, &CancellationToken::new()).await;
    match res {
        Ok(out) => out,
        Err(e) => panic!("build failed: {e}\nprogress:\n{}", lines.join("\n")),
    }
}

fn image_id(out: &BuildOutput) -> (&str, &[String]) {
    match &out.artifact {
        Artifact::Image { id, tags } => (id, tags),
        other => panic!("not an image: {other:?}"),
    }
}

/// Builds twice: the first builds, the second finds the image by its tag.
async fn build_twice(input: &BuildInput) -> (BuildOutput, Duration, Duration) {
    let started = Instant::now();
    let first = build_ok(input).await;
    let cold = started.elapsed();
    assert!(!first.cached, "a fresh plan is built");
    let (id, tags) = image_id(&first);
    assert!(id.starts_with("sha256:"), "{id}");
    let repo = format!("tg-plan-{}", input.plan);
    assert!(tags[0].starts_with(&format!("{repo}:")), "{tags:?}");
    assert!(tags.iter().any(|t| t.contains(":build-")), "{tags:?}");

    let started = Instant::now();
    let second = build_ok(input).await;
    let warm = started.elapsed();
    assert!(
        second.cached,
        "unchanged sources and config are a cache hit"
    );
    assert_eq!(image_id(&second).0, id);
    assert_eq!(second.dependencies, first.dependencies);
    (first, cold, warm)
}

/// Runs the image once with `env`, no network; returns its standard output.
async fn run_image(docker: &Docker, id: &str, env: &[(&str, &str)], binds: Vec<String>) -> String {
    let say = |line: &str| eprintln!("  | {line}");
    let out = docker
        .run_once(
            &OneShot {
                image: id.to_owned(),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                binds,
                capture_stdout: true,
                ..Default::default()
            },
            &say,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.exit_code, 0,
        "stdout:\n{stdout}\nstderr tail:\n{}",
        out.tail
    );
    stdout
}

async fn assert_bad_config(builder: &str, plan_dir: &Path, config: Value, key: &str) {
    let work = tempfile::tempdir().unwrap();
    let input = input(builder, "bad", plan_dir, work.path(), config);
    match build_logged(&input, &CancellationToken::new()).await.0 {
        Err(BuildError::BadConfig { key: k, .. }) => assert_eq!(k, key),
        other => panic!("{builder}: expected a bad {key}, got {other:?}"),
    }
}

/// Purges and checks the plan's images are gone.
async fn purge_and_check(docker: &Docker, builder: &str, plan: &str, work: &Path) {
    purge(builder, plan, work).await.unwrap();
    let left = docker.images_of(&format!("tg-plan-{plan}")).await.unwrap();
    assert!(left.is_empty(), "purge left {left:?}");
}

/// Containers this work dir's builds started and did not remove.
async fn step_containers(docker: &Docker, work: &Path) -> Vec<String> {
    let home = std::path::absolute(work).unwrap();
    docker
        .containers_with(&[
            (labels::PURPOSE, "build"),
            (labels::HOME, &home.to_string_lossy()),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect()
}

fn repo_file(rel: &str) -> String {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plans")
        .join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A plan on the published sdk-go (the ping-pong plan's go.mod and go.sum), with a build tag
/// that changes its message and a file that only `.testgroundignore` keeps out of the build.
fn go_plan(dir: &Path) {
    write(
        dir,
        &[
            ("go.mod", &repo_file("network/go.mod")),
            ("go.sum", &repo_file("network/go.sum")),
            (
                "main.go",
                "package main\n\n\
                 import (\n\t\"github.com/testground/sdk-go/run\"\n\t\"github.com/testground/sdk-go/runtime\"\n)\n\n\
                 func main() {\n\trun.Invoke(func(env *runtime.RunEnv) error {\n\
                 \t\tenv.RecordMessage(\"hello from docker:go \" + flavour)\n\t\treturn nil\n\t})\n}\n",
            ),
            (
                "plain.go",
                "//go:build !fancy\n\npackage main\n\nconst flavour = \"plain\"\n",
            ),
            (
                "fancy.go",
                "//go:build fancy\n\npackage main\n\nconst flavour = \"fancy\"\n",
            ),
            ("junk.go", "this is not Go: the ignore file keeps it out\n"),
            (".testgroundignore", "junk.go\n"),
        ],
    );
}

fn sdk_env(outputs: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TEST_PLAN", "p".into()),
        ("TEST_CASE", "c".into()),
        ("TEST_RUN", "x".into()),
        ("TEST_INSTANCE_COUNT", "1".into()),
        ("TEST_GROUP_ID", "single".into()),
        ("TEST_GROUP_INSTANCE_COUNT", "1".into()),
        ("TEST_INSTANCE_PARAMS", "".into()),
        ("TEST_INSTANCE_ROLE", "".into()),
        ("TEST_SIDECAR", "false".into()),
        ("TEST_SUBNET", "127.1.0.0/16".into()),
        ("TEST_START_TIME", "2024-01-01T00:00:00Z".into()),
        ("TEST_OUTPUTS_PATH", outputs.into()),
        ("TEST_TEMP_PATH", outputs.into()),
        ("TEST_CAPTURE_PROFILES", "".into()),
        ("TEST_DISABLE_METRICS", "true".into()),
    ]
}

#[tokio::test]
async fn docker_go_builds_caches_runs_and_purges() {
    let Some(docker) = engine(&[tg_docker::base::GOLANG, tg_docker::base::BUSYBOX]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    go_plan(src.path());
    let plan = plan_name("go");
    let mut inp = input(
        "docker:go",
        &plan,
        src.path(),
        work.path(),
        json!({"enabled": true}),
    );
    inp.selectors = vec!["fancy".into()];
    let (out, cold, warm) = build_twice(&inp).await;
    assert_eq!(
        out.dependencies
            .get("github.com/testground/sdk-go")
            .map(String::as_str),
        Some("v0.3.0"),
        "{:?}",
        out.dependencies
    );

    let outputs = tempfile::tempdir().unwrap();
    let env = sdk_env("/outputs");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let binds = vec![format!("{}:/outputs", outputs.path().display())];
    let stdout = run_image(&docker, image_id(&out).0, &env, binds.clone()).await;
    assert!(stdout.contains("hello from docker:go fancy"), "{stdout}");

    // A one-line change: only the plan's package is compiled again.
    let main = src.path().join("main.go");
    let text = fs::read_to_string(&main)
        .unwrap()
        .replace("hello from", "changed:");
    fs::write(&main, text).unwrap();
    let started = Instant::now();
    let changed = build_ok(&inp).await;
    let edit = started.elapsed();
    assert!(!changed.cached);
    let stdout = run_image(&docker, image_id(&changed).0, &env, binds).await;
    assert!(stdout.contains("changed: docker:go fancy"), "{stdout}");
    eprintln!(
        "docker:go build times: cold {:.1}s, warm (cache hit) {:.2}s, one-line change {:.1}s",
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        edit.as_secs_f64()
    );
    assert!(step_containers(&docker, work.path()).await.is_empty());

    purge_and_check(&docker, "docker:go", &plan, work.path()).await;
    assert!(
        !work.path().join("docker-go.cache").exists(),
        "purge clears the caches"
    );
}

#[tokio::test]
async fn docker_go_extensions_take_the_full_dockerfile_build() {
    let Some(docker) = engine(&[tg_docker::base::GOLANG, tg_docker::base::BUSYBOX]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    go_plan(src.path());
    let plan = plan_name("goext");
    let ext: serde_json::Map<String, Value> = [
        "pre_mod_download",
        "post_mod_download",
        "pre_source_copy",
        "post_source_copy",
        "pre_build",
        "post_build",
        "pre_runtime_copy",
        "post_runtime_copy",
    ]
    .iter()
    .map(|e| ((*e).to_owned(), json!(format!("RUN echo at-{e}"))))
    .collect();
    let inp = input(
        "docker:go",
        &plan,
        src.path(),
        work.path(),
        json!({"dockerfile_extensions": ext}),
    );
    let (res, lines) = build_logged(&inp, &CancellationToken::new()).await;
    let out = res.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    let log = lines.join("\n");
    let mut last = 0;
    for e in ext.keys() {
        let at = log
            .find(&format!("at-{e}"))
            .unwrap_or_else(|| panic!("{e} did not run:\n{log}"));
        assert!(at >= last, "{e} ran out of order");
        last = at;
    }
    assert_eq!(
        out.dependencies
            .get("github.com/testground/sdk-go")
            .map(String::as_str),
        Some("v0.3.0")
    );
    let again = build_ok(&inp).await;
    assert!(again.cached);
    assert_eq!(again.dependencies, out.dependencies);
    let outputs = tempfile::tempdir().unwrap();
    let env = sdk_env("/outputs");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stdout = run_image(
        &docker,
        image_id(&out).0,
        &env,
        vec![format!("{}:/outputs", outputs.path().display())],
    )
    .await;
    assert!(stdout.contains("hello from docker:go plain"), "{stdout}");
    purge_and_check(&docker, "docker:go", &plan, work.path()).await;
}

#[tokio::test]
async fn docker_go_cancel_kills_the_step() {
    let Some(docker) = engine(&[tg_docker::base::GOLANG, tg_docker::base::BUSYBOX]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    go_plan(src.path());
    let plan = plan_name("gocancel");
    let inp = input("docker:go", &plan, src.path(), work.path(), json!({}));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            // The step has started once the shell traces its first command.
            while let Some(line) = rx.recv().await {
                if line.starts_with("+ ") {
                    cancel.cancel();
                    break;
                }
            }
            while rx.recv().await.is_some() {}
        })
    };
    let started = Instant::now();
    let res = build(&inp, &tx, &cancel).await;
    drop(tx);
    watcher.await.unwrap();
    assert!(matches!(res, Err(BuildError::Canceled)), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    // The step's container goes with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = step_containers(&docker, work.path()).await;
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "containers left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    purge_and_check(&docker, "docker:go", &plan, work.path()).await;
}

#[tokio::test]
async fn docker_go_bad_config_names_the_key() {
    let src = tempfile::tempdir().unwrap();
    go_plan(src.path());
    assert_bad_config(
        "docker:go",
        src.path(),
        json!({"go_proxy_mode": "sideways"}),
        "go_proxy_mode",
    )
    .await;
    assert_bad_config(
        "docker:go",
        src.path(),
        json!({"dockerfile_extensions": {"pre_lunch": "RUN true"}}),
        "dockerfile_extensions.pre_lunch",
    )
    .await;
}

fn rust_plan(dir: &Path) {
    write(
        dir,
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"tgplan\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
                 [features]\nfancy = []\n\n[workspace]\n",
            ),
            (
                "src/main.rs",
                "fn main() {\n    let flavour = if cfg!(feature = \"fancy\") { \"fancy\" } else { \"plain\" };\n    \
                 println!(\"hello from docker:rust {flavour}\");\n}\n",
            ),
        ],
    );
}

#[tokio::test]
async fn docker_rust_builds_caches_runs_and_purges() {
    let Some(docker) = engine(&[tg_docker::base::RUST, tg_docker::base::DEBIAN_SLIM]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    rust_plan(src.path());
    let plan = plan_name("rust");
    let mut inp = input("docker:rust", &plan, src.path(), work.path(), json!({}));
    inp.selectors = vec!["fancy".into()];
    let (out, cold, warm) = build_twice(&inp).await;
    eprintln!(
        "docker:rust build times: cold {:.1}s, warm {:.2}s",
        cold.as_secs_f64(),
        warm.as_secs_f64()
    );
    let stdout = run_image(&docker, image_id(&out).0, &[], vec![]).await;
    assert_eq!(stdout.trim(), "hello from docker:rust fancy");
    assert!(step_containers(&docker, work.path()).await.is_empty());
    purge_and_check(&docker, "docker:rust", &plan, work.path()).await;
    let target = work.path().join(format!("docker-rust--{plan}"));
    assert!(!target.exists(), "purge removes the plan's target dir");

    assert_bad_config(
        "docker:rust",
        src.path(),
        json!({"profile": "no such"}),
        "profile",
    )
    .await;
}

#[tokio::test]
async fn docker_generic_builds_with_the_plans_dockerfile() {
    let Some(docker) = engine(&[tg_docker::base::BUSYBOX]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    write(
        src.path(),
        &[
            (
                "gen/Dockerfile",
                &format!(
                    "FROM {}\nARG GREETING=none\nARG PLAN_PATH\n\
                     COPY plan/${{PLAN_PATH}}msg.txt /msg.txt\n\
                     RUN echo \"greeting=${{GREETING}} path=${{PLAN_PATH}}\" > /greeting\n\
                     ENTRYPOINT [\"cat\", \"/msg.txt\", \"/greeting\"]\n",
                    tg_docker::base::BUSYBOX
                ),
            ),
            ("gen/msg.txt", "hello from docker:generic\n"),
            ("secret.txt", "ignored\n"),
            (".testgroundignore", "secret.txt\n"),
        ],
    );
    let plan = plan_name("generic");
    let work_abs = std::path::absolute(work.path()).unwrap();

    // A step container of a build whose engine died: the next build removes it.
    let leftover = docker
        .api()
        .create_container(
            None::<tg_docker::bollard::query_parameters::CreateContainerOptions>,
            tg_docker::bollard::models::ContainerCreateBody {
                image: Some(tg_docker::base::BUSYBOX.to_owned()),
                cmd: Some(vec!["true".to_owned()]),
                labels: Some(
                    [
                        (labels::PURPOSE.to_owned(), "build".to_owned()),
                        (labels::BUILD_ID.to_owned(), "1-1-0-dead".to_owned()),
                        (
                            labels::HOME.to_owned(),
                            work_abs.to_string_lossy().into_owned(),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let inp = input(
        "docker:generic",
        &plan,
        src.path(),
        work.path(),
        json!({"path": "gen/", "build_args": {"GREETING": "hi"}}),
    );
    let (out, _, _) = build_twice(&inp).await;
    let stdout = run_image(&docker, image_id(&out).0, &[], vec![]).await;
    assert_eq!(
        stdout, "hello from docker:generic\ngreeting=hi path=gen/\n",
        "{stdout}"
    );
    let left = step_containers(&docker, work.path()).await;
    assert!(
        left.is_empty(),
        "a dead build's container is removed: {left:?}"
    );
    let _ = docker.remove_container(&leftover.id).await;

    // The ignored file is not in the context: changing it is still a cache hit.
    fs::write(src.path().join("secret.txt"), "changed\n").unwrap();
    assert!(build_ok(&inp).await.cached);

    purge_and_check(&docker, "docker:generic", &plan, work.path()).await;
    assert_bad_config(
        "docker:generic",
        src.path(),
        json!({"path": "gen/", "build_args": 3}),
        "build_args",
    )
    .await;
    assert_bad_config(
        "docker:generic",
        src.path(),
        json!({"path": "nowhere"}),
        "path",
    )
    .await;
}

#[tokio::test]
async fn docker_generic_cancel_stops_the_build() {
    let Some(docker) = engine(&[tg_docker::base::BUSYBOX]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    write(
        src.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM {}\nRUN echo sleeping && sleep 120\n",
                tg_docker::base::BUSYBOX
            ),
        )],
    );
    let plan = plan_name("gencancel");
    let inp = input("docker:generic", &plan, src.path(), work.path(), json!({}));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if line.contains("sleeping") {
                    cancel.cancel();
                }
            }
        })
    };
    let started = Instant::now();
    let res = build(&inp, &tx, &cancel).await;
    drop(tx);
    watcher.await.unwrap();
    assert!(matches!(res, Err(BuildError::Canceled)), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        docker
            .image_id(&format!("tg-plan-{plan}:latest"))
            .await
            .unwrap()
            .is_none()
    );
    purge_and_check(&docker, "docker:generic", &plan, work.path()).await;
}

#[tokio::test]
async fn docker_node_builds_caches_runs_and_purges() {
    let Some(docker) = engine(&[tg_docker::base::NODE]).await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    write(
        src.path(),
        &[
            (
                "package.json",
                "{\n  \"name\": \"tgplan\",\n  \"version\": \"1.0.0\",\n  \"private\": true,\n  \
                 \"scripts\": { \"start\": \"node index.js\" }\n}\n",
            ),
            (
                "package-lock.json",
                "{\n  \"name\": \"tgplan\",\n  \"version\": \"1.0.0\",\n  \"lockfileVersion\": 3,\n  \
                 \"requires\": true,\n  \"packages\": {\n    \"\": { \"name\": \"tgplan\", \"version\": \"1.0.0\" }\n  }\n}\n",
            ),
            (
                "index.js",
                "console.log(`hello from docker:node in ${process.env.PLAN_DIR}`);\n",
            ),
        ],
    );
    let plan = plan_name("node");
    let inp = input("docker:node", &plan, src.path(), work.path(), json!({}));
    let (out, _, _) = build_twice(&inp).await;
    let stdout = run_image(&docker, image_id(&out).0, &[], vec![]).await;
    assert!(
        stdout.contains("hello from docker:node in /plan"),
        "{stdout}"
    );
    purge_and_check(&docker, "docker:node", &plan, work.path()).await;
    assert_bad_config(
        "docker:node",
        src.path(),
        json!({"base_image": 5}),
        "base_image",
    )
    .await;
}

#[tokio::test]
async fn image_builders_are_registered() {
    for id in ["docker:go", "docker:rust", "docker:generic", "docker:node"] {
        let b = tg_builder::lookup(id).unwrap();
        assert_eq!(b.artifact_kind(), tg_builder::ArtifactKind::Image);
    }
    assert!(tg_builder::PLANNED_BUILDERS.is_empty());
}
