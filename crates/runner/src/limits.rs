//! Host limits that decide how many instances one engine can hold, and the budget of open
//! files a run needs: checked before a run starts (so that it fails at once with an error that
//! names the limit, instead of at instance 6,660 with `EMFILE`), and reported by
//! `healthcheck --runner local:exec|local:netns`, with what a virtual machine's host takes
//! (CPU time, and free memory it reclaims), which slows crowded runs without any limit failing.
//!
//! Where the descriptors go, per live instance, in the engine process:
//! - `local:exec`, direct: its stdout and stderr pipes, its pidfd (tokio reaps children through
//!   one), and its sync service connection (the service runs in the engine): 4. The capture
//!   files are opened only while output is being written (see `instance.rs`).
//! - `local:exec` through helpers (see `helper.rs`): only the sync connection; the pipes and
//!   pidfds are in the helper processes, each holding a share.
//! - `local:netns`: pipes, pidfd, sync connection and the instance's TUN device: 5.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::HealthCheck;

/// Descriptors the engine keeps for itself: listeners, the task store, builders, logs.
pub(crate) const RESERVE: u64 = 256;
/// Per live instance in the engine under `local:exec` without helpers.
pub(crate) const DIRECT_PER_INSTANCE: u64 = 4;
/// Per live instance in the engine under `local:netns`.
pub(crate) const NETNS_PER_INSTANCE: u64 = 5;
/// Per live instance in the engine when helpers hold its pipes: its sync connection.
pub(crate) const HELPED_PER_INSTANCE: u64 = 1;
/// Per helper in the engine: its stdin and stdout pipes and its pidfd.
pub(crate) const PER_HELPER: u64 = 3;
/// Per instance in a helper: two pipes, a pidfd.
pub(crate) const HELPER_PER_INSTANCE: u64 = 3;
/// The instance count `healthcheck` checks for when none is given.
pub const DEFAULT_CHECK_INSTANCES: u32 = 10_000;

/// This process's open-file limits (soft, hard) after raising the soft one to the hard one.
pub(crate) fn nofile() -> (u64, u64) {
    let raised = tg_sync::raise_fd_limit();
    // Read again: a run may have raised the limits further since.
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((raised, raised))
}

/// Tries to raise the open-file limit to `want` (root may raise the hard limit, up to
/// `fs.nr_open`, unless its container or VM forbids it). Returns the soft limit in force.
pub(crate) fn try_raise_nofile(want: u64) -> u64 {
    let (soft, hard) = nofile();
    if want <= soft {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)) {
        Ok(()) => want,
        Err(_) => soft,
    }
}

/// How a human raises the open-file limit to `need`, for errors and health checks.
pub(crate) fn raise_nofile_hint(need: u64, hard: u64) -> String {
    let here = if nix::unistd::geteuid().is_root() {
        format!(
            "this process is root and still could not raise it above {hard}: the limit is set by \
             the container or VM it runs in and must be raised there"
        )
    } else {
        format!("only root can raise a hard limit (now {hard})")
    };
    format!(
        "raise the hard limit of open files to at least {need}: `ulimit -Hn {need}` in the shell \
         that starts testground, `LimitNOFILE={need}` in a systemd unit, `nofile` in \
         /etc/security/limits.conf, or `--ulimit nofile={need}` for a container; {here}"
    )
}

/// The engine's open files for `instances` live instances of `runner` with `helpers` helper
/// processes (0: direct).
pub(crate) fn engine_need(runner: &str, instances: u64, helpers: u64) -> u64 {
    let per = match (runner, helpers) {
        ("local:netns", _) => NETNS_PER_INSTANCE,
        (_, 0) => DIRECT_PER_INSTANCE,
        _ => HELPED_PER_INSTANCE,
    };
    RESERVE + instances * per + helpers * PER_HELPER
}

/// Fails unless the engine can hold `instances` live instances of `runner` itself (raising
/// its limit as far as allowed): an error naming the limit, the need and how to raise it.
pub(crate) fn check_direct(runner: &str, instances: u32) -> Result<(), crate::RunError> {
    let need = engine_need(runner, u64::from(instances), 0);
    let limit = try_raise_nofile(need);
    if limit >= need {
        return Ok(());
    }
    Err(crate::RunError::FileLimit {
        instances,
        need,
        limit,
        hint: raise_nofile_hint(need, nofile().1),
    })
}

/// How many instances one helper may hold within `limit` open files.
pub(crate) fn helper_share(limit: u64) -> u64 {
    (limit.saturating_sub(RESERVE) / HELPER_PER_INSTANCE).clamp(1, 2_000)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Memory available for new processes, in bytes (`MemAvailable`).
fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `healthcheck` checks of the host limits that bound a run of `instances` instances under
/// `runner` on this machine. A check that fails is a warning about that count, with how to
/// raise the limit; smaller runs may still work.
pub fn host_checks(runner: &str, instances: u32) -> Vec<HealthCheck> {
    let n = u64::from(instances);
    let mut checks = Vec::new();

    let (soft, hard) = nofile();
    let direct = engine_need(runner, n, 0);
    let (ok, message) = if runner == "local:exec" {
        let helpers = n.div_ceil(helper_share(hard));
        let helped = engine_need(runner, n, helpers);
        if direct <= soft {
            (
                true,
                format!(
                    "open files: limit {soft} (hard {hard}) holds {instances} instances ({direct} needed)"
                ),
            )
        } else if helped <= soft {
            (
                true,
                format!(
                    "open files: limit {soft} (hard {hard}) holds {instances} instances through {helpers} helper processes \
                 ({helped} needed in the engine; {direct} without helpers)"
                ),
            )
        } else {
            (
                false,
                format!(
                    "open files: limit {soft} (hard {hard}) is too low for {instances} instances: the engine needs {helped} \
                 (one sync connection each, even with helpers); {}",
                    raise_nofile_hint(helped, hard)
                ),
            )
        }
    } else if direct <= soft {
        (
            true,
            format!(
                "open files: limit {soft} (hard {hard}) holds {instances} instances ({direct} needed)"
            ),
        )
    } else {
        (
            false,
            format!(
                "open files: limit {soft} (hard {hard}) is too low for {instances} instances ({direct} needed); {}",
                raise_nofile_hint(direct, hard)
            ),
        )
    };
    checks.push(HealthCheck::new("open-files", ok, message));

    // Every instance is a process with at least a few threads (Go: one per P and more).
    let procs_need = n * 2 + 256;
    if let Some(pid_max) = read_u64("/proc/sys/kernel/pid_max") {
        let ok = pid_max >= procs_need;
        checks.push(HealthCheck::new(
            "pid-max",
            ok,
            if ok {
                format!("kernel.pid_max {pid_max} holds {instances} instances")
            } else {
                format!(
                    "kernel.pid_max {pid_max} is too low for {instances} instances (about {procs_need} ids); \
                     raise it: `sysctl -w kernel.pid_max=4194304`"
                )
            },
        ));
    }
    // Threads, not processes, count here: a Go instance runs several.
    let threads_need = n * 8 + 1_024;
    if let Some(threads_max) = read_u64("/proc/sys/kernel/threads-max") {
        let ok = threads_max >= threads_need;
        checks.push(HealthCheck::new(
            "threads-max",
            ok,
            if ok {
                format!("kernel.threads-max {threads_max} holds {instances} instances")
            } else {
                format!(
                    "kernel.threads-max {threads_max} is too low for {instances} instances (about {threads_need} \
                     threads); raise it: `sysctl -w kernel.threads-max={threads_need}`"
                )
            },
        ));
    }
    // RLIMIT_NPROC counts the user's threads; root is exempt.
    if !nix::unistd::geteuid().is_root()
        && let Ok((nproc, _)) = getrlimit(Resource::RLIMIT_NPROC)
    {
        let ok = nproc >= threads_need;
        checks.push(HealthCheck::new(
            "user-processes",
            ok,
            if ok {
                format!("user process limit {nproc} holds {instances} instances")
            } else {
                format!(
                    "user process limit {nproc} (threads) is too low for {instances} instances (about \
                     {threads_need}); raise it: `ulimit -u {threads_need}`, `nproc` in /etc/security/limits.conf, \
                     or `TasksMax=` / `LimitNPROC=` in a systemd unit"
                )
            },
        ));
    }
    // A trivial Rust instance takes about 1 MiB of proportional memory, an sdk-go one 3.5.
    let per = if runner == "local:netns" {
        3 << 20
    } else {
        2 << 20
    };
    if let Some(avail) = mem_available() {
        let need = n * per;
        let ok = avail >= need;
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        checks.push(HealthCheck::new(
            "memory",
            ok,
            if ok {
                format!(
                    "{:.1} GiB available holds {instances} small instances (about {:.1} GiB)",
                    gib(avail),
                    gib(need)
                )
            } else {
                format!(
                    "{:.1} GiB available is too little for {instances} instances (about {:.1} GiB at {} MiB \
                     each; an sdk-go instance takes about 3.5 MiB): run fewer instances or add memory",
                    gib(avail),
                    gib(need),
                    per >> 20
                )
            },
        ));
    }
    checks.extend(vm_checks(n, &VmFacts::read()));
    checks
}

/// From this many instances a virtual machine's host matters enough to warn about it.
const VM_WARN_INSTANCES: u64 = 1_000;
/// A host that took this share of the CPU time since boot is warned about.
const STEAL_WARN: f64 = 0.05;

/// What this machine says of the host it runs on, if it is a virtual machine.
#[derive(Debug, Clone, Copy, Default)]
struct VmFacts {
    /// Share of the CPU time since boot that the hypervisor took (steal); `None` if unknown.
    steal: Option<f64>,
    /// A virtio balloon that reports free pages to the host, which takes them back.
    reports_free_pages: bool,
}

impl VmFacts {
    fn read() -> VmFacts {
        VmFacts {
            steal: tg_sys::proc::CpuTimes::now()
                .ok()
                .and_then(|t| t.steal_since(&Default::default())),
            reports_free_pages: balloon_reports_free_pages(),
        }
    }
}

/// Whether a virtio balloon device (id 5) negotiated free page reporting (feature bit 5,
/// `VIRTIO_BALLOON_F_REPORTING`): `features` in sysfs is one character per bit, bit 0 first.
fn reports_free_pages(device: &str, features: &str) -> bool {
    device.trim() == "0x0005" && features.trim().as_bytes().get(5) == Some(&b'1')
}

fn balloon_reports_free_pages() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    dir.flatten().any(|d| {
        let read = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap_or_default();
        reports_free_pages(&read("device"), &read("features"))
    })
}

/// Checks of the virtual machine's host: the CPU time it takes (late timers, slower starts) and
/// the free memory it takes back (every page a run touches is then given again by the host).
/// Warnings from [`VM_WARN_INSTANCES`] instances on; below that they only inform.
fn vm_checks(n: u64, vm: &VmFacts) -> Vec<HealthCheck> {
    let crowded = n >= VM_WARN_INSTANCES;
    let mut checks = Vec::new();
    if let Some(steal) = vm.steal.filter(|&s| s > 0.0) {
        let high = steal >= STEAL_WARN;
        let mut message = format!(
            "cpu steal: the host of this virtual machine has taken {:.1} % of its CPU time since \
             boot",
            steal * 100.0
        );
        if high {
            message.push_str(
                "; while it does, no timer of the machine fires and no instance runs: shaped \
                 delays run late (each run's log says how late) and crowded runs start slower; \
                 a machine with dedicated CPUs avoids it",
            );
        }
        checks.push(HealthCheck::new("cpu-steal", !(high && crowded), message));
    }
    if vm.reports_free_pages {
        checks.push(HealthCheck::new(
            "vm-memory",
            !crowded,
            "vm memory: this virtual machine gives its free memory back to its host (virtio \
             balloon free page reporting), so every page a run's instances touch is first given \
             again by the host: on the machine of BENCHMARKS.md, 3 to 17 times slower than backed \
             memory, and 5,000 sdk-go instances took 3 to 4 times as long to start (README, \
             \"Thousands of instances\"); a virtual machine without free page reporting avoids it"
                .to_string(),
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_leave_only_sync_connections_in_the_engine() {
        assert_eq!(engine_need("local:exec", 10_000, 0), RESERVE + 40_000);
        assert_eq!(engine_need("local:exec", 10_000, 5), RESERVE + 10_000 + 15);
        assert_eq!(engine_need("local:netns", 2_000, 0), RESERVE + 10_000);
        assert_eq!(helper_share(20_000), 2_000);
        assert_eq!(helper_share(1_024), (1_024 - RESERVE) / 3);
    }

    #[test]
    fn a_count_beyond_the_limit_warns_with_how_to_raise_it() {
        let (soft, _) = nofile();
        // More instances than open files: no helper layout fits.
        let n = u32::try_from(soft + 1).unwrap_or(u32::MAX);
        let checks = host_checks("local:exec", n);
        let files = checks.iter().find(|c| c.name == "open-files").unwrap();
        assert!(!files.ok, "{}", files.message);
        assert!(files.message.contains("ulimit -Hn"), "{}", files.message);
        let small = host_checks("local:exec", 2);
        assert!(small.iter().all(|c| c.ok), "{small:?}");
    }

    #[test]
    fn a_virtual_machines_host_is_warned_about_for_crowded_runs() {
        // Bit 5 of the balloon's features is free page reporting.
        assert!(reports_free_pages("0x0005\n", "0110010100000000\n"));
        assert!(!reports_free_pages("0x0005\n", "0110000100000000\n"));
        assert!(!reports_free_pages("0x0001\n", "0110010100000000\n"));
        assert!(!reports_free_pages("0x0005\n", "0110"));

        // Bare metal, or a host that takes nothing: no check at all.
        assert!(vm_checks(10_000, &VmFacts::default()).is_empty());
        let calm = VmFacts {
            steal: Some(0.004),
            reports_free_pages: false,
        };
        let c = vm_checks(10_000, &calm);
        assert_eq!(c.len(), 1);
        assert!(
            c[0].ok && c[0].message.contains("0.4 % of its CPU time"),
            "{c:?}"
        );

        let busy = VmFacts {
            steal: Some(0.08),
            reports_free_pages: true,
        };
        // Warned about for a crowded run...
        let c = vm_checks(5_000, &busy);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c.iter().all(|c| !c.ok), "{c:?}");
        assert!(c[0].message.contains("8.0 %") && c[0].message.contains("dedicated CPUs"));
        assert!(
            c[1].message.contains("free page reporting"),
            "{}",
            c[1].message
        );
        // ...only told for a small one.
        let c = vm_checks(999, &busy);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c.iter().all(|c| c.ok), "{c:?}");
    }
}
