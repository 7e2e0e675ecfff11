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

use super::{EdgeLimits, conn};

/// Open connections and handshakes of one port, in all and per source.
#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    by_source: HashMap<IpAddr, (usize, usize)>,
    /// Handshakes in progress, oldest first.
    pending: VecDeque<Pending>,
    next_handshake: u64,
}

/// A handshake in progress, and the signal that ends it early when a newer
/// one takes its place.
#[derive(Debug)]
struct Pending {
    id: u64,
    source: IpAddr,
    evict: Arc<Notify>,
}

impl Counts {
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

/// A place taken in [`Admission`], given back on drop.
#[derive(Debug)]
struct Held {
    admission: Arc<Admission>,
    source: IpAddr,
    place: Place,
    /// For a handshake: its entry in [`Counts::pending`] and the signal that
    /// it was evicted (its place is then already given back).
    handshake: Option<(u64, Arc<Notify>)>,
}

impl Held {
    /// Resolves when a newer handshake has taken this one's place (never for
    /// a connection).
    async fn evicted(&self) {
        match &self.handshake {
            Some((_, evict)) => evict.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// A place given, and whether the oldest handshake was evicted for it.
#[derive(Debug)]
struct Taken {
    held: Held,
    evicted: bool,
}

impl Admission {
    fn take(self: &Arc<Self>, source: IpAddr, place: Place) -> Option<Taken> {
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
        let full = total >= cap;
        if mine >= per_source || (full && matches!(place, Place::Connection)) {
            return None;
        }
        let evicted = if full {
            // The port's handshakes are all taken: the oldest gives way.
            let oldest = counts.pending.pop_front()?;
            counts.release(oldest.source, Place::Handshake);
            oldest.evict.notify_one();
            true
        } else {
            false
        };
        let entry = counts.by_source.entry(source).or_default();
        match place {
            Place::Connection => entry.0 += 1,
            Place::Handshake => entry.1 += 1,
        }
        let handshake = match place {
            Place::Connection => {
                counts.connections += 1;
                None
            }
            Place::Handshake => {
                counts.handshakes += 1;
                let id = counts.next_handshake;
                counts.next_handshake += 1;
                let evict = Arc::new(Notify::new());
                counts.pending.push_back(Pending {
                    id,
                    source,
                    evict: evict.clone(),
                });
                Some((id, evict))
            }
        };
        Some(Taken {
            held: Held {
                admission: self.clone(),
                source,
                place,
                handshake,
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
        if let Some((id, _)) = &self.handshake {
            match counts.pending.iter().position(|p| p.id == *id) {
                Some(at) => {
                    counts.pending.remove(at);
                }
                // Evicted: its place was given back then.
                None => return,
            }
        }
        counts.release(self.source, self.place);
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

/// Serves `service` on `listener` until `stop` turns true: with TLS when
/// `tls` is given (plaintext only for a development client port), under
/// `limits`. Returns once the listener is closed and every connection has
/// ended, which takes at most the drain timeout after `stop`.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: EdgeLimits,
    mut stop: watch::Receiver<bool>,
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
    let limits = Arc::new(limits);
    let mut over_connections =
        Sampled::new("connections refused: the port's or the source's cap is reached");
    let mut over_handshakes =
        Sampled::new("connections refused: the source's TLS handshakes in progress are capped");
    let mut evictions = Sampled::new(
        "TLS handshakes closed early: the port's cap is reached and newer connections took their places",
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
        let Some(Taken { held: place, .. }) = admission.take(source, Place::Connection) else {
            over_connections.note(port, source);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let info = tcp.connect_info();
        let (service, limits, mut stop) = (service.clone(), limits.clone(), stop.clone());
        match &tls {
            None => {
                connections.spawn(async move {
                    conn::serve(tcp, info, service, &limits, stop).await;
                    drop(place);
                });
            }
            Some(acceptor) => {
                let Some(taken) = admission.take(source, Place::Handshake) else {
                    over_handshakes.note(port, source);
                    continue;
                };
                if taken.evicted {
                    evictions.note(port, source);
                }
                let handshake = taken.held;
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let timeout = limits.handshake_timeout();
                    let tls = tokio::select! {
                        r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
                        _ = handshake.evicted() => {
                            tracing::debug!(%remote, "TLS handshake evicted by a newer one");
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
                    conn::serve(tls, info, service, &limits, stop).await;
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
        let x1 = a.take(x, Place::Connection).expect("first");
        let _x2 = a.take(x, Place::Connection).expect("second");
        assert!(a.take(x, Place::Connection).is_none(), "per source");
        let _y1 = a.take(y, Place::Connection).expect("another source");
        assert!(a.take(y, Place::Connection).is_none(), "per port");
        drop(x1);
        assert!(a.take(y, Place::Connection).is_some(), "given back");
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
        let evict = oldest.held.handshake.clone().expect("a handshake").1;
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
        assert_eq!((counts.handshakes, counts.pending.len()), (0, 0));
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
