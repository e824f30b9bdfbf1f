//! Against the real Docker engine. Without one, each test says why and passes, except with
//! `TG_REQUIRE_PRIVILEGED=1` (CI), where a missing engine fails them.
//!
//! Other engineers' tests use the default-named base images at the same time: these tests never
//! remove them; recipes are checked under test-only tags (`tg-test-docker/…`), removed after.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tg_docker::base::{self, BUSYBOX, DEFAULTS, PAUSE};
use tg_docker::bollard::models::ContainerCreateBody;
use tg_docker::bollard::query_parameters::{
    CreateContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use tg_docker::{Context, Docker, DockerError, OneShot, labels};
use tokio_util::sync::CancellationToken;

/// The engine, or `None` (after saying why) when there is none and none is required.
async fn engine() -> Option<Docker> {
    match Docker::connect().await {
        Ok(d) => Some(d),
        Err(e) if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("TG_REQUIRE_PRIVILEGED=1 and no usable Docker engine: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no usable Docker engine: {e}");
            None
        }
    }
}

/// A name no other test or process uses.
fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes test images by tag (never by id: a test tag may share its id with a default image)
/// when the test ends, passed or not.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        let tags = std::mem::take(&mut self.0);
        // Its own runtime: this runs in a test's runtime, maybe while it unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                if let Ok(d) = Docker::connect().await {
                    for t in tags {
                        let _ = d.remove_image(&t).await;
                    }
                }
            });
        })
        .join();
    }
}

/// Progress lines, kept.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Lines {
    fn sink(&self) -> impl Fn(&str) + Send + Sync + '_ {
        |l: &str| self.0.lock().unwrap().push(l.to_string())
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn quiet(_: &str) {}

/// The busybox recipe under a fixed test tag, made once and kept between runs (2 MB): the
/// one-shot tests need a shell and must not depend on the default-named image.
const TEST_BUSYBOX: &str = "tg-test-docker/busybox:engine-tests";

async fn test_busybox(docker: &Docker) -> String {
    base::ensure_as(
        docker,
        BUSYBOX,
        TEST_BUSYBOX,
        &quiet,
        &CancellationToken::new(),
    )
    .await
    .expect("the busybox recipe works on this host")
}

#[tokio::test]
async fn connects_and_negotiates_the_api() {
    let Some(d) = engine().await else { return };
    assert!(!d.server_version().is_empty());
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(d.api_version()) >= parse(tg_docker::MIN_API),
        "API {} < {}",
        d.api_version(),
        tg_docker::MIN_API
    );
    assert_eq!(d.endpoint(), tg_docker::endpoint());
}

#[tokio::test]
async fn builds_from_a_context_then_tags_finds_and_removes() {
    let Some(d) = engine().await else { return };
    let repo = format!("tg-test-docker/{}", unique("build"));
    let tag = format!("{repo}:one");
    let other = format!("{repo}:two");
    let _cleanup = Images(vec![tag.clone(), other.clone()]);
    let mut c = Context::in_memory();
    c.file(
        "Dockerfile",
        b"FROM scratch\nCOPY hello.txt /hello.txt\nLABEL tg.test=yes\n",
        0o644,
    )
    .unwrap();
    c.file("hello.txt", b"hello", 0o644).unwrap();
    let lines = Lines::default();
    let id = d
        .build(
            tg_docker::BuildSpec {
                context: c.finish().unwrap(),
                dockerfile: "Dockerfile".into(),
                tag: tag.clone(),
                extra_tags: vec![],
                build_args: BTreeMap::new(),
                labels: BTreeMap::from([("tg.built".to_string(), "by-test".to_string())]),
                host_network: false,
            },
            &lines.sink(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(
        lines.all().iter().any(|l| l.starts_with("Step 2/")),
        "{:?}",
        lines.all()
    );
    assert_eq!(
        d.image_id(&tag).await.unwrap().as_deref(),
        Some(id.as_str())
    );
    let labels = d
        .api()
        .inspect_image(&tag)
        .await
        .unwrap()
        .config
        .unwrap()
        .labels
        .unwrap();
    assert_eq!(labels["tg.test"], "yes");
    assert_eq!(labels["tg.built"], "by-test");

    d.tag(&id, &other).await.unwrap();
    assert_eq!(
        d.image_id(&other).await.unwrap().as_deref(),
        Some(id.as_str())
    );
    let mut listed = d.images_of(&repo).await.unwrap();
    listed.sort();
    assert_eq!(listed, [tag.clone(), other.clone()]);

    assert!(d.remove_image(&other).await.unwrap());
    assert!(!d.remove_image(&other).await.unwrap(), "absent is fine");
    assert_eq!(d.image_id(&other).await.unwrap(), None);
    assert!(d.remove_image(&tag).await.unwrap());
    assert_eq!(d.image_id(&tag).await.unwrap(), None);

    // A failing build says why, with the builder's last lines.
    let mut c = Context::in_memory();
    c.file("Dockerfile", b"FROM scratch\nCOPY absent.txt /\n", 0o644)
        .unwrap();
    let err = d
        .build(
            tg_docker::BuildSpec {
                context: c.finish().unwrap(),
                dockerfile: "Dockerfile".into(),
                tag: tag.clone(),
                extra_tags: vec![],
                build_args: BTreeMap::new(),
                labels: BTreeMap::new(),
                host_network: false,
            },
            &quiet,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    match err {
        DockerError::Build { message, .. } => assert!(message.contains("absent.txt"), "{message}"),
        e => panic!("not a build error: {e}"),
    }
}

#[tokio::test]
async fn one_shot_steps_report_exit_codes_and_output_once() {
    let Some(d) = engine().await else { return };
    let image = test_busybox(&d).await;
    let lines = Lines::default();
    let step = unique("step");
    let out = d
        .run_once(
            &OneShot {
                image: image.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo out; echo err >&2; exit 3".into(),
                ],
                labels: BTreeMap::from([(labels::BUILD_ID.to_string(), step.clone())]),
                ..Default::default()
            },
            &lines.sink(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert!(
        d.containers_with(&[(labels::BUILD_ID, &step)])
            .await
            .unwrap()
            .is_empty(),
        "the step's container is gone when it returns"
    );
    let mut got = lines.all();
    got.sort();
    assert_eq!(got, ["err", "out"], "each line once");
    assert!(out.tail.contains("out") && out.tail.contains("err"));

    let out = d
        .run_once(
            &OneShot {
                image: image.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "printf hello; echo note >&2".into(),
                ],
                capture_stdout: true,
                ..Default::default()
            },
            &quiet,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout, b"hello");
    assert_eq!(out.tail, "note");

    // The network is `none` unless asked: only the loopback interface.
    let out = d
        .run_once(
            &OneShot {
                image,
                cmd: vec!["ls".into(), "/sys/class/net".into()],
                capture_stdout: true,
                ..Default::default()
            },
            &quiet,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lo");

    // Quick steps too print each line once (attach and start race no line twice).
    for _ in 0..5 {
        let lines = Lines::default();
        d.run_once(
            &OneShot {
                image: test_busybox(&d).await,
                cmd: vec!["echo".into(), "quick".into()],
                ..Default::default()
            },
            &lines.sink(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(lines.all(), ["quick"]);
    }
}

#[tokio::test]
async fn one_shot_steps_see_their_binds() {
    let Some(d) = engine().await else { return };
    let image = test_busybox(&d).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "from the host").unwrap();
    let ro = tempfile::tempdir().unwrap();
    let out = d
        .run_once(
            &OneShot {
                image,
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "cat /data/in && echo from the step > /data/out && ! touch /ro/x".into(),
                ],
                binds: vec![
                    format!("{}:/data", dir.path().display()),
                    format!("{}:/ro:ro", ro.path().display()),
                ],
                workdir: Some("/data".into()),
                capture_stdout: true,
                ..Default::default()
            },
            &quiet,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.tail);
    assert_eq!(out.stdout, b"from the host");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out")).unwrap(),
        "from the step\n"
    );
    assert!(!ro.path().join("x").exists());
}

#[tokio::test]
async fn a_canceled_step_ends_promptly_and_leaves_no_container() {
    let Some(d) = engine().await else { return };
    let image = test_busybox(&d).await;
    let id = unique("cancel");
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c2.cancel();
    });
    let started = Instant::now();
    let r = d
        .run_once(
            &OneShot {
                image,
                cmd: vec!["sleep".into(), "600".into()],
                labels: BTreeMap::from([(labels::BUILD_ID.to_string(), id.clone())]),
                ..Default::default()
            },
            &quiet,
            &cancel,
        )
        .await;
    assert!(matches!(r, Err(DockerError::Canceled)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let left = d.containers_with(&[(labels::BUILD_ID, &id)]).await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn containers_are_found_and_removed_by_label() {
    let Some(d) = engine().await else { return };
    let image = test_busybox(&d).await;
    let run = unique("run");
    let mut names = Vec::new();
    for (i, purpose) in ["plan", "pause"].iter().enumerate() {
        let name = format!("tg-test-docker-{run}-{i}");
        d.api()
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                ContainerCreateBody {
                    image: Some(image.clone()),
                    cmd: Some(vec!["sleep".into(), "600".into()]),
                    labels: Some(
                        [
                            (labels::RUN_ID.to_string(), run.clone()),
                            (labels::PURPOSE.to_string(), purpose.to_string()),
                        ]
                        .into(),
                    ),
                    host_config: Some(tg_docker::bollard::models::HostConfig {
                        network_mode: Some("none".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        names.push(name);
    }
    d.api()
        .start_container(
            &names[0],
            None::<tg_docker::bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .unwrap();
    let all = d.containers_with(&[(labels::RUN_ID, &run)]).await.unwrap();
    assert_eq!(all.len(), 2);
    let plans = d
        .containers_with(&[(labels::RUN_ID, &run), (labels::PURPOSE, "plan")])
        .await
        .unwrap();
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].name, names[0]);
    assert!(plans[0].running);
    assert_eq!(plans[0].labels[labels::PURPOSE], "plan");

    let mut removed = d
        .remove_containers_with(&[(labels::RUN_ID, &run)])
        .await
        .unwrap();
    removed.sort();
    assert_eq!(removed, names);
    assert!(
        d.containers_with(&[(labels::RUN_ID, &run)])
            .await
            .unwrap()
            .is_empty()
    );
    // Absent is fine.
    d.remove_container(&names[0]).await.unwrap();
}

#[tokio::test]
async fn ensure_makes_busybox_and_pause_when_absent_once_for_concurrent_callers() {
    let Some(d) = engine().await else { return };
    if let Some(Err(why)) = base::recipe(BUSYBOX) {
        if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("cannot make {BUSYBOX} here: {why}");
        }
        eprintln!("skipped: cannot make {BUSYBOX} here: {why}");
        return;
    }
    let busybox = format!("tg-test-docker/{}:b", unique("busybox"));
    let pause = format!("tg-test-docker/{}:p", unique("pause"));
    let _cleanup = Images(vec![busybox.clone(), pause.clone()]);
    let cancel = CancellationToken::new();

    // Two callers at once: one makes it, the other waits for it and finds it.
    let (a, b) = (Lines::default(), Lines::default());
    let (sa, sb) = (a.sink(), b.sink());
    let (ra, rb) = tokio::join!(
        base::ensure_as(&d, BUSYBOX, &busybox, &sa, &cancel),
        base::ensure_as(&d, BUSYBOX, &busybox, &sb, &cancel),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra, rb);
    let made = |l: &Lines| l.all().iter().any(|l| l.starts_with("made "));
    assert!(
        made(&a) ^ made(&b),
        "made exactly once: {:?} / {:?}",
        a.all(),
        b.all()
    );
    // Present now: no make.
    let again = Lines::default();
    let id = base::ensure_as(&d, BUSYBOX, &busybox, &again.sink(), &cancel)
        .await
        .unwrap();
    assert_eq!(id, ra);
    assert!(again.all().is_empty(), "{:?}", again.all());

    // The busybox image has a shell, the applets and a root user, and no network is needed.
    let out = d
        .run_once(
            &OneShot {
                image: busybox.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "id -un; test -k /tmp && echo sticky; wget --help >/dev/null 2>&1 && echo \
                     applets"
                        .into(),
                ],
                capture_stdout: true,
                ..Default::default()
            },
            &quiet,
            &cancel,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "root\nsticky\napplets\n"
    );

    // The pause image sleeps until stopped, and stops at once on SIGTERM.
    base::ensure_as(&d, PAUSE, &pause, &quiet, &cancel)
        .await
        .unwrap();
    let name = format!("tg-test-docker-{}", unique("pause"));
    d.api()
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            ContainerCreateBody {
                image: Some(pause.clone()),
                host_config: Some(tg_docker::bollard::models::HostConfig {
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    d.api()
        .start_container(
            &name,
            None::<tg_docker::bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state = d
        .api()
        .inspect_container(&name, None)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!(state.running, Some(true), "{state:?}");
    let started = Instant::now();
    d.api()
        .stop_container(
            &name,
            Some(StopContainerOptionsBuilder::default().t(20).build()),
        )
        .await
        .unwrap();
    let stopped_in = started.elapsed();
    let state = d
        .api()
        .inspect_container(&name, None)
        .await
        .unwrap()
        .state
        .unwrap();
    d.remove_container(&name).await.unwrap();
    assert!(
        stopped_in < Duration::from_secs(5),
        "SIGTERM took {stopped_in:?}"
    );
    assert_eq!(state.exit_code, Some(0), "exited on SIGTERM by itself");
}

#[tokio::test]
async fn an_image_without_a_recipe_is_missing_with_a_hint() {
    let Some(d) = engine().await else { return };
    let cancel = CancellationToken::new();
    let err = base::ensure(&d, "tg-test-docker/no-such-image:1", &quiet, &cancel)
        .await
        .unwrap_err();
    match err {
        DockerError::MissingImage { image, hint } => {
            assert_eq!(image, "tg-test-docker/no-such-image:1");
            assert!(hint.contains("docker load"), "{hint}");
        }
        e => panic!("not a missing image: {e}"),
    }
}

/// Every default image is there or made (slow the first time on a machine: two debootstraps
/// and the toolchains), and each recipe whose host toolchain is here makes a working image
/// under a test tag (fast once the root file systems are cached).
#[tokio::test]
async fn every_default_image_is_present_or_made_and_every_recipe_works() {
    let Some(d) = engine().await else { return };
    let required = std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    let cancel = CancellationToken::new();
    let progress = |l: &str| eprintln!("  | {l}");
    let mut cleanup = Images(Vec::new());
    for &image in DEFAULTS {
        let recipe = base::recipe(image).expect("every default has a recipe");
        let present = d.image_id(image).await.unwrap().is_some();
        if let Err(why) = &recipe {
            // A host without this toolchain (or without root for debootstrap) cannot make it;
            // CI's machine can make them all.
            assert!(!required, "cannot make {image} here: {why}");
            eprintln!("skipped {image}: {why}");
            continue;
        }
        let started = Instant::now();
        let id = base::ensure(&d, image, &progress, &cancel).await.unwrap();
        eprintln!(
            "{image}: {} ({}) in {:.1} s",
            if present { "present" } else { "made" },
            &id[..19],
            started.elapsed().as_secs_f64()
        );
        let tag = format!("tg-test-docker/recipe:{}", unique("r"));
        cleanup.0.push(tag.clone());
        let started = Instant::now();
        let id = base::make(&d, image, &tag, &progress, &cancel)
            .await
            .unwrap();
        eprintln!(
            "{image}'s recipe as {tag}: {} in {:.1} s",
            &id[..19],
            started.elapsed().as_secs_f64()
        );
        let labels = d
            .api()
            .inspect_image(&tag)
            .await
            .unwrap()
            .config
            .unwrap()
            .labels
            .unwrap();
        assert!(labels[base::RECIPE_LABEL].starts_with(image));
        assert!(!labels[base::SOURCE_LABEL].is_empty());
    }
}

#[tokio::test]
async fn the_health_check_reports_the_engine_tools_and_images() {
    let required = std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    let checks = tg_docker::health(false, &quiet).await;
    let by = |n: &str| checks.iter().find(|c| c.name == n);
    let engine_check = by("docker engine").expect("an engine check");
    if !engine_check.ok {
        assert!(!required, "{}", engine_check.message);
        eprintln!("skipped: {}", engine_check.message);
        return;
    }
    assert!(
        engine_check.message.contains("API 1."),
        "{}",
        engine_check.message
    );
    assert!(by("docker permission").unwrap().ok);
    assert!(by("busybox-static").is_some() && by("debootstrap").is_some());
    for &image in DEFAULTS {
        let c = by(&format!("image {image}")).expect("a check per image");
        assert!(c.fix.is_none(), "no fix without --fix");
        assert!(c.message.contains(image), "{}", c.message);
    }
}
