//! Command-line grammar, following the original's urfave/cli layout:
//! `testground [global flags] <command> [<subcommand>] [flags]`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "testground",
    about = "A platform for testing, benchmarking and simulating distributed and p2p systems at scale.",
    disable_version_flag = true,
    propagate_version = false
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// Debug logging.
    #[arg(short = 'v', global = true)]
    pub v: bool,
    /// Even more logging (currently the same as -v).
    #[arg(long = "vv", global = true)]
    pub vv: bool,
    /// Daemon endpoint; overrides `[client] endpoint` of .env.toml. Without either, a daemon
    /// answering on `[daemon] listen` (default localhost:8042) is used, else the engine runs
    /// inside this process; `--endpoint ''` (or TESTGROUND_EMBEDDED=1) always runs it inside.
    #[arg(long, global = true, value_name = "URI")]
    pub endpoint: Option<String>,
    /// No colors on a terminal (as a non-empty NO_COLOR does). Off a terminal there are none.
    #[arg(long = "no-color", global = true)]
    pub no_color: bool,
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Address to listen on; default `[daemon] listen` of .env.toml (`localhost:8042`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

// Parsed once per process: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a test plan.
    #[command(subcommand)]
    Build(BuildCmd),
    /// Collect the outputs of a run.
    Collect(CollectArgs),
    /// Start the daemon (HTTP API and the dashboard at `/`).
    Daemon,
    /// Serve the dashboard over this home without a daemon (tasks of embedded runs too).
    Dashboard(DashboardArgs),
    /// Describe a test plan.
    Describe(DescribeArgs),
    /// Check (and optionally fix) the health of a runner.
    Healthcheck(HealthcheckArgs),
    /// Print the logs of a task.
    Logs(LogsArgs),
    /// Manage test plans.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Run a test plan (builds it first when needed).
    #[command(subcommand)]
    Run(RunCmd),
    /// The original's standalone sidecar (docker, k8s); local:netns embeds its own.
    Sidecar(SidecarArgs),
    /// Print the status of a task.
    Status(StatusArgs),
    /// List tasks.
    Tasks,
    /// Terminate all jobs of a runner or builder.
    Terminate(TerminateArgs),
    /// Print version information.
    Version,
}

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// Runner whose sidecar to run (the original accepted docker and k8s).
    #[arg(long)]
    pub runner: String,
}

#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// Import a test plan from a local directory.
    Import(PlanImportArgs),
    /// Create a new test plan from a template.
    Create(PlanCreateArgs),
    /// List the test plans (and their test cases).
    List(PlanListArgs),
    /// Remove a test plan.
    Rm(PlanRmArgs),
}

#[derive(Debug, Args)]
pub struct PlanImportArgs {
    /// Directory (or file:// URL) of the plan, or of a directory of plans.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// Import from a git repository.
    #[arg(long)]
    pub git: bool,
    /// Name of the plan under $TESTGROUND_HOME/plans (default: the source's base name).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlanCreateArgs {
    /// Name of the new plan.
    #[arg(short = 'p', long)]
    pub plan: String,
    /// Language of the template: go or rust.
    #[arg(long, default_value = "go", value_name = "LANGUAGE")]
    pub target: String,
    /// Module name (go).
    #[arg(
        long,
        default_value = "github.com/your/module/name",
        value_name = "MODULE_NAME"
    )]
    pub module: String,
    /// Git remote to add (not supported yet).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlanListArgs {
    /// Also list the test cases of each plan.
    #[arg(long)]
    pub testcases: bool,
}

#[derive(Debug, Args)]
pub struct PlanRmArgs {
    /// Name of the plan to remove.
    #[arg(short = 'p', long)]
    pub plan: String,
    /// Confirm the deletion.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Name of the plan to describe.
    #[arg(short = 'p', long)]
    pub plan: String,
}

#[derive(Debug, Subcommand)]
pub enum BuildCmd {
    /// Build one group of a plan, described by flags.
    #[command(alias = "s")]
    Single(BuildSingleArgs),
    /// Build the groups of a composition file.
    #[command(alias = "c")]
    Composition(BuildCompositionArgs),
    /// Purge the build cache of a plan.
    #[command(alias = "p")]
    Purge(BuildPurgeArgs),
}

/// Flags shared by `build single` and `run single`.
#[derive(Debug, Args, Clone)]
pub struct SingleBuildFlags {
    /// Test plan (path under $TESTGROUND_HOME/plans).
    #[arg(short = 'p', long)]
    pub plan: String,
    /// Builder, e.g. exec:go.
    #[arg(short = 'b', long)]
    pub builder: String,
    /// Build configuration, KEY=VALUE (repeatable).
    #[arg(long = "build-cfg", value_name = "KEY=VALUE")]
    pub build_cfg: Vec<String>,
    /// Dependency override, module=target@version (repeatable).
    #[arg(short = 'd', long = "dep", value_name = "MODULE=TARGET@VERSION")]
    pub dep: Vec<String>,
    /// Link a local SDK (not supported yet).
    #[arg(long = "link-sdk", value_name = "DIR_PATH|NAME")]
    pub link_sdk: Option<String>,
    /// Wait for the task to finish.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct BuildSingleArgs {
    #[command(flatten)]
    pub build: SingleBuildFlags,
}

#[derive(Debug, Args, Clone)]
pub struct CompositionFlags {
    /// Composition file.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Write the effective composition (with artifacts) back to the file.
    #[arg(short = 'w', long = "write-artifacts")]
    pub write_artifacts: bool,
    /// Link a local SDK (not supported yet).
    #[arg(long = "link-sdk", value_name = "DIR_PATH|NAME")]
    pub link_sdk: Option<String>,
    /// Wait for the task to finish.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct BuildCompositionArgs {
    #[command(flatten)]
    pub comp: CompositionFlags,
}

#[derive(Debug, Args)]
pub struct BuildPurgeArgs {
    /// Builder whose cache to purge, e.g. docker:go.
    #[arg(short = 'b', long)]
    pub builder: String,
    /// Test plan whose cache to purge.
    #[arg(short = 'p', long)]
    pub plan: String,
}

#[derive(Debug, Subcommand)]
pub enum RunCmd {
    /// Run one group of a plan, described by flags.
    #[command(alias = "s", after_help = run_cfg_keys())]
    Single(RunSingleArgs),
    /// Run a composition file.
    #[command(alias = "c")]
    Composition(RunCompositionArgs),
}

/// Flags shared by both run commands.
#[derive(Debug, Args, Clone, Default)]
pub struct RunCommonFlags {
    /// Collect the outputs after the run.
    #[arg(long)]
    pub collect: bool,
    /// Where to write the collected outputs.
    #[arg(short = 'o', long = "collect-file", value_name = "FILE")]
    pub collect_file: Option<PathBuf>,
    /// Recorded as the task's repository.
    #[arg(long = "metadata-repo")]
    pub metadata_repo: Option<String>,
    /// Recorded as the task's branch.
    #[arg(long = "metadata-branch")]
    pub metadata_branch: Option<String>,
    /// Recorded as the task's commit.
    #[arg(long = "metadata-commit")]
    pub metadata_commit: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunSingleArgs {
    #[command(flatten)]
    pub build: SingleBuildFlags,
    /// Number of instances.
    #[arg(short = 'i', long)]
    pub instances: u32,
    /// Runner, e.g. local:exec.
    #[arg(short = 'r', long)]
    pub runner: String,
    /// Test case.
    #[arg(short = 't', long)]
    pub testcase: String,
    /// Run configuration, KEY=VALUE (repeatable); each runner's keys are listed below.
    #[arg(long = "run-cfg", value_name = "KEY=VALUE")]
    pub run_cfg: Vec<String>,
    /// Test parameter, KEY=VALUE (repeatable).
    #[arg(long = "test-param", visible_alias = "tp", value_name = "KEY=VALUE")]
    pub test_param: Vec<String>,
    /// Run this artifact instead of building.
    #[arg(long = "use-build", visible_alias = "ub", value_name = "ARTIFACT")]
    pub use_build: Option<String>,
    /// Do not send metrics.
    #[arg(long = "disable-metrics")]
    pub disable_metrics: bool,
    #[command(flatten)]
    pub common: RunCommonFlags,
}

#[derive(Debug, Args)]
pub struct RunCompositionArgs {
    #[command(flatten)]
    pub comp: CompositionFlags,
    /// Rebuild every group, even those with an artifact.
    #[arg(short = 'i', long = "ignore-artifacts")]
    pub ignore_artifacts: bool,
    /// Runs to execute, comma-separated (default: all).
    #[arg(long = "run-ids", value_delimiter = ',', value_name = "ID,ID")]
    pub run_ids: Vec<String>,
    /// Write a CSV of the results.
    #[arg(short = 'O', long = "result-file", value_name = "FILE")]
    pub result_file: Option<PathBuf>,
    #[command(flatten)]
    pub common: RunCommonFlags,
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    /// The run id (task id).
    pub run_id: String,
    /// Runner of the run (informative: the task's runner is used).
    #[arg(short = 'r', long, default_value = "")]
    pub runner: String,
    /// Output file (default: <run_id>.tgz).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The task id.
    #[arg(short = 't', long = "task", value_name = "ID")]
    pub task: String,
    /// Also print the input and the result.
    #[arg(long)]
    pub extended: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The task id.
    #[arg(short = 't', long = "task", value_name = "ID")]
    pub task: String,
    /// Follow the logs until the task ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// Runner whose jobs to terminate, e.g. local:exec.
    #[arg(long)]
    pub runner: Option<String>,
    /// Builder whose jobs to terminate, e.g. docker:go.
    #[arg(long)]
    pub builder: Option<String>,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Runner to check, e.g. local:netns.
    #[arg(long)]
    pub runner: String,
    /// Try to fix what is broken.
    #[arg(long)]
    pub fix: bool,
    /// Check this host's limits (open files, pids, threads, memory) for a run of this many
    /// instances (local:exec and local:netns; default 10000).
    #[arg(long)]
    pub instances: Option<u32>,
}

/// `run single`'s after-help: every runner's `--run-cfg` keys, from the runner registry's key
/// tables, so the help cannot drift from what the runners accept.
fn run_cfg_keys() -> String {
    let mut s = String::from("--run-cfg keys by runner:");
    for r in tg_runner::runners() {
        s.push_str(&format!("\n  {}:", r.id()));
        for k in r.config_keys() {
            s.push_str(&format!("\n    {} ({}): {}", k.name, k.expects, k.help));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_of_run_single_is_described_and_runner_keys_are_listed() {
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let single = run.find_subcommand_mut("single").unwrap();
        for a in single.get_arguments() {
            assert!(
                a.get_help().is_some() || a.get_long_help().is_some(),
                "--{} has no description",
                a.get_id()
            );
        }
        let help = single.render_help().to_string();
        for r in tg_runner::runners() {
            assert!(help.contains(&format!("  {}:", r.id())), "{help}");
            for k in r.config_keys() {
                assert!(help.contains(&format!("    {} (", k.name)), "{help}");
            }
        }
    }

    #[test]
    fn aliases_and_urfave_style_flags() {
        let c = Cli::try_parse_from([
            "testground",
            "--endpoint",
            "http://localhost:1",
            "run",
            "s",
            "-p",
            "network",
            "-t",
            "ping",
            "-b",
            "exec:go",
            "-r",
            "local:exec",
            "-i",
            "2",
            "--tp",
            "a=1",
            "--ub",
            "x",
        ])
        .unwrap();
        assert_eq!(c.global.endpoint.as_deref(), Some("http://localhost:1"));
        let Command::Run(RunCmd::Single(a)) = c.command else {
            panic!("not run single")
        };
        assert_eq!(a.test_param, vec!["a=1".to_string()]);
        assert_eq!(a.use_build.as_deref(), Some("x"));
        let c = Cli::try_parse_from([
            "testground",
            "run",
            "c",
            "-f",
            "c.toml",
            "--run-ids",
            "a,b",
            "-i",
        ])
        .unwrap();
        let Command::Run(RunCmd::Composition(a)) = c.command else {
            panic!("not run composition")
        };
        assert_eq!(a.run_ids, vec!["a".to_string(), "b".to_string()]);
        assert!(a.ignore_artifacts);
        assert!(
            Cli::try_parse_from(["testground", "--vv", "build", "p", "-b", "x", "-p", "y"]).is_ok()
        );
    }
}
