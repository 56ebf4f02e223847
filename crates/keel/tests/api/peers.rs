//! Real protocol peers for the side-effect tests: an SMTP server (aiosmtpd, a separate process), an
//! HTTP webhook receiver that answers as a test scripts it, and signature verification by the
//! Standard Webhooks reference library — an implementation independent of Keel's — and a
//! redis-server of a test's own.
//! The Python tools live in `target/python`, made by `scripts/install-deps.sh` (`make test`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

/// The NATS server (with JetStream) shared by this test binary, started on first use from a thread
/// that lives as long as the binary; stopped when the binary exits.
pub fn nats_url() -> &'static str {
    static NATS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NATS.get_or_init(|| {
        let dir = crate::helpers::scratch_root().join("nats");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("nats.log");
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (store, log_file) = (dir.join("store"), log.clone());
        std::thread::spawn(move || {
            let mut command = Command::new(binary);
            // `-p -1`: the server binds a port of its own choosing and logs it, so no other process
            // can take it between our choosing and its binding.
            command
                .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
                .arg(&store)
                .arg("-l")
                .arg(&log_file)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            die_with_parent(&mut command);
            let mut child = command.spawn().expect("starting nats-server (scripts/install-deps.sh installs it)");
            crate::helpers::stop_at_exit(child.id() as i32);
            started_tx.send(()).unwrap();
            let _ = child.wait();
        });
        started_rx.recv().unwrap();
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text.lines().find_map(|l| l.split("Listening for client connections on ").nth(1));
            if let Some(address) = listening {
                break format!("nats://{}", address.trim());
            }
            assert!(started.elapsed() < Duration::from_secs(20), "nats-server did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// `KEEL_TEST_NATS=1` runs the suite with events carried by JetStream (`make test` runs the checkout
/// and webhook tests both ways).
pub fn nats_enabled() -> bool {
    std::env::var_os("KEEL_TEST_NATS").is_some_and(|v| v == "1")
}

/// A redis-server of one test's own on a private port (no persistence): the test can kill it and
/// start it again on the same port.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> RedisServer {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command.spawn().expect("starting redis-server (scripts/install-deps.sh installs it)");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        RedisServer { port, child: Some(child) }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGSTOP: the server stops answering, as a hung or swapped-out Redis would. Its connections
    /// stay open and the kernel still accepts new ones, so callers wait (for their timeouts) instead
    /// of failing at once; what they send meanwhile is read when it is resumed.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: a paused server carries on with what it held and what was sent to it meanwhile.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("the redis-server was killed");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not yet waited
        // for, so it cannot have been reused by another process.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} to redis-server: {}", std::io::Error::last_os_error());
    }

    /// SIGKILL: the server and everything it held are gone at once. A paused server too (SIGKILL
    /// ends a stopped process), so dropping one that was never resumed neither hangs nor leaks it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The kernel kills the child when the test binary exits, however it exits.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/install-deps.sh (make test does)", python.display());
    python
}

/// An SMTP server that stores every message it accepts in a maildir.
pub struct SmtpServer {
    child: Child,
    pub maildir: PathBuf,
}

impl SmtpServer {
    /// Starts on `port` and waits until it accepts connections.
    pub async fn start(port: u16, maildir: &Path) -> SmtpServer {
        // aiosmtpd makes the maildir (cur, new, tmp) only when the directory does not exist yet.
        std::fs::create_dir_all(maildir.parent().unwrap()).unwrap();
        let child = Command::new(python())
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting aiosmtpd");
        let server = SmtpServer { child, maildir: maildir.to_owned() };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "the SMTP server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Every message received so far, as text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        entries.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap()).collect()
    }

    /// Every message received so far with when the server stored it (its file's modification time).
    pub fn messages_with_arrival(&self) -> Vec<(std::time::SystemTime, String)> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        let read = |e: std::fs::DirEntry| {
            (e.metadata().unwrap().modified().unwrap(), std::fs::read_to_string(e.path()).unwrap())
        };
        entries.flatten().map(read).collect()
    }

    /// How many of the messages received so far carry each `Message-ID` (a message without one is
    /// counted under the empty string).
    pub fn message_id_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for message in self.messages() {
            *counts.entry(SmtpServer::message_id(&message).unwrap_or_default()).or_default() += 1;
        }
        counts
    }

    /// The `Message-ID` header of a received message (unfolded, trimmed), if it has one.
    pub fn message_id(message: &str) -> Option<String> {
        let mut lines = message.lines().take_while(|l| !l.is_empty()).peekable();
        while let Some(line) = lines.next() {
            let Some((name, value)) = line.split_once(':') else { continue };
            if name.eq_ignore_ascii_case("message-id") {
                let mut value = value.trim().to_owned();
                while let Some(folded) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
                    value.push_str(folded.trim());
                }
                return Some(value);
            }
        }
        None
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// How a receiver answers one request.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    /// A `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
    /// The body, as bytes: any bytes, NUL included.
    pub body: &'static [u8],
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, delay: Duration::ZERO, retry_after: None, body: b"" }
    }
}

struct ReceiverState {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
    otherwise: Reply,
}

/// A webhook endpoint: answers with the scripted replies in turn, then with `otherwise`.
pub struct Receiver {
    pub url: String,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(script: Vec<Reply>, otherwise: Reply) -> Receiver {
        Receiver::start_on(0, script, otherwise).await
    }

    pub async fn start_on(port: u16, script: Vec<Reply>, otherwise: Reply) -> Receiver {
        let state =
            Arc::new(ReceiverState { received: Mutex::default(), script: Mutex::new(script.into()), otherwise });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let handler_state = state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let state = handler_state.clone();
                async move {
                    state.received.lock().unwrap().push(Received { headers, body, at: Instant::now() });
                    let reply = state.script.lock().unwrap().pop_front().unwrap_or(state.otherwise);
                    tokio::time::sleep(reply.delay).await;
                    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
                    if let Some(seconds) = reply.retry_after {
                        response.headers_mut().insert("retry-after", seconds.into());
                    }
                    response
                }
            }),
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, state, server }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived; returns them.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(started.elapsed() < within, "{} of {n} requests within {within:?}", received.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Verifies every request's signature with the `standardwebhooks` reference library; panics with
/// the library's complaint if one does not verify.
pub fn verify_with_reference_library(secret: &str, requests: &[Received]) {
    let attempts: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| {
            serde_json::json!({
                "headers": {
                    "webhook-id": r.header("webhook-id"),
                    "webhook-timestamp": r.header("webhook-timestamp"),
                    "webhook-signature": r.header("webhook-signature"),
                },
                "body": r.body,
            })
        })
        .collect();
    let script = "import json, sys\n\
                  from standardwebhooks.webhooks import Webhook\n\
                  given = json.load(sys.stdin)\n\
                  hook = Webhook(given['secret'])\n\
                  for attempt in given['attempts']:\n\
                  \x20   hook.verify(attempt['body'], attempt['headers'])\n\
                  print(len(given['attempts']), 'verified')\n";
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::json!({ "secret": secret, "attempts": attempts }).to_string();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the reference library rejected a signature:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), format!("{} verified", requests.len()));
}
