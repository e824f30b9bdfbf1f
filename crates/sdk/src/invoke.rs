//! Running a test case: [`invoke`] picks the case named by `TEST_CASE`, runs it on an internal
//! tokio runtime (initialising the sync and network clients first for [`TestCase::initialized`]
//! cases) and reports exactly one terminal event.
//!
//! Outcomes and exit codes: `Ok` → `success_event`, exit 0; `Err` → `failure_event`, exit 0
//! (as sdk-go: the outcome is in the event); a panic, an unknown case or a failed
//! initialisation → `crash_event`, exit 1. Unlike sdk-go, a panic yields one crash event, not two.

use std::any::Any;
use std::backtrace::Backtrace;
use std::cell::RefCell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Once;
use std::time::Duration;

use futures::FutureExt;

use crate::network::{NetClient, NetError};
use crate::params::RunParams;
use crate::runenv::RunEnv;
use crate::sync::{SyncClient, SyncError};

/// The error a test case returns; anything `?` converts (including `anyhow::Error`).
pub type BoxError = Box<dyn std::error::Error>;
/// What a test case returns.
pub type CaseResult = Result<(), BoxError>;

type InitFn = Box<dyn FnOnce(RunEnv, InitContext) -> Pin<Box<dyn Future<Output = CaseResult>>>>;

/// A test case function, plain or initialised.
pub struct TestCase(Kind);

enum Kind {
    Plain(Box<dyn FnOnce(&RunEnv) -> CaseResult>),
    Init(InitFn),
}

impl TestCase {
    /// A synchronous case, run without a sync client (sdk-go's `TestCaseFn`). The tokio runtime
    /// is entered, so it may `tokio::runtime::Handle::current().block_on(...)`.
    pub fn plain(f: impl FnOnce(&RunEnv) -> CaseResult + 'static) -> TestCase {
        TestCase(Kind::Plain(Box::new(f)))
    }

    /// An async case that gets an [`InitContext`] (sdk-go's `InitializedTestCaseFn`): the
    /// sync client is connected, the network initialised, the sequence numbers claimed, and
    /// the terminal event is also published to `run_events`. `async fn case(env: &RunEnv,
    /// ic: &InitContext) -> CaseResult` fits.
    pub fn initialized<F>(f: F) -> TestCase
    where
        F: AsyncFnOnce(&RunEnv, &InitContext) -> CaseResult + 'static,
    {
        TestCase(Kind::Init(Box::new(move |env, ic| {
            Box::pin(async move { f(&env, &ic).await })
        })))
    }
}

/// What an initialised case gets besides its [`RunEnv`].
#[derive(Clone, Debug)]
pub struct InitContext {
    pub sync: SyncClient,
    pub net: NetClient,
    /// This instance's 1-based position among all instances (`initialized_global`).
    pub global_seq: u64,
    /// This instance's 1-based position in its group (`initialized_group_<id>`).
    pub group_seq: u64,
    group_state: String,
    group_count: i64,
    count: i64,
}

impl InitContext {
    /// sdk-go's `InitContext.init`: connect, wait for the network, claim the global and group
    /// sequence numbers, attach the client to `runenv`.
    pub async fn init(runenv: &RunEnv) -> Result<InitContext, NetError> {
        let sync = SyncClient::connect(&runenv.sync_url(), runenv.sync_prefix()).await?;
        let net = NetClient::new(sync.clone(), runenv.clone());
        runenv.record_message("waiting for network to initialize");
        net.wait_network_initialized().await?;
        runenv.record_message("network initialization complete");
        let global_seq = sync.signal_entry("initialized_global").await?;
        let group_state = format!("initialized_group_{}", runenv.test_group_id);
        let group_seq = sync.signal_entry(&group_state).await?;
        runenv.attach_sync_client(sync.clone());
        runenv.record_message(format!(
            "claimed sequence numbers; global={global_seq}, group({})={group_seq}",
            runenv.test_group_id
        ));
        Ok(InitContext {
            sync,
            net,
            global_seq,
            group_seq,
            group_state,
            group_count: i64::try_from(runenv.test_group_instance_count).unwrap_or(i64::MAX),
            count: i64::try_from(runenv.test_instance_count).unwrap_or(i64::MAX),
        })
    }

    /// Waits until every instance of the run has initialised.
    pub async fn wait_all_instances_initialized(&self) -> Result<(), SyncError> {
        self.sync.barrier("initialized_global", self.count).await
    }

    /// Waits until every instance of this group has initialised.
    pub async fn wait_group_instances_initialized(&self) -> Result<(), SyncError> {
        self.sync.barrier(&self.group_state, self.group_count).await
    }
}

/// How a run of [`run_cases`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
    Crash { error: String, stacktrace: String },
}

impl Outcome {
    /// 0 for success and failure (the event carries the outcome, as in sdk-go), 1 for a crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Success | Outcome::Failure(_) => 0,
            Outcome::Crash { .. } => 1,
        }
    }
}

/// Runs the case named by `TEST_CASE` and exits the process with [`Outcome::exit_code`].
pub fn invoke<S: Into<String>>(cases: impl IntoIterator<Item = (S, TestCase)>) -> ! {
    let params = match RunParams::from_env() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tg-sdk: invalid runtime environment: {e}");
            std::process::exit(1);
        }
    };
    let outcome = run_cases(params, cases);
    std::process::exit(outcome.exit_code());
}

/// Runs `case` whatever `TEST_CASE` says (sdk-go's `run.Invoke`), then exits.
pub fn invoke_single(case: TestCase) -> ! {
    let params = match RunParams::from_env() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tg-sdk: invalid runtime environment: {e}");
            std::process::exit(1);
        }
    };
    let name = params.test_case.clone();
    std::process::exit(run_cases(params, [(name, case)]).exit_code());
}

/// Everything [`invoke`] does except reading the process environment and exiting: records the
/// start, runs the case `params.test_case`, records its outcome, flushes metrics and closes the
/// sync client.
pub fn run_cases<S: Into<String>>(
    params: RunParams,
    cases: impl IntoIterator<Item = (S, TestCase)>,
) -> Outcome {
    let runenv = RunEnv::new(params);
    runenv.record_start();
    let name = runenv.test_case.clone();
    let Some(case) = cases
        .into_iter()
        .map(|(n, c)| (n.into(), c))
        .find_map(|(n, c)| (n == name).then_some(c))
    else {
        return crash(
            &runenv,
            format!("unrecognized test case: {name}"),
            String::new(),
        );
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return crash(
                &runenv,
                format!("cannot start the tokio runtime: {e}"),
                String::new(),
            );
        }
    };
    install_panic_hook();
    // Aggregates reach the files (and InfluxDB) during the case too, as with sdk-go.
    let flusher = rt.spawn(crate::metrics::flush_periodically(
        runenv.clone(),
        crate::metrics::RESULTS_FLUSH,
        crate::metrics::DIAGNOSTICS_FLUSH,
    ));
    let influx = runenv.influx_writer().map(|w| rt.spawn(w));

    let result: Result<CaseResult, Box<dyn Any + Send>> = match case.0 {
        Kind::Plain(f) => {
            let _guard = rt.enter();
            catch_unwind(AssertUnwindSafe(|| f(&runenv)))
        }
        Kind::Init(f) => rt.block_on(async {
            let ic = match AssertUnwindSafe(InitContext::init(&runenv))
                .catch_unwind()
                .await
            {
                Ok(Ok(ic)) => ic,
                Ok(Err(e)) => return Ok(Err(InitFailed(e).into())),
                Err(panic) => return Err(panic),
            };
            AssertUnwindSafe(f(runenv.clone(), ic)).catch_unwind().await
        }),
    };

    let outcome = match result {
        Ok(Ok(())) => {
            runenv.record_success();
            Outcome::Success
        }
        Ok(Err(e)) if e.is::<InitFailed>() => {
            let error = error_chain(e.as_ref());
            runenv.record_crash(&error, "");
            Outcome::Crash {
                error,
                stacktrace: String::new(),
            }
        }
        Ok(Err(e)) => {
            let error = error_chain(e.as_ref());
            runenv.record_failure(&error);
            Outcome::Failure(error)
        }
        Err(payload) => {
            let (error, stacktrace) = take_panic(payload.as_ref());
            runenv.record_crash(&error, &stacktrace);
            Outcome::Crash { error, stacktrace }
        }
    };
    flusher.abort();
    runenv.flush_metrics();
    runenv.close_influx();
    if let Some(writer) = influx {
        // Bounded: the writer's requests time out, and so does this wait.
        let wait = crate::influx::CLOSE_TIMEOUT + Duration::from_secs(1);
        let _ = rt.block_on(async { tokio::time::timeout(wait, writer).await });
    }
    if let Some(client) = runenv.sync_client() {
        rt.block_on(client.close());
    }
    // Tasks the plan spawned and never ended must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    outcome
}

fn crash(runenv: &RunEnv, error: String, stacktrace: String) -> Outcome {
    runenv.record_crash(&error, &stacktrace);
    runenv.flush_metrics();
    Outcome::Crash { error, stacktrace }
}

/// Marks initialisation errors, which are crashes rather than test failures.
#[derive(Debug, thiserror::Error)]
#[error("initialisation failed: {0}")]
struct InitFailed(#[source] NetError);

/// `outer: inner: innermost`, without repeating a source already in its parent's message.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

thread_local! {
    /// The message and backtrace of the last panic on this thread, set by the panic hook.
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = payload_message(info.payload());
            let location = info
                .location()
                .map(|l| format!("panicked at {l}\n"))
                .unwrap_or_default();
            let trace = format!("{location}{}", Backtrace::force_capture());
            LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, trace)));
            // Keep the usual stderr report too.
            previous(info);
        }));
    });
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn take_panic(payload: &(dyn Any + Send)) -> (String, String) {
    let message = payload_message(payload);
    let trace = LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .map(|(_, t)| t)
        .unwrap_or_default();
    (message, trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_skips_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
