//! Accepting and serving connections: Keel's own accept loop over hyper's HTTP/1 server, because
//! axum's `serve` builds hyper without a timer (so no header-read timeout), closes no idle
//! connection and accepts without limit — a slowloris client, or enough silent ones, would hold
//! descriptors until the process could accept no one.
//!
//! - **Header-read timeout** (hyper's, with a timer): a request's headers must be complete within
//!   it, counted from when the connection is ready for a request: a fresh connection, or a
//!   keep-alive one after its last answer. Trickling a header line now and then does not help.
//! - **Idle timeout** (ours): a connection with no request being handled on which no byte has moved
//!   for this long is closed: a client that connected and said nothing, one that keeps a connection
//!   open between requests, one that stopped reading its answer.
//! - **Connection cap**: at most `max_connections` open at once. When a new connection finds the cap
//!   reached, the open connection idle the longest (no request being handled) is asked to close, and
//!   the new one is served as soon as it has. When every connection is handling a request, Keel stops
//!   accepting until one closes: new clients wait in the kernel's listen backlog, none is refused.
//!   A connection in the middle of a request is never closed to make room.
//! - **Stopping**: no new connections; connections with no request being handled close at once; the
//!   others finish the request they are handling, then close.
//!
//! Each request carries the peer address as axum's `ConnectInfo<SocketAddr>` (for the rate limits).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tower::Service;

/// What bounds a connection, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// How long a connection asked to close (to make room, or because Keel is stopping) may stay open
/// with no request being handled: long enough to flush an answer already written, short enough that
/// a head never finished (a slowloris client trickling it) does not hold the slot.
const WIND_DOWN: Duration = Duration::from_secs(1);

/// Descriptors kept for everything but client connections (database pools, logs, mail, NATS,
/// Redis): the cap is lowered to leave them, at most half of the process's file limit.
const RESERVED_DESCRIPTORS: u64 = 512;

/// The connection cap this process can keep: `wanted`, lowered to what its open-file limit allows
/// once that limit is raised as far as it goes (its soft limit to its hard one).
pub fn connection_cap(wanted: usize) -> usize {
    let Some(files) = raise_open_file_limit() else { return wanted };
    let allowed = files - RESERVED_DESCRIPTORS.min(files / 2);
    let allowed = usize::try_from(allowed).unwrap_or(usize::MAX).max(1);
    if wanted > allowed {
        tracing::warn!(
            wanted,
            allowed,
            open_file_limit = files,
            "KEEL_MAX_CONNECTIONS is more than the open-file limit allows; lowered (raise `ulimit -n` to keep it)"
        );
    }
    wanted.min(allowed)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does): the soft limit is often
/// 1024, far below what a server with thousands of connections needs. Returns the limit in force.
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass; no other precondition.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur)
}

/// One open connection, as its task and the accept loop see it.
struct Conn {
    id: u64,
    /// Requests being handled: from a complete head to the end of the answer's body.
    busy: AtomicUsize,
    /// When a byte last moved either way, or an answer last finished: milliseconds since `epoch`.
    last_activity: AtomicU64,
    epoch: Instant,
    /// Chosen by the accept loop to close, to make room.
    evicted: AtomicBool,
    evict: tokio::sync::Notify,
}

impl Conn {
    fn touch(&self) {
        self.last_activity.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_activity.load(Ordering::Relaxed))
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// Completes once no request has been handled and no byte has moved for `quiet`.
    async fn quiet_for(&self, quiet: Duration) {
        loop {
            let now = Instant::now();
            let wake = if self.busy() {
                now + quiet
            } else {
                let deadline = self.last_activity() + quiet;
                if now >= deadline {
                    return;
                }
                deadline
            };
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// The open connections, for the accept loop to choose which to close when the cap is reached.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Connections asked to close that have not yet: while one is, no other is chosen.
    evicting: AtomicUsize,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            evicting: AtomicUsize::new(0),
        }
    }

    fn open(self: &Arc<Registry>) -> Registered {
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            last_activity: AtomicU64::new(0),
            epoch: self.epoch,
            evicted: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
        });
        conn.touch();
        self.open.lock().unwrap().insert(conn.id, conn.clone());
        metrics::gauge!("keel_http_connections_open").increment(1.0);
        Registered { registry: self.clone(), conn }
    }

    /// Asks the connection idle the longest to close, unless one asked before is still closing.
    fn evict_idlest(&self) {
        if self.evicting.load(Ordering::Acquire) > 0 {
            return;
        }
        let open = self.open.lock().unwrap();
        let idlest = open.values().filter(|c| !c.busy()).min_by_key(|c| c.last_activity.load(Ordering::Relaxed));
        if let Some(conn) = idlest {
            conn.evicted.store(true, Ordering::Release);
            self.evicting.fetch_add(1, Ordering::AcqRel);
            conn.evict.notify_one();
        }
    }
}

/// A connection's place in the registry, given up when its task ends.
struct Registered {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
}

impl Registered {
    /// Stays open after all: the accept loop may choose another connection to close.
    fn decline_eviction(&self) {
        if self.conn.evicted.swap(false, Ordering::AcqRel) {
            self.registry.evicting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.open.lock().unwrap().remove(&self.conn.id);
        if self.conn.evicted.load(Ordering::Acquire) {
            self.registry.evicting.fetch_sub(1, Ordering::AcqRel);
        }
        metrics::gauge!("keel_http_connections_open").decrement(1.0);
    }
}

/// Accepts connections until `stopping` turns true, serving each on a task of `connections`.
pub async fn accept(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    connections: &TaskTracker,
    mut stopping: watch::Receiver<bool>,
) {
    let registry = Arc::new(Registry::new());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stopping| *stopping) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up before we took it: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            // Out of descriptors (EMFILE, ENFILE) or buffers: make room as the cap does, and retry soon.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection; closing the one idle the longest");
                registry.evict_idlest();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics::counter!("keel_http_connections_at_cap_total").increment(1);
                // Wait for a slot: freed by the connection asked to close, or by any that ends. While
                // every connection is busy none is asked; keep looking as they finish their requests.
                loop {
                    registry.evict_idlest();
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => break slot.expect("the semaphore is never closed"),
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stopping.wait_for(|stopping| *stopping) => return,
                    }
                }
            }
        };
        let registered = registry.open();
        connections.spawn(serve(stream, peer, router.clone(), limits, registered, slot, stopping.clone()));
    }
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until the client closes it, a timeout closes it, it is asked to close to
/// make room, or Keel stops.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    registered: Registered,
    _slot: OwnedSemaphorePermit,
    mut stopping: watch::Receiver<bool>,
) {
    let conn = registered.conn.clone();
    let io = TokioIo::new(Watched { stream, conn: conn.clone() });
    let handling = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::start(handling.clone());
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        // A Router is always ready: no need to wait for `poll_ready`.
        let answer = router.clone().call(req);
        async move {
            let response = answer.await.unwrap_or_else(|never| match never {});
            Ok::<_, Infallible>(response.map(|body| Body::new(BusyBody { body, _busy: busy })))
        }
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let reason = loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        metrics::counter!("keel_http_connections_closed_total", "reason" => "header_timeout")
                            .increment(1);
                    }
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            // Nothing to finish: nothing is being handled, and nothing moved for the whole timeout.
            () = conn.quiet_for(limits.idle_timeout) => {
                metrics::counter!("keel_http_connections_closed_total", "reason" => "idle").increment(1);
                return;
            }
            () = conn.evict.notified() => {
                // Chosen while idle, but a request came in since: it is not closed mid-request; the
                // accept loop chooses another.
                if conn.busy() {
                    registered.decline_eviction();
                    continue;
                }
                break "evicted";
            }
            _ = stopping.wait_for(|stopping| *stopping) => break "stopping",
        }
    };
    metrics::counter!("keel_http_connections_closed_total", "reason" => reason).increment(1);
    // A request being handled finishes and its answer goes out; then the connection closes. hyper
    // closes at once a connection between requests. With nothing being handled, what may remain is
    // a head not finished or the tail of an answer the client is slow to read: WIND_DOWN, no more.
    connection.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = tokio::time::sleep(WIND_DOWN) => {
                if !conn.busy() {
                    return;
                }
            }
        }
    }
}

/// A request being handled on its connection, from its head to the end of its answer's body.
struct Busy(Arc<Conn>);

impl Busy {
    fn start(conn: Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, which ends the request's [`Busy`] when hyper is done with it.
struct BusyBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, noting when bytes move (for the idle timeout).
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
