//! Rate limits: token buckets (governor's GCRA) per client address, per bearer token, and a tighter
//! one for the routes that make Keel send e-mail (sign-up's welcome, checkout's receipt or notice,
//! sign-in codes, password resets, verification codes sent again).
//!
//! - **Per address**, every request but `/healthz`'s: what one machine may ask of this node. The
//!   address is the TCP peer's; `X-Forwarded-For` is believed only when `KEEL_TRUST_FORWARDED_FOR`
//!   says a proxy in front sets it (a client could otherwise pick a new address per request). IPv6
//!   addresses count per /64, the block one subscriber gets: within it an address costs nothing.
//! - **Per token**, every request with a bearer token: what one credential may do, from however many
//!   addresses. The token is not verified here (that needs the database): a made-up token gets a
//!   bucket of its own, but every request still spends its address's bucket too.
//! - **Credentials**, per address: the routes that take a password or a code (signing in, a password
//!   reset's confirmation, an e-mail verification), so that guessing one is slow from any address
//!   (a code also dies after 5 wrong guesses; a password has only this).
//! - **Mail**, sign-up, sign-in codes and password resets (anonymous: per address), checkout and
//!   resending a verification code (per token): each costs an e-mail to someone (sign-up also a user
//!   row), so a script must not be able to make them at the general rate, nor fill someone's inbox.
//!
//! A request over a limit is answered 429 with `Retry-After` and the IETF `RateLimit` /
//! `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers); every other limited response
//! carries them too, so a client can slow down before it is refused. `KEEL_RATE_LIMIT=off` turns
//! every limit off (benchmarks, tests that seed data).
//!
//! **Memory.** Each bucket is an entry in a map keyed by address, token digest or both. A key is
//! forgotten once its bucket is full again (it would behave as a new one), by a sweep every
//! [`SWEEP_EVERY`]: entries are bounded by the keys seen within a policy's window plus a sweep, so a
//! million addresses that each come once are a million entries for at most that long, not forever.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DashMapStateStore;
use governor::RateLimiter;

use super::error::ApiError;
use crate::config::Config;

pub const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// How often buckets that are full again are forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A limit as configured: `requests` at once, refilled evenly over `window` (`600/1m`: a burst of
/// 600, then one every 100 ms). This is also how `RateLimit-Policy` states it (`q=600;w=60`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateQuota {
    pub requests: NonZeroU32,
    pub window: Duration,
}

impl RateQuota {
    /// `N/DURATION`, e.g. `600/1m` or `20/1h`.
    pub fn parse(raw: &str) -> Result<RateQuota, String> {
        let bad =
            || format!("{raw:?} is not REQUESTS/WINDOW such as 600/1m (1 to 1000000 requests, a window of 1s to 1d)");
        let (requests, window) = raw.split_once('/').ok_or_else(bad)?;
        let requests: u32 = requests.trim().parse().map_err(|_| bad())?;
        let window = humantime::parse_duration(window.trim()).map_err(|_| bad())?;
        if !(1..=1_000_000).contains(&requests)
            || window < Duration::from_secs(1)
            || window > Duration::from_secs(86_400)
        {
            return Err(bad());
        }
        Ok(RateQuota { requests: NonZeroU32::new(requests).ok_or_else(bad)?, window })
    }

    fn governor(self) -> governor::Quota {
        let every = self.window / self.requests.get();
        governor::Quota::with_period(every)
            .expect("a window of 1s or more over at most 10^6 requests")
            .allow_burst(self.requests)
    }

    /// The window in whole seconds, as `RateLimit-Policy`'s `w` wants it.
    fn window_secs(self) -> u64 {
        self.window.as_secs_f64().ceil() as u64
    }
}

/// Which limit: the policy name in the headers and the `limit` label of `keel_rate_limited_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Address,
    Token,
    Credentials,
    Mail,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Address => "address",
            Policy::Token => "token",
            Policy::Credentials => "credentials",
            Policy::Mail => "mail",
        }
    }
}

/// The key of a mail bucket: anonymous routes per address, a user's per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MailKey {
    Address(IpAddr),
    Token(u64),
}

type Limiter<K> = RateLimiter<K, DashMapStateStore<K>, DefaultClock, StateInformationMiddleware>;

fn limiter<K: std::hash::Hash + Eq + Clone>(quota: RateQuota) -> Limiter<K> {
    RateLimiter::dashmap(quota.governor()).with_middleware::<StateInformationMiddleware>()
}

/// Every limit of one node, and what it needs to key them.
pub struct Limits {
    address: (RateQuota, Limiter<IpAddr>),
    token: (RateQuota, Limiter<u64>),
    credentials: (RateQuota, Limiter<IpAddr>),
    mail: (RateQuota, Limiter<MailKey>),
    /// Tokens are keyed by a keyed hash, not kept: a bucket's key says nothing about the token.
    hasher: RandomState,
    trust_forwarded_for: bool,
}

/// One request's standing under one policy.
struct Standing {
    policy: Policy,
    quota: RateQuota,
    remaining: u32,
    /// Until the bucket is full again.
    reset: Duration,
}

/// A request refused: which policy, and how long until it would be let through.
struct Refusal {
    policy: Policy,
    quota: RateQuota,
    wait: Duration,
}

impl Limits {
    /// The node's limits, or `None` when `KEEL_RATE_LIMIT=off`. Starts the sweep that forgets full
    /// buckets; it stops when the limits are dropped (with the router).
    pub fn from_config(config: &Config) -> Option<Arc<Limits>> {
        if !config.rate_limit {
            return None;
        }
        let limits = Arc::new(Limits::new(config));
        let weak = Arc::downgrade(&limits);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(limits) = Weak::upgrade(&weak) else { return };
                limits.sweep();
            }
        });
        Some(limits)
    }

    fn new(config: &Config) -> Limits {
        Limits {
            address: (config.rate_limit_per_address, limiter(config.rate_limit_per_address)),
            token: (config.rate_limit_per_token, limiter(config.rate_limit_per_token)),
            credentials: (config.rate_limit_sign_in, limiter(config.rate_limit_sign_in)),
            mail: (config.rate_limit_mail, limiter(config.rate_limit_mail)),
            hasher: RandomState::new(),
            trust_forwarded_for: config.trust_forwarded_for,
        }
    }

    /// Forgets every bucket that is full again, and gives the memory back.
    pub fn sweep(&self) {
        self.address.1.retain_recent();
        self.address.1.shrink_to_fit();
        self.token.1.retain_recent();
        self.token.1.shrink_to_fit();
        self.credentials.1.retain_recent();
        self.credentials.1.shrink_to_fit();
        self.mail.1.retain_recent();
        self.mail.1.shrink_to_fit();
        for (policy, keys) in [
            (Policy::Address, self.address.1.len()),
            (Policy::Token, self.token.1.len()),
            (Policy::Credentials, self.credentials.1.len()),
            (Policy::Mail, self.mail.1.len()),
        ] {
            metrics::gauge!("keel_rate_limit_keys", "limit" => policy.name()).set(keys as f64);
        }
    }

    /// How many buckets are kept, all policies together.
    pub fn keys(&self) -> usize {
        self.address.1.len() + self.token.1.len() + self.credentials.1.len() + self.mail.1.len()
    }

    /// Spends one request from every bucket that applies; the first one that is empty refuses it.
    fn check(
        &self,
        address: Option<IpAddr>,
        token: Option<u64>,
        checks_credentials: bool,
        sends_mail: Option<MailBy>,
    ) -> Result<Vec<Standing>, Refusal> {
        let mut standings = Vec::with_capacity(3);
        if let Some(address) = address {
            standings.push(spend(Policy::Address, &self.address, &address)?);
        }
        if let Some(token) = token {
            standings.push(spend(Policy::Token, &self.token, &token)?);
        }
        if let (true, Some(address)) = (checks_credentials, address) {
            standings.push(spend(Policy::Credentials, &self.credentials, &address)?);
        }
        if let Some(by) = sends_mail {
            let key = match (by, token, address) {
                (MailBy::Token, Some(token), _) => Some(MailKey::Token(token)),
                (_, _, Some(address)) => Some(MailKey::Address(address)),
                _ => None,
            };
            if let Some(key) = key {
                standings.push(spend(Policy::Mail, &self.mail, &key)?);
            }
        }
        Ok(standings)
    }

    /// The address a request counts against: the peer's, or the one the trusted proxy saw.
    fn client_address(&self, req: &Request) -> Option<IpAddr> {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(peer)| peer.ip());
        let forwarded = || {
            // The last entry is the one the nearest proxy added; earlier ones are the client's word.
            let header = req.headers().get_all("x-forwarded-for").iter().next_back()?;
            header.to_str().ok()?.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
        };
        let address = if self.trust_forwarded_for { forwarded().or(peer) } else { peer };
        address.map(bucket_of)
    }

    fn token_key(&self, req: &Request) -> Option<u64> {
        let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| self.hasher.hash_one(token))
    }
}

fn spend<K: std::hash::Hash + Eq + Clone>(
    policy: Policy,
    (quota, limiter): &(RateQuota, Limiter<K>),
    key: &K,
) -> Result<Standing, Refusal> {
    match limiter.check_key(key) {
        Ok(snapshot) => Ok(standing(policy, *quota, &snapshot)),
        Err(not_until) => Err(Refusal { policy, quota: *quota, wait: not_until.wait_time_from(limiter.clock().now()) }),
    }
}

fn standing(policy: Policy, quota: RateQuota, snapshot: &StateSnapshot) -> Standing {
    let remaining = snapshot.remaining_burst_capacity();
    let spent = quota.requests.get().saturating_sub(remaining);
    Standing { policy, quota, remaining, reset: (quota.window / quota.requests.get()) * spent }
}

/// The key of an address: IPv4 as it is (IPv4-mapped IPv6 too), IPv6 by its /64.
fn bucket_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Whose mail bucket a route spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MailBy {
    /// An anonymous route's: the client address's. A bearer token, which such a route never checks,
    /// must not buy a fresh bucket (a made-up one per request would).
    Address,
    /// A user's route: the token's (a token that does not verify is refused with 401 anyway).
    Token,
}

/// The routes that make Keel send e-mail, by method and route template, and whose bucket they spend.
fn sends_mail(method: &Method, route: &str) -> Option<MailBy> {
    if *method != Method::POST {
        return None;
    }
    match route {
        "/v1/users" | "/v1/sessions/codes" | "/v1/password-resets" => Some(MailBy::Address),
        "/v1/checkout" | "/v1/users/{id}/email-verification/resend" => Some(MailBy::Token),
        _ => None,
    }
}

/// The routes that take a password or a code.
fn checks_credentials(method: &Method, route: &str) -> bool {
    *method == Method::POST
        && matches!(route, "/v1/sessions" | "/v1/password-resets/confirm" | "/v1/users/{id}/email-verification")
}

/// Whole seconds, rounded up: a client that waits this long is let through.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn policy_item(policy: Policy, quota: RateQuota) -> String {
    format!("\"{}\";q={};w={}", policy.name(), quota.requests, quota.window_secs())
}

fn header(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("policy names and numbers are valid header text")
}

/// The middleware: refuses a request over a limit with 429, and tells every limited response where
/// it stands. `limits` is `None` when rate limiting is off.
pub async fn limit(req: Request, next: Next, limits: Option<Arc<Limits>>) -> Response {
    let Some(limits) = limits else { return next.run(req).await };
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    // Probes must keep working whatever the prober's address has been asking.
    if route == Some("/healthz") {
        return next.run(req).await;
    }
    let mail = route.and_then(|route| sends_mail(req.method(), route));
    let credentials = route.is_some_and(|route| checks_credentials(req.method(), route));
    let standings = match limits.check(limits.client_address(&req), limits.token_key(&req), credentials, mail) {
        Ok(standings) => standings,
        Err(refusal) => return refused(refusal),
    };
    let mut response = next.run(req).await;
    if !standings.is_empty() {
        let policies: Vec<String> = standings.iter().map(|s| policy_item(s.policy, s.quota)).collect();
        let tightest = standings.iter().min_by_key(|s| s.remaining).expect("not empty");
        let headers = response.headers_mut();
        headers.insert(RATE_LIMIT_POLICY, header(policies.join(", ")));
        headers.insert(
            RATE_LIMIT,
            header(format!(
                "\"{}\";r={};t={}",
                tightest.policy.name(),
                tightest.remaining,
                whole_seconds(tightest.reset)
            )),
        );
    }
    response
}

fn refused(refusal: Refusal) -> Response {
    let Refusal { policy, quota, wait } = refusal;
    metrics::counter!("keel_rate_limited_total", "limit" => policy.name()).increment(1);
    let retry_after = whole_seconds(wait).max(1);
    let message = format!(
        "too many requests: over the {} rate limit of {} requests per {}; retry in {retry_after} s",
        policy.name(),
        quota.requests,
        humantime::format_duration(quota.window)
    );
    let mut response = ApiError::TooManyRequests(message).into_response();
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    headers.insert(RATE_LIMIT_POLICY, header(policy_item(policy, quota)));
    headers.insert(RATE_LIMIT, header(format!("\"{}\";r=0;t={retry_after}", policy.name())));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_as_requests_per_window() {
        let quota = RateQuota::parse("600/1m").unwrap();
        assert_eq!((quota.requests.get(), quota.window), (600, Duration::from_secs(60)));
        assert_eq!(RateQuota::parse(" 20 / 1h ").unwrap().window, Duration::from_secs(3600));
        for bad in ["", "600", "0/1m", "600/0s", "600/500ms", "x/1m", "600/soon", "2000000/1m", "1/2d"] {
            assert!(RateQuota::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_routes_that_send_mail_are_in_the_mail_policy() {
        for route in ["/v1/users", "/v1/sessions/codes", "/v1/password-resets"] {
            assert_eq!(sends_mail(&Method::POST, route), Some(MailBy::Address), "{route}");
        }
        for route in ["/v1/checkout", "/v1/users/{id}/email-verification/resend"] {
            assert_eq!(sends_mail(&Method::POST, route), Some(MailBy::Token), "{route}");
        }
        // Using what was mailed sends nothing.
        for route in ["/v1/sessions", "/v1/password-resets/confirm", "/v1/users/{id}/email-verification"] {
            assert_eq!(sends_mail(&Method::POST, route), None, "{route}");
        }
        assert_eq!(sends_mail(&Method::GET, "/v1/users"), None);
    }

    #[test]
    fn the_routes_that_take_a_password_or_a_code_have_a_tighter_limit_per_address() {
        let config = Config {
            rate_limit_sign_in: RateQuota { requests: NonZeroU32::new(2).unwrap(), window: Duration::from_secs(60) },
            ..Config::default()
        };
        let limits = Limits::new(&config);
        let address = Some("192.0.2.10".parse().unwrap());
        for token in 0..2 {
            assert!(limits.check(address, Some(token), true, None).is_ok());
        }
        let Err(refusal) = limits.check(address, None, true, None) else { panic!("over the limit") };
        assert_eq!(refusal.policy, Policy::Credentials);
        assert!(limits.check(address, None, false, None).is_ok(), "other routes are not held back");
        for route in ["/v1/sessions", "/v1/password-resets/confirm", "/v1/users/{id}/email-verification"] {
            assert!(checks_credentials(&Method::POST, route), "{route}");
        }
        assert!(!checks_credentials(&Method::GET, "/v1/sessions"));
        assert!(!checks_credentials(&Method::POST, "/v1/sessions/refresh"));
    }

    /// An anonymous mail route is limited by address, whatever bearer token comes with it: a made-up
    /// token per request does not buy more e-mail.
    #[test]
    fn made_up_tokens_do_not_lift_the_mail_limit_of_an_anonymous_route() {
        let config = Config {
            rate_limit_mail: RateQuota { requests: NonZeroU32::new(2).unwrap(), window: Duration::from_secs(3600) },
            ..Config::default()
        };
        let limits = Limits::new(&config);
        let address = Some("192.0.2.9".parse().unwrap());
        for token in 0..2 {
            assert!(limits.check(address, Some(token), false, Some(MailBy::Address)).is_ok());
        }
        let Err(refusal) = limits.check(address, Some(99), false, Some(MailBy::Address)) else {
            panic!("over the limit")
        };
        assert_eq!(refusal.policy, Policy::Mail);
        // A user's route counts per token.
        assert!(limits.check(address, Some(7), false, Some(MailBy::Token)).is_ok());
    }

    #[test]
    fn ipv6_addresses_share_the_bucket_of_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(bucket_of(a), bucket_of(b));
        assert_ne!(bucket_of(a), bucket_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(bucket_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    /// A million distinct addresses, each seen once: a million buckets while they are fresh, none
    /// once the window has passed and the sweep has run — the map does not keep what it learnt.
    #[test]
    fn a_million_addresses_are_forgotten_once_their_buckets_are_full_again() {
        let config = Config {
            rate_limit_per_address: RateQuota { requests: NonZeroU32::new(5).unwrap(), window: Duration::from_secs(1) },
            ..Config::default()
        };
        let limits = Limits::new(&config);
        for i in 0..1_000_000u32 {
            let address = IpAddr::V4(i.into());
            assert!(limits.check(Some(address), None, false, None).is_ok());
        }
        assert_eq!(limits.keys(), 1_000_000);
        limits.sweep();
        assert!(limits.keys() > 0, "a sweep inside the window keeps buckets that are not full yet");
        std::thread::sleep(Duration::from_millis(1100));
        limits.sweep();
        assert_eq!(limits.keys(), 0);
    }

    #[test]
    fn buckets_refuse_past_the_quota_and_say_how_long_to_wait() {
        let config = Config {
            rate_limit_per_address: RateQuota {
                requests: NonZeroU32::new(3).unwrap(),
                window: Duration::from_secs(30),
            },
            ..Config::default()
        };
        let limits = Limits::new(&config);
        let address = Some("192.0.2.1".parse().unwrap());
        let remaining: Vec<u32> = (0..3)
            .map(|_| limits.check(address, None, false, None).unwrap_or_else(|_| panic!())[0].remaining)
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let Err(refusal) = limits.check(address, None, false, None) else { panic!("the fourth must be refused") };
        assert_eq!(refusal.policy, Policy::Address);
        assert!(refusal.wait > Duration::from_secs(9) && refusal.wait <= Duration::from_secs(10), "{:?}", refusal.wait);
        assert!(limits.check(Some("192.0.2.2".parse().unwrap()), None, false, None).is_ok(), "another address");
    }
}
