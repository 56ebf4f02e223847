//! The load generator: a closed loop (N connections, each sending its next request when the last is
//! answered: the maximum) and an open loop (requests sent at fixed intended times whatever the server
//! does; latency measured from the intended time, so a stall is charged to every request it delayed:
//! no coordinated omission). Percentiles come from HdrHistogram.
//!
//! Why not wrk: it has no open-loop mode (wrk2 has, but is not packaged here), and its Lua cannot
//! cheaply draw from a Zipf distribution or mint unique idempotency keys per request at speed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// One request to send.
pub struct Call {
    pub method: reqwest::Method,
    pub path: String,
    pub token: Option<String>,
    pub headers: Vec<(&'static str, String)>,
    pub json: Option<serde_json::Value>,
    /// A status that is a refusal by design, not an error: counted in [`Outcome::refused`], and in
    /// neither the throughput nor the latencies. (A checkout of a cart whose items a pending order
    /// already took is a 409.)
    pub refusal: Option<u16>,
}

impl Call {
    pub fn get(path: String) -> Call {
        Call { method: reqwest::Method::GET, path, token: None, headers: Vec::new(), json: None, refusal: None }
    }
}

/// How a request was answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Refused,
    Failed,
}

/// Makes the `n`th request; `rng` draws which resource it is about.
pub type MakeCall = Arc<dyn Fn(u64, &mut Rng) -> Call + Send + Sync>;

/// What a run measured. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    /// Answered with the call's refusal status (see [`Call::refusal`]).
    pub refused: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl Outcome {
    pub fn from_histogram(histogram: &Histogram<u64>, errors: u64, refused: u64, seconds: f64) -> Outcome {
        let requests = histogram.len();
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Outcome {
            requests,
            errors,
            refused,
            seconds,
            per_second: requests as f64 / seconds,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds, from 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// A tiny, fast, seedable generator (xorshift64*): enough to pick resources, not for secrets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draws indices `0..n` with Zipf's law (exponent `s`): index 0 is the most popular.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Zipf { cdf: cdf.collect() }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.fraction();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

async fn send(client: &reqwest::Client, base: &str, call: Call) -> Answer {
    let mut request = client.request(call.method, format!("{base}{}", call.path));
    if let Some(token) = call.token {
        request = request.bearer_auth(token);
    }
    for (name, value) in call.headers {
        request = request.header(name, value);
    }
    if let Some(json) = call.json {
        request = request.json(&json);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            // Read the body: a response is only complete when it has arrived.
            match (response.bytes().await.is_ok(), status) {
                (true, status) if status.is_success() => Answer::Ok,
                (true, status) if Some(status.as_u16()) == call.refusal => Answer::Refused,
                _ => Answer::Failed,
            }
        }
        Err(_) => Answer::Failed,
    }
}

/// Runs `connections` loops as fast as the server answers; measures after `warmup` for `measure`.
pub async fn closed_loop(
    base: &str,
    make: MakeCall,
    connections: usize,
    warmup: Duration,
    measure: Duration,
) -> Outcome {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections).build().expect("an HTTP client");
    let start = Instant::now();
    let (measure_from, measure_to) = (start + warmup, start + warmup + measure);
    let sequence = Arc::new(AtomicU64::new(0));
    let (errors, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loops = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (client, make, sequence, errors, refused, base) =
            (client.clone(), make.clone(), sequence.clone(), errors.clone(), refused.clone(), base.to_owned());
        loops.spawn(async move {
            let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            let mut recorded = histogram();
            loop {
                let sent = Instant::now();
                if sent >= measure_to {
                    return recorded;
                }
                let call = make(sequence.fetch_add(1, Ordering::Relaxed), &mut rng);
                let answer = send(&client, &base, call).await;
                if sent >= measure_from {
                    match answer {
                        Answer::Ok => {
                            let _ = recorded.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        Answer::Refused => drop(refused.fetch_add(1, Ordering::Relaxed)),
                        Answer::Failed => drop(errors.fetch_add(1, Ordering::Relaxed)),
                    }
                }
            }
        });
    }
    let mut merged = histogram();
    while let Some(recorded) = loops.join_next().await {
        merged.add(recorded.expect("a load loop")).expect("same histogram bounds");
    }
    Outcome::from_histogram(
        &merged,
        errors.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        measure.as_secs_f64(),
    )
}

/// Sends `rate` requests per second at fixed intended times for `warmup + measure`; latency counts
/// from each request's intended send time.
pub async fn open_loop(base: &str, make: MakeCall, rate: f64, warmup: Duration, measure: Duration) -> Outcome {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("an HTTP client");
    let start = tokio::time::Instant::now();
    let (measure_from, measure_to) = (start + warmup, start + warmup + measure);
    let recorded = Arc::new(Mutex::new(histogram()));
    let (errors, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut rng = Rng::new(42);
    let mut inflight = tokio::task::JoinSet::new();
    for n in 0u64.. {
        let intended = start + Duration::from_secs_f64(n as f64 / rate);
        if intended >= measure_to {
            break;
        }
        tokio::time::sleep_until(intended).await;
        let call = make(n, &mut rng);
        let (client, recorded, errors, refused, base) =
            (client.clone(), recorded.clone(), errors.clone(), refused.clone(), base.to_owned());
        inflight.spawn(async move {
            let answer = send(&client, &base, call).await;
            if intended >= measure_from {
                match answer {
                    Answer::Ok => {
                        let latency = intended.elapsed().as_micros().max(1) as u64;
                        let _ = recorded.lock().unwrap().record(latency);
                    }
                    Answer::Refused => drop(refused.fetch_add(1, Ordering::Relaxed)),
                    Answer::Failed => drop(errors.fetch_add(1, Ordering::Relaxed)),
                }
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    let recorded = recorded.lock().unwrap();
    Outcome::from_histogram(
        &recorded,
        errors.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        measure.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_the_first_items_and_covers_the_range() {
        let zipf = Zipf::new(1000, 1.0);
        let mut rng = Rng::new(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
        // With s = 1 over 1000 items the first takes 1/H(1000) ≈ 13 % of draws.
        assert!((11_000..15_000).contains(&counts[0]), "{}", counts[0]);
        assert!(counts[900..].iter().any(|c| *c > 0));
    }
}
