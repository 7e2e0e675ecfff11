//! Admission: accepting TCP connections on a port, capping them per port and
//! per source address, and completing TLS handshakes within a bounded time.
//!
//! A connection over a cap is closed at once rather than left waiting in the
//! kernel's backlog: the caller learns immediately, and no silent socket holds
//! a place in the queue that legitimate callers stand in.
//!
//! When the port's handshakes are all taken, a newcomer (within its source's
//! cap) takes the place of the oldest handshake in progress, which is closed:
//! a real client finishes its handshake in a round trip or two, so the oldest
//! is almost always a socket that sends nothing, and sockets held open from
//! many source addresses cannot shut the door for the handshake timeout.
//! Likewise, when the port's connections are all taken, the oldest one
//! without a call in progress (in its handshake, or idle) is closed for the
//! newcomer, gracefully (a client reconnects on GOAWAY); only when every
//! connection has a call in progress is the newcomer refused.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::{
    EdgeLimits,
    conn::{self, Protocols},
};

/// Open connections and handshakes of one port, in all and per source.
#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    by_source: HashMap<IpAddr, (usize, usize)>,
    /// Places held, oldest first: connections, and handshakes in progress.
    open: VecDeque<Slot>,
    shaking: VecDeque<Slot>,
    next_id: u64,
}

/// A place held, and the signal that ends its holder early when a newer
/// connection takes it.
#[derive(Debug)]
struct Slot {
    id: u64,
    source: IpAddr,
    evict: Arc<Notify>,
    activity: Arc<conn::Activity>,
}

impl Counts {
    fn slots(&mut self, place: Place) -> &mut VecDeque<Slot> {
        match place {
            Place::Connection => &mut self.open,
            Place::Handshake => &mut self.shaking,
        }
    }

    /// Gives back one place of `place` held by `source`.
    fn release(&mut self, source: IpAddr, place: Place) {
        match place {
            Place::Connection => self.connections -= 1,
            Place::Handshake => self.handshakes -= 1,
        }
        if let Some(entry) = self.by_source.get_mut(&source) {
            match place {
                Place::Connection => entry.0 -= 1,
                Place::Handshake => entry.1 -= 1,
            }
            if *entry == (0, 0) {
                self.by_source.remove(&source);
            }
        }
    }

    /// Frees a place on a full port for a newcomer: the oldest handshake in
    /// progress, or the oldest connection without a call in progress (in its
    /// handshake or idle). Its holder is told to close; its place is given
    /// back now. `false` if every connection has a call in progress.
    fn evict_oldest(&mut self, place: Place) -> bool {
        let slots = self.slots(place);
        let at = match place {
            Place::Handshake => (!slots.is_empty()).then_some(0),
            Place::Connection => slots.iter().position(|s| !s.activity.busy()),
        };
        let Some(oldest) = at.and_then(|at| slots.remove(at)) else {
            return false;
        };
        oldest.evict.notify_one();
        self.release(oldest.source, place);
        true
    }
}

/// What a port lets in; places are given back when their guards drop.
#[derive(Debug)]
struct Admission {
    limits: EdgeLimits,
    counts: Mutex<Counts>,
}

#[derive(Debug, Clone, Copy)]
enum Place {
    Connection,
    Handshake,
}

/// A place taken in [`Admission`], given back on drop (or when a newer
/// connection takes it, which [`Held::evicted`] tells).
#[derive(Debug)]
struct Held {
    admission: Arc<Admission>,
    source: IpAddr,
    place: Place,
    id: u64,
    evict: Arc<Notify>,
    activity: Arc<conn::Activity>,
}

impl Held {
    /// Resolves when a newer connection has taken this place.
    async fn evicted(&self) {
        self.evict.notified().await
    }
}

/// A place given, and whether an older holder was evicted for it.
#[derive(Debug)]
struct Taken {
    held: Held,
    evicted: bool,
}

impl Admission {
    /// A place of `place` for a connection from `source`: refused if the
    /// source holds its cap; on a full port, an older holder gives way (see
    /// [`Counts::evict_oldest`]), else the newcomer is refused.
    fn take(self: &Arc<Self>, source: IpAddr, place: Place) -> Option<Taken> {
        self.take_for(source, place, Arc::default())
    }

    /// As [`Self::take`], for a connection whose calls `activity` counts.
    fn take_for(
        self: &Arc<Self>,
        source: IpAddr,
        place: Place,
        activity: Arc<conn::Activity>,
    ) -> Option<Taken> {
        let (cap, per_source) = match place {
            Place::Connection => (
                self.limits.max_connections,
                self.limits.max_connections_per_source,
            ),
            Place::Handshake => (
                self.limits.max_handshakes,
                self.limits.max_handshakes_per_source,
            ),
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let total = match place {
            Place::Connection => counts.connections,
            Place::Handshake => counts.handshakes,
        };
        let (connections, handshakes) = counts.by_source.get(&source).copied().unwrap_or_default();
        let mine = match place {
            Place::Connection => connections,
            Place::Handshake => handshakes,
        };
        if mine >= per_source {
            return None;
        }
        let evicted = total >= cap;
        if evicted && !counts.evict_oldest(place) {
            return None;
        }
        let entry = counts.by_source.entry(source).or_default();
        match place {
            Place::Connection => entry.0 += 1,
            Place::Handshake => entry.1 += 1,
        }
        match place {
            Place::Connection => counts.connections += 1,
            Place::Handshake => counts.handshakes += 1,
        }
        let id = counts.next_id;
        counts.next_id += 1;
        let evict = Arc::new(Notify::new());
        counts.slots(place).push_back(Slot {
            id,
            source,
            evict: evict.clone(),
            activity: activity.clone(),
        });
        Some(Taken {
            held: Held {
                admission: self.clone(),
                source,
                place,
                id,
                evict,
                activity,
            },
            evicted,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let slots = counts.slots(self.place);
        // Not found: evicted, and its place was given back then.
        if let Some(at) = slots.iter().position(|s| s.id == self.id) {
            slots.remove(at);
            counts.release(self.source, self.place);
        }
    }
}

/// Logs at most one line per `EVERY` for a kind of event, with how many
/// happened since the last line.
#[derive(Debug)]
struct Sampled {
    what: &'static str,
    last: Option<tokio::time::Instant>,
    since: u64,
}

impl Sampled {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(what: &'static str) -> Self {
        Self {
            what,
            last: None,
            since: 0,
        }
    }

    fn note(&mut self, port: SocketAddr, source: IpAddr) {
        self.since += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_none_or(|l| now.duration_since(l) >= Self::EVERY)
        {
            tracing::warn!(%port, %source, count = self.since, "{}", self.what);
            self.last = Some(now);
            self.since = 0;
        }
    }
}

/// Serves `service` on `listener` over HTTP/2 until `stop` turns true: with
/// TLS when `tls` is given (plaintext only for a development client port),
/// under `limits`. Returns once the listener is closed and every connection
/// has ended, which takes at most the drain timeout after `stop`.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: EdgeLimits,
    stop: watch::Receiver<bool>,
) where
    S: conn::PortService,
{
    serve_as(listener, tls, service, limits, stop, Protocols::Http2).await;
}

/// Like [`serve`], for a web endpoint that any HTTP client and mirror must
/// reach: HTTP/1.1 as well as HTTP/2, with a header read timeout of the
/// handshake timeout on HTTP/1.1.
pub async fn serve_web<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: EdgeLimits,
    stop: watch::Receiver<bool>,
) where
    S: conn::PortService,
{
    serve_as(listener, tls, service, limits, stop, Protocols::Http1And2).await;
}

async fn serve_as<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: EdgeLimits,
    mut stop: watch::Receiver<bool>,
    protocols: Protocols,
) where
    S: conn::PortService,
{
    let port = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admission = Arc::new(Admission {
        limits: limits.clone(),
        counts: Mutex::default(),
    });
    let settings = Arc::new(conn::Settings { limits, protocols });
    let mut over_connections =
        Sampled::new("connections refused: the port's or the source's cap is reached");
    let mut over_handshakes =
        Sampled::new("connections refused: the source's TLS handshakes in progress are capped");
    let mut evicted_handshakes = Sampled::new(
        "TLS handshakes closed early: the port's cap is reached and newer connections took their places",
    );
    let mut evicted_connections = Sampled::new(
        "idle connections closed early: the port's cap is reached and newer connections took their places",
    );
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a transient error: the reserve keeps the
                // server's own files open; wait for connections to close.
                tracing::warn!(%port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = remote.ip();
        let Some(taken) = admission.take(source, Place::Connection) else {
            over_connections.note(port, source);
            continue;
        };
        if taken.evicted {
            evicted_connections.note(port, source);
        }
        let place = taken.held;
        let _ = tcp.set_nodelay(true);
        let info = tcp.connect_info();
        let (service, settings, mut stop) = (service.clone(), settings.clone(), stop.clone());
        match &tls {
            None => {
                connections.spawn(async move {
                    let activity = place.activity.clone();
                    let evicted = place.evicted();
                    conn::serve(tcp, info, service, &settings, stop, activity, evicted).await;
                    drop(place);
                });
            }
            Some(acceptor) => {
                let Some(taken) = admission.take(source, Place::Handshake) else {
                    over_handshakes.note(port, source);
                    continue;
                };
                if taken.evicted {
                    evicted_handshakes.note(port, source);
                }
                let handshake = taken.held;
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let timeout = settings.limits.handshake_timeout();
                    let tls = tokio::select! {
                        r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
                        _ = handshake.evicted() => {
                            tracing::debug!(%remote, "TLS handshake evicted by a newer one");
                            return;
                        }
                        _ = place.evicted() => {
                            tracing::debug!(%remote, "connection in its handshake evicted by a newer one");
                            return;
                        }
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    drop(handshake);
                    let tls = match tls {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let info = tls.connect_info();
                    let activity = place.activity.clone();
                    let evicted = place.evicted();
                    conn::serve(tls, info, service, &settings, stop, activity, evicted).await;
                    drop(place);
                });
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(conns: usize, per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            limits: EdgeLimits {
                max_connections: conns,
                max_connections_per_source: per_source,
                ..EdgeLimits::default()
            },
            counts: Mutex::default(),
        })
    }

    #[test]
    fn places_are_capped_per_source_and_per_port_and_given_back() {
        let a = admission(3, 2);
        let (x, y): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        // Every connection has a call in progress, so none gives way.
        let x1 = a.take(x, Place::Connection).expect("first");
        let _c1 = x1.held.activity.begin();
        let x2 = a.take(x, Place::Connection).expect("second");
        let _c2 = x2.held.activity.begin();
        assert!(a.take(x, Place::Connection).is_none(), "per source");
        let y1 = a.take(y, Place::Connection).expect("another source");
        let _c3 = y1.held.activity.begin();
        assert!(a.take(y, Place::Connection).is_none(), "per port");
        drop(x1);
        let again = a.take(y, Place::Connection).expect("given back");
        assert!(!again.evicted);
    }

    #[test]
    fn a_full_port_evicts_its_oldest_handshake_for_a_newcomer() {
        let a = Arc::new(Admission {
            limits: EdgeLimits {
                max_handshakes: 2,
                max_handshakes_per_source: 2,
                ..EdgeLimits::default()
            },
            counts: Mutex::default(),
        });
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            [10, 0, 0, 3].into(),
        );
        let oldest = a.take(x, Place::Handshake).expect("first");
        let second = a.take(x, Place::Handshake).expect("second");
        assert!(!oldest.evicted && !second.evicted);
        assert!(a.take(x, Place::Handshake).is_none(), "per source");
        let newcomer = a.take(y, Place::Handshake).expect("a newcomer");
        assert!(newcomer.evicted, "the oldest gave way");
        let evict = oldest.held.evict.clone();
        assert!(
            futures_util::FutureExt::now_or_never(evict.notified()).is_some(),
            "the oldest handshake was told"
        );
        assert_eq!(a.counts.lock().expect("lock").handshakes, 2);
        // The evicted handshake's place was given back when it was evicted.
        drop(oldest);
        assert_eq!(a.counts.lock().expect("lock").handshakes, 2);
        let again = a.take(z, Place::Handshake).expect("another newcomer");
        assert!(again.evicted, "the second is now the oldest");
        drop((second, newcomer, again));
        let counts = a.counts.lock().expect("lock");
        assert_eq!((counts.handshakes, counts.shaking.len()), (0, 0));
        assert!(counts.by_source.is_empty());
    }

    #[test]
    fn a_full_port_evicts_its_oldest_connection_without_a_call() {
        let a = admission(2, 2);
        let (x, y): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let busy = a.take(x, Place::Connection).expect("first");
        let _call = busy.held.activity.begin();
        let idle = a.take(x, Place::Connection).expect("second");
        let newcomer = a.take(y, Place::Connection).expect("a newcomer");
        assert!(newcomer.evicted, "a connection gave way");
        assert!(
            futures_util::FutureExt::now_or_never(idle.held.evicted()).is_some(),
            "the idle one, not the older busy one"
        );
        let _newcomer_call = newcomer.held.activity.begin();
        assert!(
            a.take(y, Place::Connection).is_none(),
            "refused when every connection has a call in progress"
        );
        drop((busy, idle, newcomer));
        let counts = a.counts.lock().expect("lock");
        assert_eq!((counts.connections, counts.open.len()), (0, 0));
        assert!(counts.by_source.is_empty());
    }

    #[test]
    fn sources_without_places_are_forgotten() {
        let a = admission(10, 1);
        let x: IpAddr = [10, 0, 0, 1].into();
        let held = a.take(x, Place::Connection).expect("place");
        assert!(a.take(x, Place::Connection).is_none());
        drop(held);
        assert!(a.counts.lock().expect("lock").by_source.is_empty());
    }
}
