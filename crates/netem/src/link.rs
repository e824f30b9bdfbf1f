//! A link: one sender's egress path towards one rule (or its default), composing the stages in netem's order.

use std::ops::Range;

use crate::stage::{Chance, Corrupt, Delay, Duplicate, Loss, Rate};
use crate::{Filter, Nanos, Shape};

/// The state of one (sender, rule-or-default) pair: its filter and the stages of its pipeline.
///
/// The emulator drives the stages in a fixed order: filter, [`lose`](Self::lose),
/// [`duplicate`](Self::duplicate), then [`transmit`](Self::transmit) (corrupt, rate, delay) for the original
/// and, if duplicated, for the copy.
#[derive(Clone, Debug)]
pub struct Link {
    filter: Filter,
    loss: Loss,
    duplicate: Duplicate,
    corrupt: Corrupt,
    rate: Rate,
    delay: Delay,
    /// The latency, when the link does nothing else to a packet (accepts it, no random stage, no
    /// bandwidth limit): then every wire packet of a super-packet would get the same fate, so it may pass
    /// whole.
    whole: Option<Nanos>,
}

/// A packet's fate after the corrupt, rate and delay stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// When the packet reaches the receiver.
    pub due: Nanos,
    pub corrupted: bool,
    pub reordered: bool,
}

impl Link {
    /// A fresh link (empty queue, no correlation memory) whose random streams all derive from `seed`.
    pub fn new(filter: Filter, shape: &Shape, seed: u64) -> Self {
        let never = |p: f32| Chance::new(p, 0.0).never();
        let whole = (filter == Filter::Accept
            && never(shape.loss)
            && never(shape.duplicate)
            && never(shape.corrupt)
            && (never(shape.reorder) || shape.latency == 0)
            && shape.jitter == 0
            && shape.bandwidth == 0)
            .then_some(shape.latency);
        Self {
            whole,
            filter,
            // The link shape has no loss correlation (neither has Testground's LinkShape).
            loss: Loss::new(shape.loss, 0.0, seed),
            duplicate: Duplicate::new(shape.duplicate, shape.duplicate_corr, seed),
            corrupt: Corrupt::new(shape.corrupt, shape.corrupt_corr, seed),
            rate: Rate::new(shape.bandwidth),
            delay: Delay::new(
                shape.latency,
                shape.jitter,
                shape.reorder,
                shape.reorder_corr,
                seed,
            ),
        }
    }

    /// `Some(latency)` when the link only delays packets (see [`Emulator::send_offloaded`]): each wire
    /// packet would be accepted and due `latency` after it was offered, with no random draw.
    ///
    /// [`Emulator::send_offloaded`]: crate::Emulator::send_offloaded
    pub fn only_delays(&self) -> Option<Nanos> {
        self.whole
    }

    pub fn filter(&self) -> Filter {
        self.filter
    }

    /// Stage 3: whether the next packet is lost.
    pub fn lose(&mut self) -> bool {
        self.loss.lose()
    }

    /// Stage 4: whether the next (surviving) packet is duplicated.
    pub fn duplicate(&mut self) -> bool {
        self.duplicate.duplicate()
    }

    /// Stages 5-7 for one packet offered at `now`: maybe corrupts `packet[payload]` in place, queues it for the
    /// wire and delays it. `None` means the wire's queue held `queue_limit` packets and this one was
    /// tail-dropped.
    pub fn transmit(
        &mut self,
        now: Nanos,
        packet: &mut [u8],
        payload: Range<usize>,
        queue_limit: usize,
    ) -> Option<Transmit> {
        let corrupted = self.corrupt.apply(packet, payload);
        let sent = self.rate.admit(now, packet.len(), queue_limit)?;
        let (due, reordered) = self.delay.due(sent);
        Some(Transmit {
            due,
            corrupted,
            reordered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshaped_link_is_transparent() {
        let mut l = Link::new(Filter::Accept, &Shape::default(), 1);
        let mut p = vec![1u8; 100];
        for now in 0..1000 {
            assert!(!l.lose());
            assert!(!l.duplicate());
            let t = l.transmit(now, &mut p, 20..100, 1).unwrap();
            assert_eq!(
                t,
                Transmit {
                    due: now,
                    corrupted: false,
                    reordered: false
                }
            );
        }
        assert_eq!(p, vec![1u8; 100]);
    }

    #[test]
    fn rate_then_latency() {
        let shape = Shape {
            latency: 10,
            bandwidth: 8_000_000_000, // 1 ns per byte
            ..Shape::default()
        };
        let mut l = Link::new(Filter::Accept, &shape, 1);
        let mut p = vec![0u8; 100];
        assert_eq!(l.transmit(0, &mut p, 20..100, 10).unwrap().due, 110);
        assert_eq!(l.transmit(0, &mut p, 20..100, 10).unwrap().due, 210);
    }
}
