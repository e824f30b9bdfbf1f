//! The pipeline stages of a [`Link`](crate::Link), one small type per netem feature.
//!
//! Each stage that needs randomness owns its own ChaCha8 stream (same link seed, distinct stream number), so
//! whether one feature is enabled never shifts the random numbers another feature sees: turning on
//! duplication does not change which packets are lost. A stage whose outcome is certain (probability 0 or
//! 100%, no jitter) draws nothing, which keeps unshaped links cheap.

use std::collections::VecDeque;
use std::ops::Range;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Nanos;

/// 2^32: probabilities and correlations are fixed-point fractions of this, as in the kernel.
const ONE: u64 = 1 << 32;

/// Stream numbers of the stages sharing one link seed.
const STREAM_LOSS: u64 = 0;
const STREAM_DUPLICATE: u64 = 1;
const STREAM_CORRUPT: u64 = 2;
const STREAM_DELAY: u64 = 3;

fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A percentage (netem's unit) as a fraction of [`ONE`], clamped to 0..=100; NaN counts as 0.
fn fraction(percent: f32) -> u64 {
    if percent.is_nan() || percent <= 0.0 {
        return 0;
    }
    let p = f64::from(percent.min(100.0)) / 100.0;
    (p * ONE as f64).round() as u64
}

/// netem's correlated Bernoulli trial (`get_crandom` in `sch_netem.c`).
///
/// Each draw is u = (1-ρ)·U + ρ·last with U uniform, and the event happens when u < p. Like netem this is a
/// moving average, not a Markov chain: a high ρ makes events come in runs but also pulls u towards its mean,
/// so the long-run event rate drifts away from p (towards 0 for p < 50%, towards 1 above). That is what
/// `tc` users get, so it is reproduced rather than fixed. Arithmetic is in 32-bit fixed point like the kernel.
#[derive(Clone, Debug)]
pub struct Chance {
    threshold: u64,
    rho: u64,
    last: u64,
}

impl Chance {
    /// `percent` and `corr_percent` are 0..=100 (clamped).
    pub fn new(percent: f32, corr_percent: f32) -> Self {
        Self {
            threshold: fraction(percent),
            rho: fraction(corr_percent),
            last: 0,
        }
    }

    /// Whether the outcome depends on a draw at all (0 < p < 100%).
    pub fn is_random(&self) -> bool {
        self.threshold > 0 && self.threshold < ONE
    }

    /// Whether the event never happens (p = 0).
    pub fn never(&self) -> bool {
        self.threshold == 0
    }

    /// One trial. Certain outcomes draw nothing and leave the correlation memory alone.
    pub fn draw(&mut self, rng: &mut impl RngCore) -> bool {
        if !self.is_random() {
            return self.threshold >= ONE;
        }
        let value = u64::from(rng.next_u32());
        // Both terms are < 2^32·(weight) and the weights sum to 2^32, so the sum stays below 2^64.
        let u = if self.rho == 0 {
            value
        } else {
            (value * (ONE - self.rho) + self.last * self.rho) >> 32
        };
        self.last = u;
        u < self.threshold
    }
}

/// A [`Chance`] with its own random stream, created only if the chance is not a certainty.
#[derive(Clone, Debug)]
struct Trial {
    chance: Chance,
    rng: Option<ChaCha8Rng>,
}

impl Trial {
    fn new(percent: f32, corr: f32, seed: u64, stream_no: u64) -> Self {
        let chance = Chance::new(percent, corr);
        let rng = chance.is_random().then(|| stream(seed, stream_no));
        Self { chance, rng }
    }

    fn draw(&mut self) -> bool {
        match &mut self.rng {
            Some(rng) => self.chance.draw(rng),
            None => self.chance.threshold >= ONE,
        }
    }
}

/// Stage 3: random loss.
#[derive(Clone, Debug)]
pub struct Loss(Trial);

impl Loss {
    /// The link shape has no loss correlation, so links use `corr = 0`; the parameter exists because
    /// netem has one and the stage is usable on its own.
    pub fn new(percent: f32, corr: f32, seed: u64) -> Self {
        Self(Trial::new(percent, corr, seed, STREAM_LOSS))
    }

    /// Whether the next packet is lost.
    pub fn lose(&mut self) -> bool {
        self.0.draw()
    }
}

/// Stage 4: random duplication.
#[derive(Clone, Debug)]
pub struct Duplicate(Trial);

impl Duplicate {
    pub fn new(percent: f32, corr: f32, seed: u64) -> Self {
        Self(Trial::new(percent, corr, seed, STREAM_DUPLICATE))
    }

    /// Whether the next packet is duplicated.
    pub fn duplicate(&mut self) -> bool {
        self.0.draw()
    }
}

/// Stage 5: random single-bit corruption of the payload.
#[derive(Clone, Debug)]
pub struct Corrupt {
    chance: Chance,
    /// Needed even at 100%: the position of the flipped bit is random.
    rng: Option<ChaCha8Rng>,
}

impl Corrupt {
    pub fn new(percent: f32, corr: f32, seed: u64) -> Self {
        let chance = Chance::new(percent, corr);
        let rng = (chance.threshold > 0).then(|| stream(seed, STREAM_CORRUPT));
        Self { chance, rng }
    }

    /// Maybe flips one random bit of `packet[payload]`; returns whether it did.
    ///
    /// Only the payload is touched: netem flips a bit anywhere in the skb's linear data, but a broken IP header
    /// would be dropped by the receiving kernel before any transport sees it, and the point of corruption is
    /// to exercise the transport's checksum. Checksums are deliberately not fixed. A packet with an empty
    /// payload still consumes the trial but is left intact.
    pub fn apply(&mut self, packet: &mut [u8], payload: Range<usize>) -> bool {
        let Some(rng) = &mut self.rng else {
            return false;
        };
        if !self.chance.draw(rng) || payload.is_empty() {
            return false;
        }
        let at = rng.random_range(payload);
        let bit = rng.random_range(0..8u32);
        packet[at] ^= 1 << bit;
        true
    }
}

/// Stage 6: bandwidth limit, a FIFO serialising packets onto a wire of `bandwidth` bits per second.
///
/// Deviation from netem: netem folds the rate into the delay computation (the transmission time is added
/// after the last queued packet's *delayed* send time), which makes rate and latency interact in surprising
/// ways. Here the wire comes first and latency is propagation delay after it, as on a real link, which
/// gives the intuitive throughput = min(offered, bandwidth) and latency = queueing + serialisation + delay.
#[derive(Clone, Debug, Default)]
pub struct Rate {
    bandwidth: u64,
    busy_until: Nanos,
    /// End-of-transmission times of the packets admitted but not yet on the wire completely, in order.
    queued: VecDeque<Nanos>,
}

impl Rate {
    /// `bandwidth` in bits per second; 0 = unlimited.
    pub fn new(bandwidth: u64) -> Self {
        Self {
            bandwidth,
            ..Self::default()
        }
    }

    /// Admits a packet of `len` bytes offered at `now`: returns when it has left the wire, or `None` if
    /// `limit` packets are already waiting (tail drop, like netem's `limit`).
    pub fn admit(&mut self, now: Nanos, len: usize, limit: usize) -> Option<Nanos> {
        if self.bandwidth == 0 {
            return Some(now);
        }
        while self.queued.front().is_some_and(|&end| end <= now) {
            self.queued.pop_front();
        }
        if self.queued.len() >= limit {
            return None;
        }
        let bits = len as u128 * 8 * 1_000_000_000;
        let tx = bits.div_ceil(u128::from(self.bandwidth));
        let end = self
            .busy_until
            .max(now)
            .saturating_add(u64::try_from(tx).unwrap_or(u64::MAX));
        self.busy_until = end;
        self.queued.push_back(end);
        Some(end)
    }

    /// Packets admitted whose transmission had not ended at the last admission.
    pub fn backlog(&self) -> usize {
        self.queued.len()
    }
}

/// Stage 7: latency, jitter and reordering.
#[derive(Clone, Debug)]
pub struct Delay {
    latency: Nanos,
    jitter: Nanos,
    reorder: Chance,
    rng: Option<ChaCha8Rng>,
}

impl Delay {
    pub fn new(latency: Nanos, jitter: Nanos, reorder: f32, reorder_corr: f32, seed: u64) -> Self {
        // Like tc, reordering needs a delay to jump over; without latency the setting is inert.
        let reorder = if latency > 0 {
            Chance::new(reorder, reorder_corr)
        } else {
            Chance::new(0.0, 0.0)
        };
        let needs_rng = jitter > 0 || reorder.threshold > 0;
        Self {
            latency,
            jitter,
            rng: needs_rng.then(|| stream(seed, STREAM_DELAY)),
            reorder,
        }
    }

    /// When a packet that left the wire at `t` is due, and whether it was picked to jump the queue.
    ///
    /// A reordered packet goes out at `t` undelayed (netem's reorder with gap 1, which is what `tc ... reorder
    /// P%` sets). Otherwise the delay is `latency` plus a uniform sample in `[-jitter, +jitter]`, floored at 0:
    /// netem's jitter without a distribution table is likewise uniform (its `tabledist` fallback).
    pub fn due(&mut self, t: Nanos) -> (Nanos, bool) {
        let Some(rng) = &mut self.rng else {
            return (t.saturating_add(self.latency), false);
        };
        if self.reorder.threshold > 0 && self.reorder.draw(rng) {
            return (t, true);
        }
        let mut delay = self.latency;
        if self.jitter > 0 {
            let sample = rng.random_range(0..=self.jitter.saturating_mul(2));
            delay = delay.saturating_add(sample).saturating_sub(self.jitter);
        }
        (t.saturating_add(delay), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_clamps() {
        assert_eq!(fraction(-5.0), 0);
        assert_eq!(fraction(f32::NAN), 0);
        assert_eq!(fraction(0.0), 0);
        assert_eq!(fraction(100.0), ONE);
        assert_eq!(fraction(250.0), ONE);
        assert_eq!(fraction(50.0), ONE / 2);
    }

    #[test]
    fn certain_chances_do_not_draw() {
        let mut rng = stream(1, 0);
        let before = rng.clone().next_u64();
        assert!(!Chance::new(0.0, 50.0).draw(&mut rng));
        assert!(Chance::new(100.0, 50.0).draw(&mut rng));
        assert_eq!(rng.next_u64(), before);
    }

    #[test]
    fn full_correlation_repeats_forever() {
        let mut c = Chance::new(50.0, 100.0);
        let mut rng = stream(7, 0);
        let first = c.draw(&mut rng);
        assert!((0..100).all(|_| c.draw(&mut rng) == first));
    }

    #[test]
    fn rate_serialises_and_tail_drops() {
        // 1000 bytes at 8 Mbit/s = 1 ms each.
        let mut r = Rate::new(8_000_000);
        assert_eq!(r.admit(0, 1000, 2), Some(1_000_000));
        assert_eq!(r.admit(0, 1000, 2), Some(2_000_000));
        assert_eq!(r.admit(0, 1000, 2), None);
        // At 1 ms the first has left the wire; the queue has room again, and the wire is busy until 2 ms.
        assert_eq!(r.admit(1_000_000, 1000, 2), Some(3_000_000));
        // An idle wire starts at once.
        assert_eq!(r.admit(10_000_000, 1, 2), Some(10_001_000));
        assert_eq!(Rate::new(0).admit(5, 1500, 0), Some(5));
    }

    #[test]
    fn rate_rounds_up() {
        // 1 byte at 3 bit/s: 8/3 s = 2.666..67 s, rounded up to the next nanosecond.
        assert_eq!(Rate::new(3).admit(0, 1, 10), Some(2_666_666_667));
    }

    #[test]
    fn corrupt_flips_one_payload_bit() {
        let mut c = Corrupt::new(100.0, 0.0, 3);
        for _ in 0..100 {
            let orig = vec![0u8; 40];
            let mut p = orig.clone();
            assert!(c.apply(&mut p, 20..40));
            let diff: u32 = p.iter().zip(&orig).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(diff, 1);
            assert_eq!(p[..20], orig[..20]);
        }
        let mut empty = vec![0u8; 20];
        assert!(!c.apply(&mut empty, 20..20));
        assert_eq!(empty, vec![0u8; 20]);
    }

    #[test]
    fn delay_without_randomness_is_exact() {
        let mut d = Delay::new(5, 0, 0.0, 0.0, 1);
        assert_eq!(d.due(10), (15, false));
        // Reorder without latency is inert, like tc.
        let mut d = Delay::new(0, 0, 100.0, 0.0, 1);
        assert_eq!(d.due(10), (10, false));
        let mut d = Delay::new(7, 0, 100.0, 0.0, 1);
        assert_eq!(d.due(10), (10, true));
    }

    #[test]
    fn jitter_floors_at_zero() {
        let mut d = Delay::new(1, 1_000, 0.0, 0.0, 9);
        for _ in 0..1000 {
            let (due, _) = d.due(100);
            assert!((100..=1_101).contains(&due));
        }
    }
}
