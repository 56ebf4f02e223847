//! Stream set-up against a real nats-server (started here on a private port with its own store).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use keel_outbox::JetStream;
use tokio::task::JoinSet;

struct Nats {
    child: Child,
    port: u16,
    store: std::path::PathBuf,
}

impl Nats {
    /// Started with the port chosen by the server itself (`-p -1`) and read back from its log, so
    /// no other process can take the port between choosing and binding it.
    fn start() -> Nats {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let store = std::env::temp_dir().join(format!("keel-outbox-nats-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store).unwrap();
        let log = store.join("nats.log");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (make deps-test)");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let port = text.lines().find_map(|l| l.split("Listening for client connections on 127.0.0.1:").nth(1));
            if let Some(port) = port.and_then(|p| p.trim().parse().ok()) {
                break port;
            }
            assert!(Instant::now() < deadline, "nats-server did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Nats { child, port, store }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The server refuses a losing create only when two arrive within a narrow window (one round in a
/// hundred or so against a 2.9 server, with the old find-then-create): many rounds make it certain.
const ROUNDS: usize = 300;
const PER_ROUND: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_processes_starting_at_once_all_get_the_stream() {
    let nats = Nats::start();
    // Each round is a fresh stream (a new prefix): the state of a server no process has set up yet.
    for round in 0..ROUNDS {
        let prefix = format!("race{round}");
        let mut starts = JoinSet::new();
        for _ in 0..PER_ROUND {
            let (url, prefix) = (nats.url(), prefix.clone());
            starts.spawn(async move { JetStream::connect(&url, &prefix).await });
        }
        while let Some(started) = starts.join_next().await {
            let js = started.unwrap().unwrap_or_else(|e| panic!("round {round}: a concurrent start failed: {e}"));
            assert_eq!(js.stream_name(), format!("RACE{round}_EVENTS"));
        }
    }
}

#[tokio::test]
async fn a_stream_of_an_older_version_is_updated_or_named() {
    let nats = Nats::start();
    let context = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // Made by an "older Keel": a shorter duplicate window. Updated in place.
    context
        .create_stream(stream::Config {
            name: "OLD_EVENTS".into(),
            subjects: vec!["old.events.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .unwrap();
    JetStream::connect(&nats.url(), "old").await.unwrap();
    let mut found = context.get_stream("OLD_EVENTS").await.unwrap();
    assert_eq!(found.info().await.unwrap().config.duplicate_window, Duration::from_secs(120));

    // A retention JetStream cannot change in place: refused, with the stream and the way out named.
    context
        .create_stream(stream::Config {
            name: "LIMITS_EVENTS".into(),
            subjects: vec!["limits.events.>".into()],
            retention: stream::RetentionPolicy::Limits,
            ..Default::default()
        })
        .await
        .unwrap();
    let error = JetStream::connect(&nats.url(), "limits").await.err().expect("a stream Keel cannot use is refused");
    assert!(error.contains("LIMITS_EVENTS") && error.contains("retention"), "{error}");
}
