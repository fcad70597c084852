//! The admin listener: HTTP/1.1 (and h2c) over hyper, served by hand so that
//! no client can hold the daemon's resources.
//!
//! - **Header timeout** (`admin.header_timeout`, 10 s): a new connection must
//!   send a complete request head within this long of being accepted, and a
//!   kept-alive one within this long of the first byte of its next request.
//!   Otherwise it is closed (slowloris).
//! - **Idle timeout** (`admin.idle_timeout`, 60 s): a kept-alive connection
//!   with no request in flight and no bytes moving for this long is closed.
//! - **Connection cap** (`admin.max_connections`, 256, and never more than a
//!   quarter of `RLIMIT_NOFILE`, see [`connection_cap`]): at the cap a new
//!   connection is still accepted, and the connection that has been idle the
//!   longest (one that never sent a request first) is closed to make room;
//!   when every connection is busy the new one is closed at once. So the API
//!   holds at most `cap` sockets (plus a few being closed), a flood of idle
//!   connections never locks out `/healthz`, and the other three quarters of
//!   the descriptors stay for Redis, upstream sockets and plugins.
//!
//! A request in flight is never cut by these timeouts (a `/v1/run` may wait
//! for its job); only requests that passed authentication can read a body.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// The admin API may hold at most `RLIMIT_NOFILE / FD_SHARE` connections;
/// the rest of the descriptors are reserved for job traffic.
pub(crate) const FD_SHARE: u64 = 4;

/// Connections being closed (evicted, not yet gone) on top of the cap before
/// new ones are refused outright.
const EVICTION_SLACK: usize = 32;

/// Timeouts and the connection cap of the admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Already reduced to the descriptor share ([`connection_cap`]).
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits::from_config(&crate::config::AdminConfig::default(), None)
    }
}

impl ServerLimits {
    /// The limits of `[admin]`, the cap reduced to the share of `nofile`
    /// (the soft `RLIMIT_NOFILE`; `None` for unlimited).
    pub(crate) fn from_config(
        cfg: &crate::config::AdminConfig,
        nofile: Option<u64>,
    ) -> ServerLimits {
        ServerLimits {
            header_timeout: cfg.header_timeout,
            idle_timeout: cfg.idle_timeout,
            max_connections: connection_cap(cfg.max_connections, nofile),
        }
    }
}

/// The admin connection cap: `configured`, but never more than a quarter of
/// the file-descriptor limit `nofile` (`None`: unlimited), and at least 1.
/// The other three quarters are the reserve for Redis, upstream sockets,
/// plugins and logs, so a full admin API cannot starve job traffic.
pub(crate) fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    let share = nofile.map_or(usize::MAX, |n| {
        usize::try_from(n / FD_SHARE).unwrap_or(usize::MAX)
    });
    configured.min(share).max(1)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit when it is lower, and
/// returns the soft limit in force afterwards (`None`: unlimited). A limit
/// that cannot be raised is kept (and logged).
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let raise = match (now.current, now.maximum) {
        (Some(soft), Some(hard)) => hard > soft,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if raise {
        let wanted = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, wanted) {
            tracing::warn!(error = %e, soft = ?now.current, hard = ?now.maximum, "could not raise the file-descriptor limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Serves `router` on `listener` with `limits` until `shutdown` resolves;
/// then accepts no more, asks every connection to finish its request and
/// waits for them to close.
pub(crate) async fn serve_with(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let conns = Arc::new(Conns::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = Builder::new(TokioExecutor::new());
    // The timeouts are ours (below): hyper's would also cut idle keep-alive
    // connections at the header timeout.
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE/ENFILE: wait for descriptors instead of spinning.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let Some(slot) = conns.admit() else {
            metrics::counter!("llmq_admin_connections_refused_total").increment(1);
            tracing::debug!("admin API: every connection is busy; closing a new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            router.clone(),
            builder.clone(),
            conns.clone(),
            slot,
            limits,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    conns.wait_closed().await;
    Ok(())
}

/// One connection, until it ends, is evicted, times out or the server stops.
async fn serve_connection(
    stream: TcpStream,
    router: axum::Router,
    builder: Arc<Builder<TokioExecutor>>,
    conns: Arc<Conns>,
    slot: Arc<Slot>,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let _open = Open {
        conns: conns.clone(),
        id: slot.id,
    };
    let io = TokioIo::new(Tracked {
        stream,
        slot: slot.clone(),
        conns: conns.clone(),
    });
    let service = {
        let slot = slot.clone();
        let conns = conns.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Busy::begin(&slot, &conns);
            let mut router = router.clone();
            async move {
                let resp = tower_service::Service::call(&mut router, req).await;
                drop(busy);
                resp
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "admin connection ended");
                }
                return;
            }
            () = slot.evict.notified() => {
                metrics::counter!("llmq_admin_connections_closed_total", "reason" => "evicted").increment(1);
                tracing::debug!("admin connection closed to make room (idle at the cap)");
                return;
            }
            reason = watchdog(&slot, &conns, limits) => {
                metrics::counter!("llmq_admin_connections_closed_total", "reason" => reason).increment(1);
                tracing::debug!(reason, "admin connection closed");
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Resolves when the connection must be closed: `"header_timeout"` when a
/// request head takes too long, `"idle_timeout"` after an idle spell.
/// Never while a request is in flight.
async fn watchdog(slot: &Slot, conns: &Conns, limits: ServerLimits) -> &'static str {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = conns.now_ms();
        let due = if slot.in_flight.load(Ordering::Acquire) > 0 {
            None
        } else {
            match slot.head_started_ms.load(Ordering::Acquire) {
                0 => Some((
                    slot.idle_since_ms
                        .load(Ordering::Acquire)
                        .saturating_add(ms(limits.idle_timeout)),
                    "idle_timeout",
                )),
                started => Some((
                    started.saturating_add(ms(limits.header_timeout)),
                    "header_timeout",
                )),
            }
        };
        match due {
            Some((at, reason)) if now >= at => return reason,
            Some((at, _)) => tokio::time::sleep(Duration::from_millis(at - now)).await,
            None => {
                tokio::time::sleep(limits.header_timeout.min(limits.idle_timeout)).await;
            }
        }
    }
}

/// The open admin connections.
struct Conns {
    cap: usize,
    /// Sockets alive, including evicted ones not closed yet.
    open: AtomicUsize,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    closed: Notify,
    epoch: Instant,
}

/// What the server knows about one connection. Times are
/// [`Conns::now_ms`] values; 0 means "none".
struct Slot {
    id: u64,
    /// Requests being handled (HTTP/2 may have several).
    in_flight: AtomicUsize,
    /// It has sent at least one complete request head.
    served: AtomicBool,
    /// When the head of the next request began (accept for a new connection,
    /// the first byte after an idle spell for a kept-alive one).
    head_started_ms: AtomicU64,
    /// When it last went idle or last moved a byte while idle.
    idle_since_ms: AtomicU64,
    /// Chosen to make room; it closes as soon as its task sees this.
    evicted: AtomicBool,
    evict: Notify,
}

impl Conns {
    fn new(cap: usize) -> Conns {
        Conns {
            cap: cap.max(1),
            open: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: Notify::new(),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the server started, plus one (0 means "none").
    fn now_ms(&self) -> u64 {
        crate::clock::ms_since(self.epoch)
    }

    /// Admits a new connection, evicting the longest-idle one at the cap;
    /// `None` when it must be closed at once.
    fn admit(&self) -> Option<Arc<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.open.load(Ordering::Acquire);
        if open >= self.cap {
            if open >= self.cap.saturating_add(EVICTION_SLACK) {
                return None;
            }
            // Never-served connections first, then the longest idle, then
            // the oldest.
            let victim = slots
                .values()
                .filter(|s| {
                    s.in_flight.load(Ordering::Acquire) == 0 && !s.evicted.load(Ordering::Acquire)
                })
                .min_by_key(|s| {
                    let active = s
                        .idle_since_ms
                        .load(Ordering::Acquire)
                        .max(s.head_started_ms.load(Ordering::Acquire));
                    (s.served.load(Ordering::Acquire), active, s.id)
                })?
                .clone();
            victim.evicted.store(true, Ordering::Release);
            victim.evict.notify_one();
        }
        let now = self.now_ms();
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            head_started_ms: AtomicU64::new(now),
            idle_since_ms: AtomicU64::new(now),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        slots.insert(slot.id, slot.clone());
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(slot)
    }

    fn release(&self, id: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&id);
        self.open.fetch_sub(1, Ordering::AcqRel);
        drop(slots);
        self.closed.notify_waiters();
    }

    async fn wait_closed(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// Frees a connection's place when its task ends.
struct Open {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.conns.release(self.id);
    }
}

/// A request in flight on a connection.
struct Busy {
    slot: Arc<Slot>,
    conns: Arc<Conns>,
}

impl Busy {
    fn begin(slot: &Arc<Slot>, conns: &Arc<Conns>) -> Busy {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        slot.served.store(true, Ordering::Release);
        slot.head_started_ms.store(0, Ordering::Release);
        Busy {
            slot: slot.clone(),
            conns: conns.clone(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot
            .idle_since_ms
            .store(self.conns.now_ms(), Ordering::Release);
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, noting when bytes move while no request is in flight: the
/// first byte read starts the header timeout, a byte written (a response
/// still being sent) restarts the idle timeout.
struct Tracked {
    stream: TcpStream,
    slot: Arc<Slot>,
    conns: Arc<Conns>,
}

impl Tracked {
    fn idle(&self) -> bool {
        self.slot.in_flight.load(Ordering::Acquire) == 0
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before && this.idle() {
            let _ = this.slot.head_started_ms.compare_exchange(
                0,
                this.conns.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) && this.idle() {
            this.slot
                .idle_since_ms
                .store(this.conns.now_ms(), Ordering::Release);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) && this.idle() {
            this.slot
                .idle_since_ms
                .store(this.conns.now_ms(), Ordering::Release);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_three_quarters_of_the_descriptors() {
        assert_eq!(connection_cap(256, Some(20_000)), 256);
        assert_eq!(connection_cap(100_000, Some(2048)), 512);
        assert_eq!(connection_cap(256, Some(1024)), 256);
        assert_eq!(connection_cap(256, Some(512)), 128);
        assert_eq!(connection_cap(256, Some(2)), 1);
        assert_eq!(connection_cap(256, None), 256);
        for nofile in [64u64, 1024, 4096, 65_536] {
            let cap = connection_cap(usize::MAX, Some(nofile)) as u64;
            assert!(nofile - cap >= nofile * 3 / 4, "{nofile}: {cap}");
        }
    }

    #[test]
    fn a_full_server_evicts_the_never_served_longest_idle_first() {
        let conns = Arc::new(Conns::new(3));
        let a = conns.admit().expect("room");
        let b = conns.admit().expect("room");
        let c = conns.admit().expect("room");
        // `a` served a request; `b` is older than `c`; neither sent one.
        drop(Busy::begin(&a, &conns));
        let d = conns.admit().expect("room by eviction");
        assert!(b.evicted.load(Ordering::Acquire));
        assert!(!a.evicted.load(Ordering::Acquire));
        assert!(!c.evicted.load(Ordering::Acquire));
        // A busy connection is never evicted; evicted ones are not chosen twice.
        let _busy = [&a, &c, &d].map(|s| Busy::begin(s, &conns));
        assert!(conns.admit().is_none(), "every other connection is busy");
        conns.release(b.id);
        assert_eq!(conns.open.load(Ordering::Acquire), 3);
    }
}
