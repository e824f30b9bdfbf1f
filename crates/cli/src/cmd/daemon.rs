//! `testground daemon`: the engine behind the HTTP API until SIGINT/SIGTERM.

use anyhow::{Context, Result};
use std::time::Duration;

use tg_daemon::Engine;
use tg_daemon::engine::Mode;

use super::Ctx;
use crate::log;

/// Resolves on the first SIGINT or SIGTERM.
async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Removes the uploaded sources of finished tasks once they are older than `[daemon]
/// keep_sources`: at start, then periodically (every `keep`, between 1 s and 10 min). Sources
/// of tasks the store does not know are kept (they may belong to a task being submitted).
fn spawn_source_sweeper(engine: Engine, keep: Duration) -> tokio::task::JoinHandle<()> {
    let every = keep.clamp(Duration::from_secs(1), Duration::from_secs(600));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let e = engine.clone();
            let swept = tokio::task::spawn_blocking(move || {
                e.home().remove_old_requests(keep, |id| {
                    e.status(id).is_ok_and(|t| t.state().is_final())
                })
            })
            .await;
            match swept {
                Ok(Ok(ids)) if !ids.is_empty() => log::info_kv(
                    "removed the uploaded sources of finished tasks",
                    &[("tasks", ids.join(" ").into())],
                ),
                Ok(Err(e)) => log::warn_kv(
                    "cannot remove the uploaded sources of finished tasks",
                    &[("error", e.to_string().into())],
                ),
                _ => {}
            }
        }
    })
}

pub async fn daemon(ctx: Ctx) -> Result<()> {
    let listen = ctx.cfg.daemon.listen.clone();
    let server_cfg = tg_daemon::server::ServerConfig::from_env(&ctx.cfg.daemon);
    let engine = tg_daemon::Engine::start_with(ctx.home.clone(), ctx.cfg.clone(), Mode::Daemon)
        .await
        .context("cannot start the engine")?;
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            engine.shutdown().await;
            return Err(e).with_context(|| format!("cannot listen on {listen}"));
        }
    };
    let local = listener.local_addr().ok();
    if let Some(w) = local.and_then(|a| tg_daemon::server::exposure_warning(&a, &server_cfg.tokens))
    {
        log::warn(w);
    }
    let addr = local
        .map(|a| a.to_string())
        .unwrap_or_else(|| listen.clone());
    log::info_kv("listen and serve", &[("addr", addr.clone().into())]);
    log::info_kv("daemon listening", &[("addr", addr.into())]);

    let sweeper = spawn_source_sweeper(engine.clone(), ctx.cfg.daemon.keep_sources);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        signal().await;
        let _ = stop_tx.send(());
    };
    let served = tg_daemon::server::serve(listener, engine.clone(), server_cfg, shutdown).await;
    if stop_rx.await.is_ok() {
        log::info("shutting down the daemon");
    }
    sweeper.abort();
    // A second signal, or a shutdown that hangs, must not leave the operator stuck.
    let graceful = async {
        tokio::select! {
            _ = engine.shutdown() => true,
            _ = signal() => false,
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => false,
        }
    };
    if !graceful.await {
        log::warn("forced shutdown");
        std::process::exit(tg_api::exit::FAILURE);
    }
    served.context("the HTTP server failed")?;
    log::info("daemon stopped");
    Ok(())
}

/// `testground dashboard`: the dashboard alone, over this home, until SIGINT/SIGTERM. The
/// engine it starts executes nothing (no task is submitted to it); it reads the store, which
/// embedded runs in other processes write too.
pub async fn dashboard(ctx: Ctx, a: crate::cli::DashboardArgs) -> Result<()> {
    let listen = a.listen.unwrap_or_else(|| ctx.cfg.daemon.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {listen} (if a daemon runs there, its dashboard is at \
             http://{listen}/; else choose another address with --listen)"
            )
        })?;
    let engine = tg_daemon::Engine::start(ctx.home.clone(), ctx.cfg.clone())
        .await
        .context("cannot open the engine's store")?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(listen);
    if let Ok(a) = addr.parse()
        && let Some(w) = tg_daemon::server::exposure_warning(&a, &ctx.cfg.daemon.tokens)
    {
        log::warn(w);
    }
    log::info_kv(
        "dashboard listening",
        &[("url", format!("http://{addr}/").into())],
    );
    let served = tg_daemon::server::serve_dashboard(
        listener,
        engine.clone(),
        ctx.cfg.daemon.tokens.clone(),
        signal(),
    )
    .await;
    engine.shutdown().await;
    served.context("the HTTP server failed")?;
    Ok(())
}
