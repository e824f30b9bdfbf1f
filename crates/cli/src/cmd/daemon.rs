//! `testground daemon`: the engine behind the HTTP API until SIGINT/SIGTERM.

use anyhow::{Context, Result};
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

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        signal().await;
        let _ = stop_tx.send(());
    };
    let served = tg_daemon::server::serve(listener, engine.clone(), server_cfg, shutdown).await;
    if stop_rx.await.is_ok() {
        log::info("shutting down the daemon");
    }
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
