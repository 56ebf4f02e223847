//! The load generator: a closed loop (N connections, each sending its next request when the last is
//! answered: the maximum) and an open loop (requests sent at fixed intended times whatever the server
//! does; latency measured from the intended time, so a stall is charged to every request it delayed:
//! no coordinated omission). Percentiles come from HdrHistogram.
//!
//! Why not wrk: it has no open-loop mode (wrk2 has, but is not packaged here), and its Lua cannot
//! cheaply draw from a Zipf distribution or mint unique idempotency keys per request at speed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::Serialize;

/// One request to send.
pub struct Call {
    pub method: reqwest::Method,
    pub path: String,
    /// Sent as `Authorization: Bearer <token>`, formatted per request.
    pub token: Option<String>,
    /// A whole `Authorization` value made ahead (see [`bearer`]): cloning it is a reference count,
    /// so a hot loop attaching a token pays no formatting or allocation for it per request.
    pub authorization: Option<HeaderValue>,
    pub headers: Vec<(&'static str, String)>,
    pub json: Option<serde_json::Value>,
    /// Statuses that are a refusal by design, not an error: counted in [`Outcome::refused`], and in
    /// neither the throughput nor the latencies. (A checkout of a cart whose items a pending order
    /// already took is a 409; a sign-in turned away by an overloaded server a 503.)
    pub refusal: &'static [u16],
}

impl Call {
    pub fn get(path: String) -> Call {
        Call {
            method: reqwest::Method::GET,
            path,
            token: None,
            authorization: None,
            headers: Vec::new(),
            json: None,
            refusal: &[],
        }
    }
}

/// `Bearer <token>` as a header value, made once per token (marked sensitive, as reqwest's
/// `bearer_auth` does).
pub fn bearer(token: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is a valid header value");
    value.set_sensitive(true);
    value
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
    if let Some(value) = call.authorization {
        request = request.header(AUTHORIZATION, value);
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
                (true, status) if call.refusal.contains(&status.as_u16()) => Answer::Refused,
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
    closed_loop_recorded(base, make, connections, warmup, measure).await.outcome()
}

/// What one run recorded, before it is summed up: runs can be merged ([`combine_rounds`]).
pub struct Recorded {
    pub histogram: Histogram<u64>,
    pub errors: u64,
    pub refused: u64,
    pub seconds: f64,
}

impl Recorded {
    pub fn outcome(&self) -> Outcome {
        Outcome::from_histogram(&self.histogram, self.errors, self.refused, self.seconds)
    }

    pub fn per_second(&self) -> f64 {
        self.histogram.len() as f64 / self.seconds
    }
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Several rounds of the same measurement as one outcome: the rate is the median of the rounds'
/// rates (one disturbed round does not move it), the counts are summed, and the latencies are
/// percentiles over every request of every round.
pub fn combine_rounds(rounds: &[Recorded]) -> Outcome {
    let mut merged = histogram();
    for round in rounds {
        merged.add(&round.histogram).expect("same histogram bounds");
    }
    let errors = rounds.iter().map(|r| r.errors).sum();
    let refused = rounds.iter().map(|r| r.refused).sum();
    let seconds = rounds.iter().map(|r| r.seconds).sum();
    let rates: Vec<f64> = rounds.iter().map(Recorded::per_second).collect();
    Outcome { per_second: median(&rates), ..Outcome::from_histogram(&merged, errors, refused, seconds) }
}

/// [`closed_loop`], returning what it recorded rather than its summary.
pub async fn closed_loop_recorded(
    base: &str,
    make: MakeCall,
    connections: usize,
    warmup: Duration,
    measure: Duration,
) -> Recorded {
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
    Recorded {
        histogram: merged,
        errors: errors.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        seconds: measure.as_secs_f64(),
    }
}

/// The answers of requests running on tasks of their own, tallied as they come.
#[derive(Clone)]
struct Tally {
    recorded: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            recorded: Arc::new(Mutex::new(histogram())),
            errors: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    fn count(&self, answer: Answer, latency: Duration) {
        match answer {
            Answer::Ok => {
                let _ = self.recorded.lock().unwrap().record(latency.as_micros().max(1) as u64);
            }
            Answer::Refused => drop(self.refused.fetch_add(1, Ordering::Relaxed)),
            Answer::Failed => drop(self.errors.fetch_add(1, Ordering::Relaxed)),
        }
    }

    fn outcome(&self, seconds: f64) -> Outcome {
        Outcome::from_histogram(
            &self.recorded.lock().unwrap(),
            self.errors.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            seconds,
        )
    }
}

/// Sends `rate` requests per second at fixed intended times for `warmup + measure`; latency counts
/// from each request's intended send time.
pub async fn open_loop(base: &str, make: MakeCall, rate: f64, warmup: Duration, measure: Duration) -> Outcome {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("an HTTP client");
    let start = tokio::time::Instant::now();
    let (measure_from, measure_to) = (start + warmup, start + warmup + measure);
    let tally = Tally::new();
    let mut rng = Rng::new(42);
    let mut inflight = tokio::task::JoinSet::new();
    for n in 0u64.. {
        let intended = start + Duration::from_secs_f64(n as f64 / rate);
        if intended >= measure_to {
            break;
        }
        tokio::time::sleep_until(intended).await;
        let call = make(n, &mut rng);
        let (client, tally, base) = (client.clone(), tally.clone(), base.to_owned());
        inflight.spawn(async move {
            let answer = send(&client, &base, call).await;
            if intended >= measure_from {
                tally.count(answer, intended.elapsed());
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    tally.outcome(measure.as_secs_f64())
}

/// An open loop at `rate` (as [`open_loop`]) that measures while `during` runs: `during` is started
/// once `warmup` is over, the requests intended from then until it completes are recorded (answered
/// whenever), and no request is sent after it. Returns the outcome, whose `seconds` is how long
/// `during` took, and what `during` returned.
pub async fn open_loop_during<T>(
    base: &str,
    make: MakeCall,
    rate: f64,
    warmup: Duration,
    during: impl Future<Output = T>,
) -> (Outcome, T) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("an HTTP client");
    let start = tokio::time::Instant::now();
    let measure_from = start + warmup;
    let tally = Tally::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (tally, stop, base) = (tally.clone(), stop.clone(), base.to_owned());
        tokio::spawn(async move {
            let mut rng = Rng::new(42);
            let mut inflight = tokio::task::JoinSet::new();
            for n in 0u64.. {
                let intended = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(intended).await;
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let call = make(n, &mut rng);
                let (client, tally, base) = (client.clone(), tally.clone(), base.clone());
                inflight.spawn(async move {
                    let answer = send(&client, &base, call).await;
                    if intended >= measure_from {
                        tally.count(answer, intended.elapsed());
                    }
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep_until(measure_from).await;
    let began = Instant::now();
    let value = during.await;
    let seconds = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    sender.await.expect("the open loop's sender");
    (tally.outcome(seconds), value)
}

/// Sends every call at once, each on a connection of its own. Latencies count from the moment all
/// were started, so they include any wait in the server's queue; the rate is the calls answered
/// successfully over the time until the last answer (`seconds`).
pub async fn burst(base: &str, calls: Vec<Call>) -> Outcome {
    let client = reqwest::Client::builder().pool_max_idle_per_host(calls.len()).build().expect("an HTTP client");
    let tally = Tally::new();
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for call in calls {
        let (client, tally, base) = (client.clone(), tally.clone(), base.to_owned());
        running.spawn(async move {
            let answer = send(&client, &base, call).await;
            tally.count(answer, started.elapsed());
        });
    }
    while running.join_next().await.is_some() {}
    tally.outcome(started.elapsed().as_secs_f64())
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

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[9.0, 1.0, 5.0]), 5.0);
        assert_eq!(median(&[10.0, 1.0, 4.0, 1000.0]), 7.0);
    }

    fn recorded(latencies_us: &[u64], seconds: f64, errors: u64) -> Recorded {
        let mut histogram = histogram();
        for l in latencies_us {
            histogram.record(*l).unwrap();
        }
        Recorded { histogram, errors, refused: 1, seconds }
    }

    #[test]
    fn rounds_combine_into_the_median_rate_and_latencies_over_every_request() {
        // 10/s, 12/s and 1/s (a disturbed round): the rate is the median, 10/s, not the mean 7.7/s.
        let rounds = [recorded(&[1_000; 10], 1.0, 0), recorded(&[2_000; 12], 1.0, 2), recorded(&[100_000; 1], 1.0, 0)];
        let outcome = combine_rounds(&rounds);
        assert_eq!(outcome.per_second, 10.0);
        assert_eq!((outcome.requests, outcome.errors, outcome.refused, outcome.seconds), (23, 2, 3, 3.0));
        assert!((outcome.p50_ms - 2.0).abs() < 0.01, "{}", outcome.p50_ms);
        assert!((outcome.p999_ms - 100.0).abs() < 0.1, "{}", outcome.p999_ms);
    }

    #[test]
    fn a_prepared_authorization_is_a_bearer_value_marked_sensitive() {
        let value = bearer("abc.def");
        assert_eq!(value.to_str().unwrap(), "Bearer abc.def");
        assert!(value.is_sensitive());
    }
}
