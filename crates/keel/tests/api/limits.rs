//! Limits against clients that would exhaust a node: connection timeouts and the connection cap
//! (slowloris, silent connections, descriptor exhaustion), and the rate limits (per address, per
//! token, the tighter one of the routes that send e-mail; `/healthz` exempt; `KEEL_RATE_LIMIT=off`).

use std::num::NonZeroU32;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel::config::Config;
use keel::http::rate_limit::RateQuota;
use reqwest::Response;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{expect_json, expect_problem, scratch_root, TestApp, TestDatabases, ADMIN_TOKEN};

fn quota(requests: u32, window_secs: u64) -> RateQuota {
    RateQuota { requests: NonZeroU32::new(requests).unwrap(), window: Duration::from_secs(window_secs) }
}

/// An app with rate limiting on: `configure` sets the figures.
async fn limited_app(configure: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::spawn_with(|config| {
        config.rate_limit = true;
        configure(config);
    })
    .await
}

fn header(response: &Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// How long until the server closed this connection, if it did within `within`; meanwhile
/// `trickle` (if any) is written every 300 ms, as a slowloris client sends one more header line.
async fn closed_within(mut stream: TcpStream, trickle: Option<&[u8]>, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        if started.elapsed() > within {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                // A 408 or any other answer to a request never finished: wait for the close.
                Ok(_) => {}
            },
            _ = tick.tick() => {
                if let Some(line) = trickle {
                    if stream.write_all(line).await.is_err() {
                        return Some(started.elapsed());
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_within_the_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    // A long idle timeout: bytes keep moving, and it is the header timeout that must act.
    let app = TestApp::spawn_with(|config| {
        config.header_read_timeout = header_timeout;
        config.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();

    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n").await.unwrap();
    // Generous: the header timeout plus scheduling on a loaded machine; well short of never.
    let closed = closed_within(slow, Some(b"X-Slow: still coming\r\n"), header_timeout + Duration::from_secs(8)).await;
    let closed = closed.expect("a client that never finishes its headers is still connected 10 s later");
    assert!(closed >= header_timeout - Duration::from_millis(300), "closed after {closed:?}: before the timeout");

    // The server still serves whoever does finish their headers.
    let ok = app.get("/healthz").send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn connections_where_nothing_happens_are_closed_after_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let app = TestApp::spawn_with(|config| {
        config.idle_timeout = idle;
        config.header_read_timeout = Duration::from_secs(600);
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let margin = Duration::from_secs(6);

    // Connected, said nothing.
    let silent = TcpStream::connect(&address).await.unwrap();
    // One request answered, then kept open (keep-alive) and left.
    let mut kept = TcpStream::connect(&address).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 1024];
    let n = kept.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // A client trickling a header: bytes move, so the idle timeout leaves it to the header timeout.
    let mut trickling = TcpStream::connect(&address).await.unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();

    let (silent, kept, trickling) = tokio::join!(
        closed_within(silent, None, idle + margin),
        closed_within(kept, None, idle + margin),
        closed_within(trickling, Some(b"X-Slow: 1\r\n"), idle * 3),
    );
    assert!(silent.is_some(), "a silent connection is still open {:?} later", idle + margin);
    assert!(kept.is_some(), "an idle keep-alive connection is still open {:?} later", idle + margin);
    assert!(silent.unwrap() >= idle - Duration::from_millis(300), "{silent:?}");
    assert!(trickling.is_none(), "a connection still receiving its head was closed as idle after {trickling:?}");
}

/// Raises this process's soft open-file limit to its hard limit; returns it.
fn raise_own_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write the struct we pass, nothing else.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// A `keel serve` process whose open-file limit (soft and hard) is `files`, as on a host where it
/// was never raised: the descriptors run out long before the default connection cap.
struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(dbs: &TestDatabases, files: u64, env: &[(&str, &str)]) -> Serve {
        let log = scratch_root().join(format!("limits-serve-{}.log", uuid::Uuid::now_v7().simple()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.arg("serve");
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
            command.env_remove(key);
        }
        command
            .env("KEEL_LOG", "info")
            .env("KEEL_LISTEN", "127.0.0.1:0")
            .env("KEEL_DATA_DIR", log.with_extension("data"))
            .env("KEEL_CATALOG_URL", &dbs.catalog_url)
            .env("KEEL_SHARD_URLS", dbs.shard_urls.join(","))
            .env("KEEL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KEEL_TOKEN_KEYS", crate::helpers::TOKEN_KEYS)
            .env("KEEL_DB_POOL_SIZE", "4");
        for (key, value) in env {
            command.env(key, value);
        }
        // SAFETY: prctl and setrlimit are async-signal-safe and touch only this child.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let limit = libc::rlimit { rlim_cur: files, rlim_max: files };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log_file = std::fs::File::create(&log).unwrap();
        let child = command.stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
        crate::helpers::stop_at_exit(child.id() as i32);
        Serve { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address from the "serving" log line.
    async fn address(&mut self) -> String {
        let started = Instant::now();
        loop {
            let found = self.log_text().lines().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                let message = line["fields"]["message"].as_str().or(line["message"].as_str())?;
                let address = line["fields"]["address"].as_str().or(line["address"].as_str())?;
                (message == "serving").then(|| address.to_owned())
            });
            if let Some(address) = found {
                return address;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("keel serve exited with {status}; log:\n{}", self.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "keel serve not up; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 2,000 connections left idle — half never said anything, half kept alive after one request —
/// against a `keel serve` that may open only 1,024 files, with timeouts too long to help: a new
/// client is still served at once, because the connection cap (lowered to what the file limit
/// allows) closes the connection idle the longest to make room. Without the cap, the process runs
/// out of descriptors and the new client waits in the listen backlog for good.
#[tokio::test]
async fn two_thousand_idle_connections_do_not_stop_a_new_client_from_being_served() {
    let own_limit = raise_own_file_limit();
    // Each idle connection costs this process a descriptor too; leave room for the rest of the suite.
    let idle_connections: usize = 2000.min(own_limit.saturating_sub(1000) as usize);
    let server_files: u64 = 1024.min(idle_connections as u64 / 2);
    assert!(server_files >= 256, "this process may open only {own_limit} files: too few for the test");
    let dbs = TestDatabases::create(true).await;
    let mut serve = Serve::start(
        &dbs,
        server_files,
        &[("KEEL_IDLE_TIMEOUT", "1h"), ("KEEL_HEADER_READ_TIMEOUT", "1h"), ("KEEL_RATE_LIMIT", "off")],
    );
    let address = serve.address().await;

    let mut idle = Vec::with_capacity(idle_connections);
    for i in 0..idle_connections {
        let connect = TcpStream::connect(&address);
        let mut stream = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not accepted within 10 s"))
            .unwrap();
        if i % 2 == 1 {
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.unwrap();
            let mut answer = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await;
            let n = n.unwrap_or_else(|_| panic!("connection {i} got no answer within 10 s")).unwrap();
            assert!(
                answer[..n].starts_with(b"HTTP/1.1 200"),
                "connection {i}: {}",
                String::from_utf8_lossy(&answer[..n])
            );
        }
        idle.push(stream);
    }

    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let started = Instant::now();
    let served = client.get(format!("http://{address}/healthz")).send().await;
    let served = served.unwrap_or_else(|e| panic!("a new client was not served after {:?}: {e}", started.elapsed()));
    assert_eq!(served.status(), 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "served only after {took:?}");

    // The server holds no more connections than its cap: the rest were closed, idlest first.
    let metrics = client.get(format!("http://{address}/metrics")).send().await.unwrap().text().await.unwrap();
    let open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_http_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no keel_http_connections_open in\n{metrics}"));
    assert!(open <= server_files as f64, "{open} connections open with a file limit of {server_files}");
    // The server closed the rest, idlest first: a read on them ends at once.
    let mut reads = tokio::task::JoinSet::new();
    for mut stream in idle {
        reads.spawn(async move {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
            matches!(read, Ok(Ok(0) | Err(_)))
        });
    }
    let closed = reads.join_all().await.into_iter().filter(|closed| *closed).count();
    eprintln!("{closed} of {idle_connections} idle connections closed (file limit {server_files}); {open} open; new client served in {took:?}");
    assert!(
        closed >= idle_connections - server_files as usize,
        "only {closed} of {idle_connections} idle connections were closed, with a file limit of {server_files}"
    );
    drop(serve);
}

#[tokio::test]
async fn requests_over_the_address_limit_are_refused_with_retry_after_and_ratelimit_fields() {
    let app = limited_app(|config| config.rate_limit_per_address = quota(5, 60)).await;
    for remaining in (0..5).rev() {
        let ok = app.get("/v1/products").send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "ratelimit-policy").as_deref(), Some("\"address\";q=5;w=60"));
        let standing = header(&ok, "ratelimit").unwrap();
        assert!(standing.starts_with(&format!("\"address\";r={remaining};t=")), "{standing}");
    }
    let refused = app.get("/v1/products").send().await.unwrap();
    let retry_after: u64 = header(&refused, "retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=12).contains(&retry_after), "one request is back every 12 s: {retry_after}");
    assert_eq!(header(&refused, "ratelimit").unwrap(), format!("\"address\";r=0;t={retry_after}"));
    assert_eq!(header(&refused, "ratelimit-policy").as_deref(), Some("\"address\";q=5;w=60"));
    let problem = expect_problem(Ok(refused), 429, "rate limit").await;
    assert_eq!(problem["type"], "/problems/too-many-requests");
    // Every route counts against the same address, whatever its method or whether it exists.
    assert_eq!(app.get("/v1/no-such-route").send().await.unwrap().status(), 429);
    assert_eq!(app.post("/v1/users").json(&json!({})).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn each_token_has_a_bucket_of_its_own() {
    let app = limited_app(|config| {
        config.rate_limit_per_address = quota(1000, 60);
        config.rate_limit_per_token = quota(3, 60);
        config.rate_limit_mail = quota(100, 60);
    })
    .await;
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    for _ in 0..3 {
        let ok = app.get("/v1/cart").bearer_auth(&ada).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        let policy = header(&ok, "ratelimit-policy").unwrap();
        assert_eq!(policy, "\"address\";q=1000;w=60, \"token\";q=3;w=60");
    }
    let refused = app.get("/v1/cart").bearer_auth(&ada).send().await.unwrap();
    assert!(header(&refused, "ratelimit").unwrap().starts_with("\"token\";r=0;t="), "{refused:?}");
    assert!(header(&refused, "retry-after").is_some());
    expect_problem(Ok(refused), 429, "token").await;
    // Another user, the same address: untouched.
    for _ in 0..3 {
        let ok = app.get("/v1/cart").bearer_auth(&bob).send().await.unwrap();
        assert_eq!(ok.status(), 200, "Bob's bucket is Bob's");
    }
    // Nor does anonymous traffic from that address pay for Ada.
    expect_json(app.get("/v1/products").send().await, 200).await;

    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    let limited = metrics.lines().find(|l| l.starts_with("keel_rate_limited_total{limit=\"token\"}"));
    assert!(limited.is_some(), "no keel_rate_limited_total for the token limit:\n{metrics}");
    assert!(!metrics.contains(&ada), "a token must never be a label");
}

#[tokio::test]
async fn healthz_is_exempt() {
    let app = limited_app(|config| config.rate_limit_per_address = quota(2, 60)).await;
    for _ in 0..20 {
        let ok = app.get("/healthz").send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "ratelimit"), None, "no bucket is spent");
    }
    assert_eq!(app.get("/readyz").send().await.unwrap().status(), 200);
    assert_eq!(app.get("/readyz").send().await.unwrap().status(), 200);
    assert_eq!(app.get("/readyz").send().await.unwrap().status(), 429, "other routes are limited");
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200, "even with the address over its limit");
}

#[tokio::test]
async fn sign_up_and_checkout_have_a_tighter_limit() {
    let app = limited_app(|config| {
        config.rate_limit_per_address = quota(100, 60);
        config.rate_limit_per_token = quota(100, 60);
        config.rate_limit_mail = quota(2, 3600);
    })
    .await;
    let (_, ada) = app.create_user("Ada").await;
    app.create_user("Bob").await;
    let third = app.post("/v1/users").json(&json!({ "name": "Cy", "email": "cy@example.org" })).send().await.unwrap();
    assert!(header(&third, "ratelimit").unwrap().starts_with("\"mail\";r=0;t="), "{third:?}");
    assert!(header(&third, "ratelimit-policy").unwrap().contains("\"mail\";q=2;w=3600"));
    let retry_after: u64 = header(&third, "retry-after").unwrap().parse().unwrap();
    assert!((1..=1800).contains(&retry_after), "{retry_after}");
    expect_problem(Ok(third), 429, "mail").await;
    // The address is well within its general limit: other routes still answer.
    expect_json(app.get("/v1/products").send().await, 200).await;

    // Checkout sends a receipt: the same tight limit, per token. (An empty cart is refused after
    // the limit is passed; what matters is that the third attempt is not even tried.)
    for attempt in 0..2 {
        let answer = app.post("/v1/checkout").bearer_auth(&ada).header("idempotency-key", format!("k{attempt}")).send();
        assert_ne!(answer.await.unwrap().status(), 429, "attempt {attempt} is within the limit");
    }
    let over = app.post("/v1/checkout").bearer_auth(&ada).header("idempotency-key", "k2").send().await.unwrap();
    assert_eq!(over.status(), 429);
    assert!(header(&over, "ratelimit").unwrap().starts_with("\"mail\";"));
    expect_json(app.get("/v1/cart").bearer_auth(&ada).send().await, 200).await;
}

#[tokio::test]
async fn rate_limit_off_turns_every_limit_off() {
    let app = TestApp::spawn_with(|config| {
        config.rate_limit = false;
        config.rate_limit_per_address = quota(1, 3600);
        config.rate_limit_per_token = quota(1, 3600);
        config.rate_limit_mail = quota(1, 3600);
    })
    .await;
    let (_, ada) = app.create_user("Ada").await;
    app.create_user("Bob").await;
    app.create_user("Cy").await;
    for _ in 0..10 {
        let ok = app.get("/v1/cart").bearer_auth(&ada).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "ratelimit"), None);
        assert_eq!(header(&ok, "ratelimit-policy"), None);
    }
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_when_a_proxy_is_trusted() {
    let forwarded = |app: &TestApp, address: &str| app.get("/v1/products").header("x-forwarded-for", address).send();
    // Not trusted (the default): a client naming a new address per request still spends its own.
    let app = limited_app(|config| config.rate_limit_per_address = quota(2, 60)).await;
    assert_eq!(forwarded(&app, "192.0.2.1").await.unwrap().status(), 200);
    assert_eq!(forwarded(&app, "192.0.2.2").await.unwrap().status(), 200);
    assert_eq!(forwarded(&app, "192.0.2.3").await.unwrap().status(), 429);

    // Trusted: the address the proxy appended last is the client's, whatever the client wrote before it.
    let app = limited_app(|config| {
        config.rate_limit_per_address = quota(2, 60);
        config.trust_forwarded_for = true;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(forwarded(&app, "203.0.113.9, 192.0.2.1").await.unwrap().status(), 200);
    }
    assert_eq!(forwarded(&app, "203.0.113.10, 192.0.2.1").await.unwrap().status(), 429, "same client");
    assert_eq!(forwarded(&app, "192.0.2.2").await.unwrap().status(), 200, "another client behind the proxy");
}
