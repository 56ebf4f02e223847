//! Randomness for the whole workspace, in two kinds that are kept apart on purpose.
//!
//! - **Fast, not secret**: [`u64()`], [`fraction`], [`up_to`], [`jitter`] and [`hex`] draw from a
//!   per-thread xorshift64* generator, seeded once per thread from the operating system. A draw is
//!   a few arithmetic instructions and no system call, so it suits hot paths: retry, schedule and
//!   TTL jitter, early refresh, trace, span, request and node ids. Its output is predictable from a
//!   few values it has produced: **never use it for anything someone must not guess**.
//! - **Secure**: [`secure_bytes`] reads the operating system's generator on every call, for tokens,
//!   secrets and keys.
//!
//! Neither can be seeded. Code that needs a reproducible stream (a load generator, a test that
//! replays a mix of operations) keeps a seeded generator of its own.

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    /// This thread's generator state: never zero (a zero state would stay zero).
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut seed = [0u8; 8];
    secure_bytes(&mut seed);
    u64::from_le_bytes(seed) | 1
}

/// 64 random bits from this thread's fast generator. Not for secrets.
pub fn u64() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Uniform in `[0, 1)`, with 53 bits of precision. Not for secrets.
pub fn fraction() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Uniform in `[0, max)`: full jitter, or a random extra on top of a fixed wait.
pub fn up_to(max: Duration) -> Duration {
    max.mul_f64(fraction())
}

/// `d` spread uniformly by up to `spread` of itself either way: in `[d·(1 − spread), d·(1 + spread))`.
/// `spread` is taken within `[0, 1]`; a result too long for a `Duration` is `Duration::MAX`.
pub fn jitter(d: Duration, spread: f64) -> Duration {
    let spread = if spread.is_nan() { 0.0 } else { spread.clamp(0.0, 1.0) };
    let factor = 1.0 - spread + 2.0 * spread * fraction();
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// `bytes` random bytes as `2 · bytes` lowercase hex digits, for ids that must be unique but need
/// not be secret (trace, span, request and node ids). Not for tokens: see [`secure_bytes`].
pub fn hex(bytes: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes);
    let mut word = 0u64;
    for i in 0..bytes {
        if i % 8 == 0 {
            word = u64();
        }
        let byte = (word >> (8 * (i % 8))) as u8;
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Fills `buf` from the operating system's generator: the path for tokens, secrets and keys.
///
/// # Panics
/// If the operating system has no random source to offer, which a server cannot run without.
pub fn secure_bytes(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source is available");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_in_range_and_roughly_uniform() {
        const SAMPLES: usize = 100_000;
        let mut buckets = [0usize; 10];
        let mut sum = 0.0;
        for _ in 0..SAMPLES {
            let f = fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
            buckets[(f * 10.0) as usize] += 1;
            sum += f;
        }
        // Each tenth expects 10 000 draws, with a standard deviation near 95: 10% off is far out.
        for (tenth, count) in buckets.iter().enumerate() {
            assert!((9_000..=11_000).contains(count), "tenth {tenth} drew {count} of {SAMPLES}: {buckets:?}");
        }
        let mean = sum / SAMPLES as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn every_bit_of_u64_varies() {
        let (mut any, mut all) = (0u64, u64::MAX);
        for _ in 0..1000 {
            let x = u64();
            any |= x;
            all &= x;
        }
        assert_eq!((any, all), (u64::MAX, 0));
    }

    #[test]
    fn durations_stay_within_their_range() {
        let d = Duration::from_secs(10);
        let (mut low, mut high) = (d, Duration::ZERO);
        for _ in 0..10_000 {
            let w = up_to(d);
            assert!(w < d, "{w:?}");
            let j = jitter(d, 0.1);
            assert!(j >= Duration::from_secs(9) && j < Duration::from_secs(11), "{j:?}");
            (low, high) = (low.min(j), high.max(j));
        }
        assert!(low < Duration::from_millis(9_100) && high > Duration::from_millis(10_900), "{low:?}..{high:?}");
        assert_eq!(jitter(d, 0.0), d);
        assert_eq!(up_to(Duration::ZERO), Duration::ZERO);
        assert!(jitter(d, 5.0) < 2 * d, "the spread is at most 1");
        assert_eq!(jitter(d, f64::NAN), d);
        assert!(jitter(Duration::MAX, 1.0) <= Duration::MAX, "no overflow");
    }

    #[test]
    fn hex_ids_have_the_right_length_and_digits() {
        for bytes in [0, 1, 7, 8, 9, 16, 33] {
            let id = hex(bytes);
            assert_eq!(id.len(), 2 * bytes, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        }
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| hex(16)).collect();
        assert_eq!(ids.len(), 1000, "ids repeat");
    }

    #[test]
    fn each_thread_has_its_own_generator() {
        let streams: Vec<Vec<u64>> = (0..4)
            .map(|_| std::thread::spawn(|| (0..4).map(|_| u64()).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect();
        let here: Vec<u64> = (0..4).map(|_| u64()).collect();
        for (i, a) in streams.iter().enumerate() {
            assert_ne!(*a, here);
            for b in &streams[i + 1..] {
                assert_ne!(a, b, "two threads drew the same numbers");
            }
        }
    }

    #[test]
    fn secure_bytes_are_filled_afresh() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        secure_bytes(&mut a);
        secure_bytes(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
        secure_bytes(&mut []);
    }
}
