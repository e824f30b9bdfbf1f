//! The release schedule: every packet in flight, ordered by (due time, scheduling sequence number).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use crate::{Nanos, NodeId};

pub(crate) struct Entry {
    pub due: Nanos,
    seq: u64,
    pub to: NodeId,
    pub packet: Vec<u8>,
}

impl Entry {
    fn key(&self) -> (Nanos, u64) {
        (self.due, self.seq)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest entry first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

/// A min-heap plus a FIFO "fast lane".
///
/// Most traffic is scheduled in due-time order already (unshaped links are due `now`; links with a common
/// fixed latency are due `now + latency`), so an entry whose due time is not earlier than the lane's last
/// goes to the lane in O(1) instead of the heap in O(log n). Both structures are sorted by (due, seq), since
/// seq only grows, so the global minimum is the smaller of their two fronts.
#[derive(Default)]
pub(crate) struct Scheduler {
    lane: VecDeque<Entry>,
    heap: BinaryHeap<Entry>,
    next_seq: u64,
}

impl Scheduler {
    pub fn push(&mut self, due: Nanos, to: NodeId, packet: Vec<u8>) {
        let entry = Entry {
            due,
            seq: self.next_seq,
            to,
            packet,
        };
        self.next_seq += 1;
        if self.lane.back().is_none_or(|last| last.due <= due) {
            self.lane.push_back(entry);
        } else {
            self.heap.push(entry);
        }
    }

    /// Whether the lane's front comes before the heap's (and exists).
    fn lane_first(&self) -> Option<bool> {
        match (self.lane.front(), self.heap.peek()) {
            (None, None) => None,
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (Some(l), Some(h)) => Some(l.key() < h.key()),
        }
    }

    pub fn next_due(&self) -> Option<Nanos> {
        match (self.lane.front(), self.heap.peek()) {
            (Some(l), Some(h)) => Some(l.due.min(h.due)),
            (l, h) => l.or(h).map(|e| e.due),
        }
    }

    /// Removes and returns the earliest entry if it is due at or before `now`.
    pub fn pop_due(&mut self, now: Nanos) -> Option<Entry> {
        if self.lane_first()? {
            if self.lane.front()?.due > now {
                return None;
            }
            self.lane.pop_front()
        } else {
            if self.heap.peek()?.due > now {
                return None;
            }
            self.heap.pop()
        }
    }

    pub fn len(&self) -> usize {
        self.lane.len() + self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lane_and_heap_in_order() {
        let mut s = Scheduler::default();
        for (i, due) in [5u64, 7, 3, 7, 1, 9, 3].into_iter().enumerate() {
            s.push(due, NodeId(i as u32), Vec::new());
        }
        assert_eq!(s.len(), 7);
        assert_eq!(s.next_due(), Some(1));
        let mut out = Vec::new();
        while let Some(e) = s.pop_due(8) {
            out.push((e.due, e.to.0));
        }
        // Ties (3 and 7) come out in scheduling order.
        assert_eq!(out, [(1, 4), (3, 2), (3, 6), (5, 0), (7, 1), (7, 3)]);
        assert_eq!(s.next_due(), Some(9));
        assert!(s.pop_due(8).is_none());
        assert_eq!(s.pop_due(9).map(|e| e.to), Some(NodeId(5)));
        assert!(s.pop_due(u64::MAX).is_none());
        assert_eq!(s.next_due(), None);
    }
}
