//! Makes the default base images offline (what `testground healthcheck --runner local:docker
//! --fix` does), for CI and for machines without the `testground` binary yet.
//!
//! ```text
//! cargo run -p tg-docker --example base-images              # check, and make what is missing
//! cargo run -p tg-docker --example base-images -- --check   # check only
//! cargo run -p tg-docker --example base-images -- --make golang:1.26-bookworm --as tg-try/go:1
//! ```
//!
//! Exits 1 when a check fails and was not fixed.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let progress = |l: &str| println!("  | {l}");
    let started = Instant::now();
    if let Some(i) = args.iter().position(|a| a == "--make") {
        let image = args.get(i + 1).expect("--make IMAGE");
        let as_tag = args
            .iter()
            .position(|a| a == "--as")
            .and_then(|j| args.get(j + 1))
            .unwrap_or(image);
        let docker = match tg_docker::Docker::connect().await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("base-images: {e}");
                std::process::exit(1);
            }
        };
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
        match tg_docker::base::make(&docker, image, as_tag, &progress, &cancel).await {
            Ok(id) => println!(
                "base-images: made {image} as {as_tag} ({id}) in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("base-images: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let fix = !args.iter().any(|a| a == "--check");
    // Ctrl-C drops the checks' future: a make in progress kills its debootstrap and removes
    // its work directory on the way out.
    let checks = tokio::select! {
        c = tg_docker::health(fix, &progress) => Some(c),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(checks) = checks else {
        eprintln!("base-images: interrupted");
        std::process::exit(130);
    };
    let mut failed = 0;
    for c in &checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        println!("{mark} {}: {}", c.name, c.message);
        if let Some(f) = &c.fix {
            let mark = if f.ok { "fixed" } else { "not fixed" };
            println!("     {mark}: {}", f.message);
        }
        if !c.passes() {
            failed += 1;
        }
    }
    println!(
        "base-images: {} checks, {failed} failing, in {:.1} s",
        checks.len(),
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
