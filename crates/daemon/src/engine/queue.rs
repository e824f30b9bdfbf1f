//! The queue of scheduled tasks: highest priority first, then first submitted first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, PartialEq, Eq)]
struct Queued {
    priority: i32,
    seq: u64,
    id: String,
}

impl Ord for Queued {
    /// Higher priority first, then first come first served.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Not thread-safe by itself: the engine keeps it behind a mutex.
#[derive(Debug, Default)]
pub(crate) struct TaskQueue {
    heap: BinaryHeap<Queued>,
    seq: u64,
}

impl TaskQueue {
    /// Adds a task; among equal priorities, tasks pushed earlier are popped earlier. Tasks
    /// restored after a restart must therefore be pushed in submission order.
    pub(crate) fn push(&mut self, id: &str, priority: i32) {
        self.seq += 1;
        self.heap.push(Queued {
            priority,
            seq: self.seq,
            id: id.to_owned(),
        });
    }

    pub(crate) fn pop(&mut self) -> Option<String> {
        self.heap.pop().map(|q| q.id)
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Removes a queued task; true if it was queued.
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        let before = self.heap.len();
        self.heap.retain(|e| e.id != id);
        before != self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_submission_order() {
        let mut q = TaskQueue::default();
        q.push("a", 0);
        q.push("b", 5);
        q.push("c", 0);
        q.push("d", 5);
        assert!(q.remove("c"));
        assert!(!q.remove("c"));
        q.push("e", 0);
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["b", "d", "a", "e"]);
    }
}
