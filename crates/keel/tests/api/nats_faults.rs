//! NATS JetStream failing under real `keel serve` and `keel worker` processes that carry events
//! through it (`KEEL_NATS_URL`), with a nats-server of each test's own — the binary's shared one
//! ([`crate::peers::nats_url`]) is never touched. The server is killed and restarted with its store,
//! restarted with an empty store while it held events the mail server could not take yet, and
//! paused. What must hold each time is what a user sees: every acknowledged sign-up gets its welcome
//! e-mail, exactly once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, TestApp, ADMIN_TOKEN};
use crate::peers::SmtpServer;
use crate::processes::scratch_dir;

/// The kernel kills the child when the thread that started it ends: the test's own thread (these
/// tests run on a current-thread runtime), so a test that fails leaves no process behind even if
/// a `Drop` below does not run.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A nats-server (with JetStream, a file store) of one test's own, which the test may kill, restart
/// on the same port with or without its store, and pause.
struct Nats {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    /// `http://127.0.0.1:PORT` of the running server's monitoring endpoint (`-m -1`: a port of its
    /// own choosing, new at each start), for what JetStream holds (`/jsz`).
    monitor: String,
    /// Where each start's log goes (`nats-N.log`): a new file per start, so that a restart's
    /// "listening" line is not mistaken for an earlier one.
    dir: PathBuf,
    starts: usize,
}

impl Nats {
    /// Started with the port the server chooses itself (`-p -1`), read back from its log, so no
    /// other process can take the port between choosing and binding it.
    async fn start(dir: &Path) -> Nats {
        let store = dir.join("nats-store");
        std::fs::create_dir_all(&store).unwrap();
        let mut nats = Nats { child: None, port: 0, store, monitor: String::new(), dir: dir.to_owned(), starts: 0 };
        nats.port = nats.spawn("-1").await;
        nats
    }

    /// Starts the server on `port` over the store as it is; returns the port once it accepts clients.
    async fn spawn(&mut self, port: &str) -> u16 {
        let log = self.dir.join(format!("nats-{}.log", self.starts));
        self.starts += 1;
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let mut command = Command::new(binary);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", port, "-m", "-1", "-sd"])
            .arg(&self.store)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        self.child = Some(command.spawn().expect("starting nats-server (scripts/install-deps.sh installs it)"));
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text.lines().find_map(|l| l.split("Listening for client connections on 127.0.0.1:").nth(1));
            let monitor = text.lines().find_map(|l| l.split("Starting http monitor on ").nth(1));
            if let (Some(port), Some(monitor)) = (listening.and_then(|p| p.trim().parse().ok()), monitor) {
                if text.contains("Server is ready") {
                    self.monitor = format!("http://{}", monitor.trim());
                    return port;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server exited with {status} before it was ready:\n{text}");
            }
            assert!(started.elapsed() < Duration::from_secs(20), "nats-server did not start:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the server is gone at once, as in a crash (a paused server too).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A server started again on the same port over the store the killed one left.
    async fn restart_with_store(&mut self) {
        self.kill();
        let port = self.spawn(&self.port.to_string()).await;
        assert_eq!(port, self.port);
    }

    /// A server started again on the same port with an empty store: a server that lost its disk,
    /// or a container restarted without its volume.
    async fn restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.store).unwrap();
        std::fs::create_dir_all(&self.store).unwrap();
        let port = self.spawn(&self.port.to_string()).await;
        assert_eq!(port, self.port);
    }

    /// `SIGSTOP` pauses the server (its connections stay open, nothing is answered); `SIGCONT`
    /// resumes it.
    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the nats-server is running");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child, not yet reaped.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} to nats-server: {}", std::io::Error::last_os_error());
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's account of its streams and their consumers (`/jsz`).
    async fn jsz(&self) -> Value {
        let url = format!("{}/jsz?accounts=true&streams=true&consumers=true", self.monitor);
        match reqwest::get(url).await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        }
    }

    /// The `/jsz` line of consumer `name`, if the server has it.
    async fn consumer(&self, name: &str) -> Option<Value> {
        let jsz = self.jsz().await;
        let accounts = jsz["account_details"].as_array()?;
        let streams = accounts.iter().flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        let mut consumers = streams.flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten());
        consumers.find(|c| c["name"] == name).cloned()
    }

    /// The streams' state and that of their consumers that delivered anything, for a report.
    async fn describe(&self) -> String {
        let jsz = self.jsz().await;
        let accounts = jsz["account_details"].as_array().into_iter().flatten();
        let streams = accounts.flat_map(|a| a["stream_detail"].as_array().into_iter().flatten()).map(|s| {
            let consumers: Vec<String> = s["consumer_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["delivered"]["consumer_seq"].as_u64() > Some(0) || c["num_pending"].as_u64() > Some(0))
                .map(|c| {
                    format!(
                        "{}: delivered {}, ack floor {}, pending {}, ack pending {}, redelivered {}",
                        c["name"],
                        c["delivered"],
                        c["ack_floor"],
                        c["num_pending"],
                        c["num_ack_pending"],
                        c["num_redelivered"]
                    )
                })
                .collect();
            format!("stream {} made {} {}; consumers [{}]", s["name"], s["created"], s["state"], consumers.join("; "))
        });
        streams.collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `keel` process (`serve` or `worker`), killed when dropped.
struct Keel {
    child: Child,
    /// `http://127.0.0.1:PORT` of a `keel serve`, once [`Keel::wait_ready`] read it from the log.
    address: String,
    log: PathBuf,
}

impl Keel {
    fn start(args: &[&str], env: &[(&str, String)], log: &Path) -> Keel {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.args(args);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
            command.env_remove(key);
        }
        command
            .env("KEEL_LOG", "info")
            // These tests load keel from one address: no rate limits.
            .env("KEEL_RATE_LIMIT", "off")
            .env("KEEL_TOKEN_KEYS", crate::helpers::TOKEN_KEYS)
            .env("KEEL_CHECKOUT_REQUIRES_VERIFIED_EMAIL", "off")
            // The kernel picks the port; keel logs the address it got.
            .env("KEEL_LISTEN", "127.0.0.1:0")
            .env("KEEL_DATA_DIR", log.with_extension("data"));
        for (key, value) in env {
            command.env(key, value);
        }
        let log_file = std::fs::File::create(log).unwrap();
        command.stdout(Stdio::null()).stderr(log_file);
        die_with_parent(&mut command);
        Keel { child: command.spawn().unwrap(), address: String::new(), log: log.to_owned() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON lines of this process's log.
    fn log_lines(&self) -> Vec<Value> {
        self.log_text().lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    fn exited(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("keel exited with {status}; log:\n{}", self.log_text());
        }
    }

    /// Waits for the "serving" line's address and `/readyz` answering 200.
    async fn wait_ready(&mut self, within: Duration) {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if self.address.is_empty() {
                self.address = self
                    .log_lines()
                    .iter()
                    .find(|line| line["message"] == "serving")
                    .and_then(|line| line["address"].as_str().map(|a| format!("http://{a}")))
                    .unwrap_or_default();
            }
            if !self.address.is_empty() {
                if let Ok(response) = client.get(format!("{}/readyz", self.address)).send().await {
                    if response.status() == 200 {
                        return;
                    }
                }
            }
            self.exited();
            assert!(started.elapsed() < within, "not ready within {within:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a log line whose message is `message`.
    async fn wait_for_log(&mut self, message: &str, within: Duration) {
        let started = Instant::now();
        while !self.log_lines().iter().any(|line| line["message"] == message) {
            self.exited();
            assert!(started.elapsed() < within, "no {message:?} within {within:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the exit status once it stopped.
    async fn stop(&mut self) -> ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "keel did not stop; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's deployment: the databases of a [`TestApp`] (whose own process uses no NATS and runs
/// no workers), one `keel serve` and one `keel worker` carrying events through `nats`, and e-mail
/// to an SMTP server on `smtp_port` (which the test may start later).
struct Deployment {
    app: TestApp,
    api: Keel,
    worker: Keel,
    nats: Nats,
    smtp_port: u16,
    prefix: String,
}

impl Deployment {
    async fn start(scratch: &Path, smtp_port: u16) -> Deployment {
        let app = TestApp::spawn_with(|config| config.nats_url = None).await;
        let nats = Nats::start(scratch).await;
        let prefix = "faults".to_owned();
        let env = vec![
            ("KEEL_CATALOG_URL", app.dbs.catalog_url.clone()),
            ("KEEL_SHARD_URLS", app.dbs.shard_urls.join(",")),
            ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("KEEL_SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}")),
            ("KEEL_NATS_URL", nats.url()),
            ("KEEL_NATS_PREFIX", prefix.clone()),
            // A message whose acknowledgement was lost with the server is delivered again after
            // its ack wait, one and a half times this: 15 s rather than 90 s, so that a test can
            // wait for the stream to drain (and any such second delivery to have run).
            ("KEEL_JOB_TIMEOUT", "10s".to_owned()),
        ];
        let mut api = Keel::start(&["serve"], &env, &scratch.join("api.log"));
        let mut worker = Keel::start(&["worker"], &env, &scratch.join("worker.log"));
        api.wait_ready(Duration::from_secs(30)).await;
        // Logged once the worker has connected to JetStream and made sure of the stream.
        worker.wait_for_log("JetStream consumers started", Duration::from_secs(30)).await;
        Deployment { app, api, worker, nats, smtp_port, prefix }
    }

    /// The `user.registered` rows of every shard by state.
    async fn user_registered_states(&self) -> HashMap<String, i64> {
        let mut states = HashMap::new();
        for url in &self.app.dbs.shard_urls {
            let shard = crate::helpers::connect(url).await;
            let sql = "SELECT state, count(*) FROM keel_jobs WHERE kind = 'user.registered' GROUP BY state";
            for row in shard.query(sql, &[]).await.unwrap() {
                *states.entry(row.get::<_, String>(0)).or_default() += row.get::<_, i64>(1);
            }
        }
        states
    }

    /// When the relay last started on the `user.registered` rows still `relayed` (earliest and
    /// latest, by the databases' clock), and the databases' time now.
    async fn relayed_since(&self) -> Vec<String> {
        let mut found = Vec::new();
        for url in &self.app.dbs.shard_urls {
            let shard = crate::helpers::connect(url).await;
            let sql =
                "SELECT min(started_at)::text || ' .. ' || max(started_at)::text || ' (now ' || now()::text || ')'
                       FROM keel_jobs WHERE kind = 'user.registered' AND state = 'relayed'";
            found.push(shard.query_one(sql, &[]).await.unwrap().get::<_, Option<String>>(0).unwrap_or_default());
        }
        found
    }

    /// The `user.registered` rows not done, and what the worker logged for each: for a failure's
    /// message.
    async fn unfinished(&self) -> String {
        let mut found = String::new();
        let lines = self.worker.log_lines();
        for url in &self.app.dbs.shard_urls {
            let shard = crate::helpers::connect(url).await;
            let sql = "SELECT id::text, state, attempts, coalesce(last_error, ''), started_at::text
                       FROM keel_jobs WHERE kind = 'user.registered' AND state <> 'done'";
            for row in shard.query(sql, &[]).await.unwrap() {
                let id: String = row.get(0);
                found.push_str(&format!(
                    "\n  {id}: {}, {} attempt(s), last error {:?}, last started {}; logged:",
                    row.get::<_, String>(1),
                    row.get::<_, i32>(2),
                    row.get::<_, String>(3).chars().take(80).collect::<String>(),
                    row.get::<_, String>(4)
                ));
                for line in lines.iter().filter(|l| l["span"]["job_id"] == id.as_str()) {
                    let error = line["error"].as_str().unwrap_or_default().chars().take(60).collect::<String>();
                    found.push_str(&format!(
                        "\n    {} attempt {} {} {error}",
                        line["timestamp"].as_str().unwrap_or_default(),
                        line["span"]["attempt"],
                        line["message"]
                    ));
                }
            }
        }
        found
    }

    /// E-mails claimed on every shard and not (yet) recorded as sent: each one a send that was
    /// tried (and failed, if the mail server is down).
    async fn unsent_claims(&self) -> i64 {
        let mut unsent = 0;
        for url in &self.app.dbs.shard_urls {
            let shard = crate::helpers::connect(url).await;
            let sql = "SELECT count(*) FROM email_deliveries WHERE sent_at IS NULL";
            unsent += shard.query_one(sql, &[]).await.unwrap().get::<_, i64>(0);
        }
        unsent
    }

    /// Messages in the stream (a work queue: those not yet acknowledged by their consumer).
    async fn backlog(&self) -> Result<u64, String> {
        keel_outbox::JetStream::connect(&self.nats.url(), &self.prefix).await?.backlog().await
    }

    /// `user.registered` messages the server may still deliver: not yet delivered, and delivered
    /// but not acknowledged (delivered again once their ack wait lapses). `None` while the server
    /// has no such consumer.
    async fn deliverable(&self) -> Option<u64> {
        let consumer = self.nats.consumer(&format!("{}-user_registered", self.prefix)).await?;
        Some(consumer["num_pending"].as_u64()? + consumer["num_ack_pending"].as_u64()?)
    }

    /// `user.registered`'s line of `GET /v1/admin/queues` on the `keel serve` process.
    async fn user_registered_queue(&self) -> Value {
        let client = reqwest::Client::new();
        let queues = client.get(format!("{}/v1/admin/queues", self.api.address)).bearer_auth(ADMIN_TOKEN).send().await;
        let queues = expect_json(queues, 200).await;
        let kinds = queues["kinds"].as_array().unwrap();
        kinds.iter().find(|k| k["kind"] == "user.registered").expect("user.registered is listed").clone()
    }

    /// `keel_queue_oldest_pending_seconds{kind="user.registered"}` on the `keel serve` process's
    /// `/metrics`.
    async fn oldest_pending_gauge(&self) -> Option<f64> {
        let metrics = reqwest::get(format!("{}/metrics", self.api.address)).await.unwrap().text().await.unwrap();
        metrics.lines().find_map(|line| {
            line.strip_prefix("keel_queue_oldest_pending_seconds{kind=\"user.registered\"} ")?.trim().parse().ok()
        })
    }

    async fn stop(mut self) {
        for node in [&mut self.worker, &mut self.api] {
            let status = node.stop().await;
            assert!(status.success(), "keel exited with {status}; log:\n{}", node.log_text());
        }
    }
}

/// Signs up `count` users through `base` with the addresses `{prefix}{i}@example.org`, one every
/// `every`, each request on its own task (a slow answer does not hold up the pace). Returns the
/// addresses acknowledged (201) and what the others got.
async fn sign_up(base: String, prefix: &'static str, count: usize, every: Duration) -> (Vec<String>, Vec<String>) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut pace = tokio::time::interval(every);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..count {
        pace.tick().await;
        let email = format!("{prefix}{i}@example.org");
        let request = client.post(format!("{base}/v1/users")).json(&json!({ "name": format!("N{i}"), "email": email }));
        requests.spawn(async move {
            let outcome = match request.send().await {
                Ok(response) => response.status().as_u16().to_string(),
                Err(e) => e.to_string(),
            };
            (email, outcome)
        });
    }
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    while let Some(done) = requests.join_next().await {
        match done.unwrap() {
            (email, status) if status == "201" => acknowledged.push(email),
            (email, outcome) => refused.push(format!("{email}: {outcome}")),
        }
    }
    acknowledged.sort();
    (acknowledged, refused)
}

/// How many welcome e-mails the server holds for each address (from the `To` header).
fn welcomes_by_address(smtp: &SmtpServer) -> HashMap<String, usize> {
    let mut welcomes = HashMap::new();
    for message in smtp.messages() {
        let headers: Vec<&str> = message.lines().take_while(|l| !l.is_empty()).collect();
        if !headers.contains(&"Subject: Welcome to Keel") {
            continue;
        }
        let to = headers.iter().find_map(|h| h.strip_prefix("To: ")).unwrap_or_default();
        let address = to.rsplit_once('<').map_or(to, |(_, a)| a.trim_end_matches('>')).trim().to_owned();
        *welcomes.entry(address).or_default() += 1;
    }
    welcomes
}

/// What the mail server holds for the acknowledged addresses: (missing, sent more than once to one
/// address, Message-IDs received more than once).
fn mail_outcome(smtp: &SmtpServer, acknowledged: &[String]) -> (usize, usize, usize) {
    let welcomes = welcomes_by_address(smtp);
    let missing = acknowledged.iter().filter(|a| !welcomes.contains_key(*a)).count();
    let repeated = welcomes.values().map(|n| n - 1).sum();
    let duplicate_ids = smtp.message_id_counts().values().map(|n| n - 1).sum();
    (missing, repeated, duplicate_ids)
}

/// Log lines of the worker, after the first `skip`, that say a relay failed to publish a
/// `user.registered` event (the runner's "job failed" of a relay run).
fn relay_failures(worker: &Keel, skip: usize) -> usize {
    let lines = worker.log_lines();
    lines
        .iter()
        .skip(skip)
        .filter(|l| {
            l["message"] == "job failed"
                && l["span"]["kind"] == "user.registered"
                && l["error"].as_str().is_some_and(|e| e.contains("JetStream did not take the event"))
        })
        .count()
}

/// The distinct warnings and errors in a process's log, with how often each was written.
fn warnings(keel: &Keel) -> String {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for line in keel.log_lines() {
        if !matches!(line["level"].as_str(), Some("WARN" | "ERROR")) {
            continue;
        }
        let error = line["error"].as_str().map(|e| e.chars().take(160).collect::<String>());
        let text = format!("{} {} ({})", line["level"], line["message"], error.unwrap_or_default());
        match seen.iter_mut().find(|(t, _)| *t == text) {
            Some((_, n)) => *n += 1,
            None => seen.push((text, 1)),
        }
    }
    seen.iter().map(|(t, n)| format!("\n  {n} x {t}")).collect()
}

fn log_messages(worker: &Keel, message: &str) -> Vec<Value> {
    worker.log_lines().into_iter().filter(|l| l["message"] == message).collect()
}

/// The nats-server SIGKILLed in the middle of paced sign-ups and started again a second later on
/// the same port over the store it left: every acknowledged sign-up's welcome arrives, none twice —
/// neither by address nor by Message-ID — and once the stream has drained (every message
/// acknowledged; a delivery whose acknowledgement died with the server comes again after its ack
/// wait) still none twice, with every event's row done.
#[tokio::test]
async fn a_nats_server_killed_and_restarted_with_its_store_sends_no_email_twice() {
    const USERS: usize = 150;
    let test_started = Instant::now();
    let scratch = scratch_dir("nats-killed");
    let port = crate::peers::free_port();
    let smtp = SmtpServer::start(port, &scratch.join("maildir")).await;
    let mut deployment = Deployment::start(&scratch, port).await;

    // 150 sign-ups, one every 40 ms (6 s); the server is killed 3 s in and back a second later.
    let load_started = Instant::now();
    let load = tokio::spawn(sign_up(deployment.api.address.clone(), "natskill", USERS, Duration::from_millis(40)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let welcomed_before_kill = welcomes_by_address(&smtp).len();
    let states_at_kill = deployment.user_registered_states().await;
    deployment.nats.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    deployment.nats.restart_with_store().await;
    let restarted = Instant::now();
    let restart_took = restarted - killed;
    eprintln!("JetStream as restarted: {}", deployment.nats.describe().await);
    let (acknowledged, refused) = load.await.unwrap();
    eprintln!(
        "{USERS} sign-ups in {:?}: {} acknowledged, refused: {refused:?}; at the kill {welcomed_before_kill} welcomes \
         had arrived and the events were {states_at_kill:?}; nats-server back {restart_took:?} after the kill",
        load_started.elapsed(),
        acknowledged.len(),
    );
    // `keel serve` writes events to the outbox, never to NATS: a sign-up has no reason to fail.
    assert_eq!(acknowledged.len(), USERS, "sign-ups refused: {refused:?}");
    assert!(welcomed_before_kill > 0, "no welcome arrived before the kill: the kill interrupted nothing");

    // Every welcome, every row done, and nothing the server could still deliver: no message waiting,
    // none delivered and unacknowledged (those come again after their ack wait, 15 s).
    let waited = Instant::now();
    let (mut deliverable, mut states);
    let (missing, repeated, duplicate_ids) = loop {
        let outcome = mail_outcome(&smtp, &acknowledged);
        states = deployment.user_registered_states().await;
        deliverable = deployment.deliverable().await;
        let done = states.get("done").copied() == Some(USERS as i64) && states.len() == 1;
        if (outcome.0 == 0 && done && deliverable == Some(0)) || waited.elapsed() > Duration::from_secs(60) {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let jetstream = deployment.nats.describe().await;
    let worker = &deployment.worker;
    eprintln!(
        "after {:?} ({:?} after the restart): {missing} of {} welcomes missing, {repeated} sent twice to one \
         address, {duplicate_ids} duplicate Message-ID(s); events {states:?}; still deliverable {deliverable:?}, \
         messages in the stream {:?}; worker log: {} relay failure(s), {} consumer error(s), {} unrecorded \
         send(s)\nJetStream at the end: {jetstream}",
        waited.elapsed(),
        restarted.elapsed(),
        acknowledged.len(),
        deployment.backlog().await,
        relay_failures(worker, 0),
        log_messages(worker, "cannot consume from JetStream; retrying").len(),
        log_messages(worker, "could not record a sent e-mail; retrying until the database takes it").len(),
    );
    assert_eq!(missing, 0, "acknowledged sign-ups without a welcome e-mail");
    assert_eq!((repeated, duplicate_ids), (0, 0), "welcomes sent twice: (to one address, by Message-ID)");
    assert_eq!(states.get("done").copied(), Some(USERS as i64), "user.registered rows by state: {states:?}");
    assert_eq!(states.len(), 1, "user.registered rows not done: {states:?}");
    assert_eq!(deliverable, Some(0), "messages the server may still deliver: {jetstream}");
    assert_eq!(deployment.unsent_claims().await, 0, "e-mails claimed but not recorded as sent");
    deployment.stop().await;
    eprintln!("test took {:?}", test_started.elapsed());
}

/// Events relayed to JetStream while the mail server is down (so their consumer tried and failed to
/// send, and their rows stay `relayed`) are in the stream only; the nats-server then loses its
/// store (killed, restarted on the same port empty) and the mail server comes up. With neither
/// `keel serve` nor `keel worker` restarted, every welcome arrives, exactly once, within 60 s: the
/// relay finds the rows relayed before the stream was made again and relays them again.
#[tokio::test]
async fn events_relayed_before_nats_lost_its_store_all_arrive() {
    const USERS: usize = 20;
    let test_started = Instant::now();
    let scratch = scratch_dir("nats-store-lost");
    // Nothing listens here until the store is lost: every send is refused meanwhile.
    let port = crate::peers::free_port();
    let mut deployment = Deployment::start(&scratch, port).await;

    let (acknowledged, refused) =
        sign_up(deployment.api.address.clone(), "natslost", USERS, Duration::from_millis(20)).await;
    assert_eq!(acknowledged.len(), USERS, "sign-ups refused: {refused:?}");

    // Relayed (in the stream), and each one's e-mail tried and failed (the consumer had it).
    let started = Instant::now();
    let (mut states, mut tried);
    loop {
        states = deployment.user_registered_states().await;
        tried = deployment.unsent_claims().await;
        if (states.get("relayed").copied() == Some(USERS as i64) && tried == USERS as i64)
            || started.elapsed() > Duration::from_secs(20)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let send_failures = deployment
        .worker
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "job failed" && l["error"].as_str().is_some_and(|e| e.contains("SMTP")))
        .count();
    eprintln!(
        "after {:?}: events {states:?}, {tried} e-mails tried and not sent, {send_failures} failed sends logged",
        started.elapsed()
    );
    assert_eq!(states.get("relayed").copied(), Some(USERS as i64), "every event relayed: {states:?}");
    assert_eq!(states.len(), 1, "every event relayed: {states:?}");
    assert_eq!(tried, USERS as i64, "every event's e-mail was tried while the mail server was down");
    assert_eq!(deployment.backlog().await, Ok(USERS as u64), "the stream holds the events");

    deployment.nats.restart_empty().await;
    let restarted = Instant::now();
    let restarted_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let smtp = SmtpServer::start(deployment.smtp_port, &scratch.join("maildir")).await;
    let (missing, repeated, duplicate_ids) = loop {
        let outcome = mail_outcome(&smtp, &acknowledged);
        states = deployment.user_registered_states().await;
        let done = states.get("done").copied() == Some(USERS as i64);
        if (outcome.0 == 0 && done) || restarted.elapsed() > Duration::from_secs(60) {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let arrived_in = restarted.elapsed();
    // A little longer: a late second copy would show now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (missing_later, repeated_later, duplicate_ids_later) = mail_outcome(&smtp, &acknowledged);
    let worker = &deployment.worker;
    let relayed_again: u64 =
        log_messages(worker, "the stream is younger than events relayed and not yet handled: relaying them again")
            .iter()
            .filter_map(|l| l["events"].as_u64())
            .sum();
    let at = |message: &str| -> Vec<String> {
        log_messages(worker, message).iter().map(|l| l["timestamp"].as_str().unwrap_or_default().to_owned()).collect()
    };
    eprintln!(
        "{arrived_in:?} after the empty restart: {missing} of {USERS} welcomes missing, {repeated} sent twice to one \
         address, {duplicate_ids} duplicate Message-ID(s) (2 s later: {missing_later}, {repeated_later}, \
         {duplicate_ids_later}); events {states:?}; worker log: {relayed_again} event(s) relayed again; \
         restarted at {restarted_at}, stream made again at {:?}, events relayed again at {:?}, consumer errors at {:?}",
        at("the JetStream stream was missing; it exists again"),
        at("the stream is younger than events relayed and not yet handled: relaying them again"),
        at("cannot consume from JetStream; retrying"),
    );
    if missing > 0 {
        eprintln!(
            "rows still relayed, started at: {:?}\nJetStream: {}\nworker warnings:{}",
            deployment.relayed_since().await,
            deployment.nats.describe().await,
            warnings(worker)
        );
    }
    assert_eq!(missing, 0, "welcomes lost with the broker's store, not arrived within 60 s");
    assert_eq!((repeated_later, duplicate_ids_later), (0, 0), "welcomes sent twice: (to one address, by Message-ID)");
    assert_eq!(states.get("done").copied(), Some(USERS as i64), "user.registered rows by state: {states:?}");
    deployment.stop().await;
    eprintln!("test took {:?}", test_started.elapsed());
}

/// The nats-server paused (SIGSTOP: connections open, nothing answered) while users sign up: their
/// events cannot be relayed, and that shows where an operator looks — the oldest pending age of
/// `user.registered` on `GET /v1/admin/queues` and in `keel_queue_oldest_pending_seconds` of
/// `keel serve`'s `/metrics` rises second by second, and the worker logs the relay's failures
/// (`keel worker` serves no `/metrics`, so its `keel_outbox_relay_failures_total` can be seen
/// nowhere). Resumed, every welcome arrives once and the age falls back to zero.
#[tokio::test]
async fn a_nats_outage_shows_in_the_oldest_pending_age_and_relay_failures() {
    const USERS: usize = 5;
    let test_started = Instant::now();
    let scratch = scratch_dir("nats-paused");
    let port = crate::peers::free_port();
    let smtp = SmtpServer::start(port, &scratch.join("maildir")).await;
    let mut deployment = Deployment::start(&scratch, port).await;

    // One sign-up through the whole path first: the stream and its consumers are in use.
    let (mut acknowledged, _) = sign_up(deployment.api.address.clone(), "natsfirst", 1, Duration::from_millis(1)).await;
    let started = Instant::now();
    while deployment.user_registered_states().await.get("done") != Some(&1) || mail_outcome(&smtp, &acknowledged).0 > 0
    {
        assert!(started.elapsed() < Duration::from_secs(20), "the first sign-up's welcome did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = deployment.user_registered_queue().await;
    assert_eq!(before["oldest_pending_age_s"], 0.0, "nothing waits before the outage: {before}");

    deployment.nats.signal(libc::SIGSTOP);
    let paused = Instant::now();
    let log_at_pause = deployment.worker.log_lines().len();
    let (stalled, refused) =
        sign_up(deployment.api.address.clone(), "natsstall", USERS, Duration::from_millis(1)).await;
    assert_eq!(stalled.len(), USERS, "sign-ups refused: {refused:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = deployment.user_registered_queue().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = deployment.user_registered_queue().await;
    let gauge = deployment.oldest_pending_gauge().await;
    let age = |q: &Value| q["oldest_pending_age_s"].as_f64().unwrap();
    eprintln!("paused: {first} then, 3 s later, {second}; the /metrics gauge {gauge:?}");
    assert!(age(&first) >= 0.9, "the oldest pending age does not count the stalled events: {first}");
    assert!(age(&second) >= age(&first) + 2.5, "the oldest pending age does not rise: {first} then {second}");
    assert!(gauge.is_some_and(|g| g >= age(&second)), "keel_queue_oldest_pending_seconds: {gauge:?}");
    let waiting = |q: &Value| q["pending"].as_i64().unwrap() + q["running"].as_i64().unwrap();
    assert_eq!(waiting(&second), USERS as i64, "the stalled events wait: {second}");

    // A relay run gives up after trying for about 10 s (two publishes, 5 s each for an answer).
    let started = Instant::now();
    while relay_failures(&deployment.worker, log_at_pause) == 0 {
        deployment.worker.exited();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no relay failure logged while the server was paused; worker log:\n{}",
            deployment.worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failures_seen_after = paused.elapsed();
    let third = deployment.user_registered_queue().await;
    eprintln!("first relay failure logged {failures_seen_after:?} after the pause; queue then {third}");
    assert!(age(&third) >= age(&second) + 1.0, "the oldest pending age stopped rising: {second} then {third}");

    deployment.nats.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let resumed_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    acknowledged.extend(stalled);
    let (mut queue, mut states);
    let (missing, repeated, duplicate_ids) = loop {
        let outcome = mail_outcome(&smtp, &acknowledged);
        queue = deployment.user_registered_queue().await;
        states = deployment.user_registered_states().await;
        let done = states.get("done").copied() == Some(acknowledged.len() as i64);
        if (outcome.0 == 0 && done && age(&queue) == 0.0) || resumed.elapsed() > Duration::from_secs(30) {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // When each welcome of the stalled sign-ups arrived, in seconds after the server resumed.
    let resumed_wall = std::time::SystemTime::now() - resumed.elapsed();
    let mut arrivals: Vec<f64> = smtp
        .messages_with_arrival()
        .iter()
        .filter(|(_, m)| m.contains("<natsstall"))
        .map(|(at, _)| at.duration_since(resumed_wall).map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0))
        .collect();
    arrivals.sort_by(f64::total_cmp);
    let worker = &deployment.worker;
    eprintln!(
        "{:?} after resuming: {missing} of {} welcomes missing, {repeated} sent twice to one address, \
         {duplicate_ids} duplicate Message-ID(s); the stalled sign-ups' welcomes arrived {arrivals:?} s after \
         resuming; queue {queue}; events {states:?}; worker log: {} relay failure(s), {} consumer error(s)\n\
         JetStream: {}",
        resumed.elapsed(),
        acknowledged.len(),
        relay_failures(worker, log_at_pause),
        log_messages(worker, "cannot consume from JetStream; retrying").len(),
        deployment.nats.describe().await,
    );
    if states.get("done").copied() != Some(acknowledged.len() as i64) {
        eprintln!("resumed at {resumed_at}; events not done:{}", deployment.unfinished().await);
    }
    assert_eq!(missing, 0, "welcomes missing after the server resumed");
    assert_eq!((repeated, duplicate_ids), (0, 0), "welcomes sent twice: (to one address, by Message-ID)");
    assert_eq!(
        states.get("done").copied(),
        Some(acknowledged.len() as i64),
        "events by state, 30 s after the server resumed, every welcome sent: {states:?}"
    );
    assert_eq!(age(&queue), 0.0, "the oldest pending age did not fall back: {queue}");
    deployment.stop().await;
    eprintln!("test took {:?}", test_started.elapsed());
}
