//! A run's per-instance journal: what the dashboard's run page shows about each instance.
//!
//! Built from the task's typed events as they are emitted (so nothing is lost to a lagging
//! subscriber), kept in memory while the task runs (the dashboard reads it live) and written to
//! `data/daemon/<task_id>.journal.json` at most once a second and when the task ends, so that a
//! dashboard in another process (`testground dashboard`) and later sessions see it too.
//!
//! Bounded: each instance keeps its first [`MAX_EVENTS`] timeline events (terminal ones are
//! always kept) and its first [`MAX_CONFIGS`] network configs; the rest are counted. Raw stdout
//! and stderr lines are not journaled: they are in the instance's `run.out` / `run.err`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tg_runner::{LineKind, RunnerEvent};

use crate::engine::TaskEvent;

/// Timeline events kept per instance.
pub const MAX_EVENTS: usize = 100;
/// Network configs kept per instance.
pub const MAX_CONFIGS: usize = 50;
/// The longest event text kept (a `START` line carries the whole run environment).
const MAX_TEXT: usize = 2048;
/// How often the journal file is rewritten while the task runs.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// What the journal file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalData {
    /// When the run started (wall clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// The run's data network, under runners with a sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// Instances in the order they were first heard of.
    #[serde(default)]
    pub instances: Vec<InstanceJournal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub subnet: String,
    pub seed: u64,
}

/// One instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceJournal {
    pub group: String,
    pub index: u32,
    /// The short id its lines carry under container runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The latest of: `running`, `ok`, `fail`, `crash`, `incomplete`, `internal_err`,
    /// `timeout`, `killed`, `exited`.
    pub state: String,
    /// How it ended (`exited with status 0`), once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Whether it counts as ok as far as the instance itself goes, once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// Seconds since the run started when it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<f64>,
    pub events: Vec<JournalEvent>,
    /// Timeline events beyond [`MAX_EVENTS`], not kept.
    #[serde(default)]
    pub events_dropped: u32,
    pub network: Vec<AppliedConfig>,
    #[serde(default)]
    pub network_dropped: u32,
}

/// A point on an instance's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEvent {
    /// Seconds since the run started.
    pub t: f64,
    /// The original's class: `START`, `MESSAGE`, `OK`, `FAIL`, ...
    pub kind: String,
    pub text: String,
}

/// A `network.Config` the sidecar applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedConfig {
    pub at: DateTime<Utc>,
    pub config: serde_json::Value,
}

/// The live journal of one task.
#[derive(Debug)]
pub struct RunJournal {
    path: PathBuf,
    data: JournalData,
    by_key: HashMap<(String, u32), usize>,
    dirty: bool,
    last_write: Option<Instant>,
}

impl RunJournal {
    pub fn new(path: PathBuf) -> Self {
        RunJournal {
            path,
            data: JournalData::default(),
            by_key: HashMap::new(),
            dirty: false,
            last_write: None,
        }
    }

    /// The journal file of `task_id` in the daemon directory.
    pub fn path_in(daemon_dir: &Path, task_id: &str) -> PathBuf {
        daemon_dir.join(format!("{task_id}.journal.json"))
    }

    /// Reads a journal file; `None` when there is none (a build, or a task of an older
    /// version) or it cannot be decoded.
    pub fn load(path: &Path) -> Option<JournalData> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn data(&self) -> &JournalData {
        &self.data
    }

    fn instance(&mut self, group: &str, index: u32) -> &mut InstanceJournal {
        let key = (group.to_string(), index);
        let i = match self.by_key.get(&key) {
            Some(&i) => i,
            None => {
                self.data.instances.push(InstanceJournal {
                    group: group.to_string(),
                    index,
                    state: "running".into(),
                    ..Default::default()
                });
                let i = self.data.instances.len() - 1;
                self.by_key.insert(key, i);
                i
            }
        };
        &mut self.data.instances[i]
    }

    /// Records what `ev` says about the run; returns whether anything changed.
    pub fn apply(&mut self, ev: &TaskEvent) -> bool {
        let changed = match ev {
            TaskEvent::RunStarted(_) => {
                self.data.started_at = Some(Utc::now());
                true
            }
            TaskEvent::Runner(RunnerEvent::Network { subnet, seed }) => {
                self.data.network = Some(NetworkInfo {
                    subnet: subnet.clone(),
                    seed: *seed,
                });
                true
            }
            TaskEvent::Runner(RunnerEvent::Instance(line)) => {
                let inst = self.instance(&line.group, line.index);
                if line.tag.is_some() {
                    inst.tag.clone_from(&line.tag);
                }
                let state = match line.kind {
                    // Raw output lines are in run.out / run.err.
                    LineKind::Error | LineKind::Other => return false,
                    LineKind::Start | LineKind::Message => None,
                    LineKind::Ok => Some("ok"),
                    LineKind::Fail => Some("fail"),
                    LineKind::Crash => Some("crash"),
                    LineKind::Incomplete => Some("incomplete"),
                    LineKind::InternalErr => Some("internal_err"),
                    LineKind::Timeout => Some("timeout"),
                    LineKind::Killed => Some("killed"),
                };
                if let Some(s) = state {
                    inst.state = s.to_string();
                }
                if inst.events.len() < MAX_EVENTS || state.is_some() {
                    let mut text = line.text.clone();
                    if text.len() > MAX_TEXT {
                        let mut cut = MAX_TEXT;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        text.truncate(cut);
                        text.push('…');
                    }
                    inst.events.push(JournalEvent {
                        t: line.elapsed.as_secs_f64(),
                        kind: line.kind.as_str().to_string(),
                        text,
                    });
                } else {
                    inst.events_dropped += 1;
                }
                true
            }
            TaskEvent::Runner(RunnerEvent::Exited {
                group,
                index,
                elapsed,
                status,
                ok,
            }) => {
                let inst = self.instance(group, *index);
                inst.status = Some(status.clone());
                inst.ok = Some(*ok);
                inst.ended = Some(elapsed.as_secs_f64());
                if inst.state == "running" {
                    inst.state = "exited".into();
                }
                true
            }
            TaskEvent::Runner(RunnerEvent::NetworkApplied {
                group,
                index,
                config,
                ..
            }) => {
                let inst = self.instance(group, *index);
                if inst.network.len() < MAX_CONFIGS {
                    let config = serde_json::from_str(config)
                        .unwrap_or_else(|_| serde_json::Value::String(config.clone()));
                    inst.network.push(AppliedConfig {
                        at: Utc::now(),
                        config,
                    });
                } else {
                    inst.network_dropped += 1;
                }
                true
            }
            _ => false,
        };
        self.dirty |= changed;
        changed
    }

    /// Writes the file when something changed and the last write is older than a second.
    pub fn write_if_due(&mut self, now: Instant) {
        if self.dirty
            && self
                .last_write
                .is_none_or(|t| now.duration_since(t) >= WRITE_EVERY)
        {
            self.write(now);
        }
    }

    /// Writes the file if anything changed since the last write.
    pub fn flush(&mut self) {
        if self.dirty {
            self.write(Instant::now());
        }
    }

    fn write(&mut self, now: Instant) {
        self.dirty = false;
        self.last_write = Some(now);
        let Ok(bytes) = serde_json::to_vec(&self.data) else {
            return;
        };
        // Readers in other processes must never see half a file.
        let tmp = self.path.with_extension("json.tmp");
        let res = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = res {
            tracing::warn!("cannot write run journal {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RunSummary;
    use tg_runner::InstanceLine;

    fn line(group: &str, index: u32, kind: LineKind, text: &str) -> TaskEvent {
        TaskEvent::Runner(RunnerEvent::Instance(InstanceLine {
            group: group.into(),
            index,
            tag: Some("abc123".into()),
            elapsed: Duration::from_millis(1500),
            kind,
            text: text.into(),
        }))
    }

    #[test]
    fn follows_instances_through_their_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = RunJournal::path_in(dir.path(), "t1");
        let mut j = RunJournal::new(path.clone());
        assert!(j.apply(&TaskEvent::RunStarted(RunSummary {
            run_id: "t1".into(),
            plan: "p".into(),
            case: "c".into(),
            runner: "local:exec".into(),
            instances: 2,
        })));
        j.apply(&TaskEvent::Runner(RunnerEvent::Network {
            subnet: "100.64.0.0/16".into(),
            seed: 7,
        }));
        j.apply(&line("single", 0, LineKind::Start, "{}"));
        j.apply(&line("single", 1, LineKind::Start, "{}"));
        assert!(!j.apply(&line("single", 1, LineKind::Other, "raw")));
        j.apply(&line("single", 0, LineKind::Ok, ""));
        j.apply(&line("single", 1, LineKind::Fail, "boom"));
        j.apply(&TaskEvent::Runner(RunnerEvent::NetworkApplied {
            group: "single".into(),
            index: 1,
            elapsed: Duration::ZERO,
            config: r#"{"network":"default","enable":true}"#.into(),
        }));
        for (i, ok) in [(0, true), (1, false)] {
            j.apply(&TaskEvent::Runner(RunnerEvent::Exited {
                group: "single".into(),
                index: i,
                elapsed: Duration::from_secs(2),
                status: format!("exited with status {}", u8::from(!ok)),
                ok,
            }));
        }
        j.flush();
        let d = RunJournal::load(&path).unwrap();
        assert_eq!(d, *j.data());
        assert_eq!(d.network.as_ref().unwrap().seed, 7);
        let [a, b] = &d.instances[..] else {
            panic!("{d:?}")
        };
        assert_eq!((a.state.as_str(), a.ok), ("ok", Some(true)));
        assert_eq!(a.tag.as_deref(), Some("abc123"));
        assert_eq!(
            (b.state.as_str(), b.status.as_deref()),
            ("fail", Some("exited with status 1"))
        );
        assert_eq!(b.events.len(), 2, "raw lines are not journaled");
        assert_eq!(b.events[1].text, "boom");
        assert_eq!(b.network[0].config["network"], "default");
    }

    #[test]
    fn bounded_per_instance_but_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = RunJournal::new(dir.path().join("j.json"));
        for i in 0..(MAX_EVENTS + 20) {
            j.apply(&line("g", 0, LineKind::Message, &format!("m{i}")));
        }
        j.apply(&line("g", 0, LineKind::Crash, &"x".repeat(10_000)));
        let inst = &j.data().instances[0];
        assert_eq!(inst.events.len(), MAX_EVENTS + 1);
        assert_eq!(inst.events_dropped, 20);
        assert_eq!(inst.state, "crash");
        assert!(inst.events.last().unwrap().text.len() <= MAX_TEXT + 3);
    }

    #[test]
    fn writes_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.json");
        let mut j = RunJournal::new(path.clone());
        let t0 = Instant::now();
        j.apply(&line("g", 0, LineKind::Start, ""));
        j.write_if_due(t0);
        assert_eq!(
            RunJournal::load(&path).unwrap().instances[0].events.len(),
            1
        );
        j.apply(&line("g", 0, LineKind::Message, "later"));
        j.write_if_due(t0 + Duration::from_millis(500));
        assert_eq!(
            RunJournal::load(&path).unwrap().instances[0].events.len(),
            1
        );
        j.write_if_due(t0 + Duration::from_millis(1000));
        assert_eq!(
            RunJournal::load(&path).unwrap().instances[0].events.len(),
            2
        );
    }
}
