//! Admission: accepting TCP connections on a port, capping them per port and
//! per source address, and completing TLS handshakes within a bounded time.
//!
//! A connection over a cap is closed at once rather than left waiting in the
//! kernel's backlog: the caller learns immediately, and no silent socket holds
//! a place in the queue that legitimate callers stand in.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::{EdgeLimits, conn};

/// Open connections and handshakes of one port, in all and per source.
#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    by_source: HashMap<IpAddr, (usize, usize)>,
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
}

impl Admission {
    fn take(self: &Arc<Self>, source: IpAddr, place: Place) -> Option<Held> {
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
        let entry = counts.by_source.entry(source).or_default();
        let mine = match place {
            Place::Connection => &mut entry.0,
            Place::Handshake => &mut entry.1,
        };
        if total >= cap || *mine >= per_source {
            if *entry == (0, 0) {
                counts.by_source.remove(&source);
            }
            return None;
        }
        *mine += 1;
        match place {
            Place::Connection => counts.connections += 1,
            Place::Handshake => counts.handshakes += 1,
        }
        Some(Held {
            admission: self.clone(),
            source,
            place,
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
        match self.place {
            Place::Connection => counts.connections -= 1,
            Place::Handshake => counts.handshakes -= 1,
        }
        if let Some(entry) = counts.by_source.get_mut(&self.source) {
            match self.place {
                Place::Connection => entry.0 -= 1,
                Place::Handshake => entry.1 -= 1,
            }
            if *entry == (0, 0) {
                counts.by_source.remove(&self.source);
            }
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
        Sampled::new("connections refused: too many TLS handshakes in progress");
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
        let Some(place) = admission.take(source, Place::Connection) else {
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
                let Some(handshake) = admission.take(source, Place::Handshake) else {
                    over_handshakes.note(port, source);
                    continue;
                };
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let timeout = limits.handshake_timeout();
                    let tls = tokio::select! {
                        r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
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
    fn sources_without_places_are_forgotten() {
        let a = admission(10, 1);
        let x: IpAddr = [10, 0, 0, 1].into();
        let held = a.take(x, Place::Connection).expect("place");
        assert!(a.take(x, Place::Connection).is_none());
        drop(held);
        assert!(a.counts.lock().expect("lock").by_source.is_empty());
    }
}
