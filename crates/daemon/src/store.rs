//! The task store: one SQLite database under `$TESTGROUND_HOME/tasks.db`.
//!
//! Each task is kept whole as JSON (the shape `status --extended` prints) next to the columns
//! used for filtering. The daemon and embedded CLIs may share the file, so it runs in WAL mode
//! with a busy timeout.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tg_api::rpc::TasksFilters;
use tg_api::task::Task;

use crate::engine::owner::Owner;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("task store: corrupt task {id}: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
}

pub struct Store {
    conn: Mutex<Connection>,
    /// Tasks written by this process (see [`Store::version`]).
    writes: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // Several processes may open a new store at once (an embedded run and `testground
        // tasks` next to it). Switching a fresh file to WAL needs an exclusive lock, and SQLite
        // answers BUSY at once, without its busy handler, when that upgrade would deadlock with
        // another connection: retry the whole opening for a while instead of failing the CLI.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match Self::try_open(path) {
                Err(StoreError::Sql(e))
                    if matches!(
                        e.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        )
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY,
                created TEXT NOT NULL,
                state TEXT NOT NULL,
                type TEXT NOT NULL,
                plan TEXT NOT NULL,
                testcase TEXT NOT NULL,
                owner_pid INTEGER NOT NULL DEFAULT 0,
                data TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);",
        )?;
        // Added after the first release: an owner is its pid and its start time.
        let has_start: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'owner_start'")?
            .exists([])?;
        if !has_start {
            match conn.execute_batch(
                "ALTER TABLE tasks ADD COLUMN owner_start INTEGER NOT NULL DEFAULT 0",
            ) {
                // Another process added it meanwhile.
                Err(rusqlite::Error::SqliteFailure(_, Some(m)))
                    if m.contains("duplicate column") => {}
                other => other?,
            }
        }
        Ok(Store {
            conn: Mutex::new(conn),
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts or replaces a task. `owner` is the process running it ([`Owner::NONE`] when
    /// queued or finished).
    pub(crate) fn put(&self, task: &Task, owner: Owner) -> Result<(), StoreError> {
        let data = serde_json::to_string(task).map_err(|source| StoreError::Corrupt {
            id: task.id.clone(),
            source,
        })?;
        let created = task.created().map(|c| c.to_rfc3339()).unwrap_or_default();
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conn().execute(
            "INSERT OR REPLACE INTO tasks (id, created, state, type, plan, testcase, owner_pid, data, owner_start)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                task.id,
                created,
                task.state().as_str(),
                task.task_type.to_string(),
                task.plan,
                task.case,
                owner.pid,
                data,
                owner.start as i64
            ],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let data: Option<String> = self
            .conn()
            .query_row("SELECT data FROM tasks WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        data.map(|d| decode(id, &d)).transpose()
    }

    /// The process that runs the task ([`Owner::NONE`] if none recorded).
    pub(crate) fn owner(&self, id: &str) -> Result<Owner, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT owner_pid, owner_start FROM tasks WHERE id = ?1",
                [id],
                |r| {
                    Ok(Owner {
                        pid: r.get(0)?,
                        start: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .optional()?
            .unwrap_or(Owner::NONE))
    }

    /// A number that changes whenever a task changes, in this process or in another one
    /// (SQLite's `data_version` moves on other connections' commits, our counter on ours):
    /// what the dashboard polls to refresh its lists.
    pub fn version(&self) -> u64 {
        let theirs: i64 = self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap_or(0);
        self.writes
            .load(std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(theirs as u64)
    }

    /// Tasks matching the filter, newest first.
    pub fn list(&self, f: &TasksFilters) -> Result<Vec<Task>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, data FROM tasks ORDER BY created DESC, id DESC")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, data) = row?;
            let t = decode(&id, &data)?;
            if (f.types.is_empty() || f.types.contains(&t.task_type))
                && (f.states.is_empty() || f.states.contains(&t.state()))
                && (f.test_plan.is_empty() || f.test_plan == t.plan)
                && (f.test_case.is_empty() || f.test_case == t.case)
            {
                out.push(t);
            }
        }
        Ok(out)
    }
}

fn decode(id: &str, data: &str) -> Result<Task, StoreError> {
    serde_json::from_str(data).map_err(|source| StoreError::Corrupt {
        id: id.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_processes_may_create_the_store_at_once() {
        // Child processes, not threads: the BUSY at the switch to WAL comes from file locks
        // between processes. Each child opens the same fresh file; all must succeed.
        if let Ok(path) = std::env::var("TG_STORE_OPEN_CHILD") {
            Store::open(Path::new(&path)).expect("open in child");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..8)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "store::tests::many_processes_may_create_the_store_at_once",
                        "--nocapture",
                    ])
                    .env("TG_STORE_OPEN_CHILD", &path)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Store::open(&path).unwrap();
    }

    #[test]
    fn version_moves_on_writes_of_either_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let a = Store::open(&path).unwrap();
        let b = Store::open(&path).unwrap();
        let (va, vb) = (a.version(), b.version());
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "t1", "priority": 0, "type": "run", "plan": "p", "case": "c",
            "states": [{"created": "2026-12-01T00:00:00Z", "state": "scheduled"}],
        }))
        .unwrap();
        a.put(&task, Owner::NONE).unwrap();
        assert_ne!(a.version(), va, "own write");
        assert_ne!(b.version(), vb, "another connection's write");
        let vb = b.version();
        assert_eq!(b.version(), vb, "steady without writes");
    }
}
