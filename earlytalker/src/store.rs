//! Verdicts the MTA may ask about later (defer-reject): which client address:port
//! talked early, and what it should get. An entry lives as long as its connection
//! (the kernel reports the close) plus a short grace, and never longer than
//! MAX_AGE in case the close was missed.

use crate::config::Action;
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Bound for connections whose close was never seen (e.g. evicted from the LRU).
pub const MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub server: SocketAddr,
    /// The action configured when the verdict was made.
    pub action: Action,
    pub defer_reject: bool,
    pub bytes: u32,
    created: Instant,
    closed: Option<Instant>,
}

pub struct Store {
    map: HashMap<SocketAddr, Entry>,
    limit: usize,
    /// After the connection closes, the MTA may still be finishing its
    /// transaction (`--close-grace`, 30 s).
    close_grace: Duration,
}

impl Store {
    pub fn new(limit: usize, close_grace: Duration) -> Self {
        Store {
            map: HashMap::new(),
            limit,
            close_grace,
        }
    }

    pub fn insert(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        action: Action,
        defer_reject: bool,
        bytes: u32,
        now: Instant,
    ) {
        if self.map.len() >= self.limit && !self.map.contains_key(&client) {
            self.expire(now);
            if self.map.len() >= self.limit {
                // Full of live entries: the oldest goes (bounded memory).
                if let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.created)
                    .map(|(k, _)| *k)
                {
                    self.map.remove(&oldest);
                }
            }
        }
        self.map.insert(
            client,
            Entry {
                server,
                action,
                defer_reject,
                bytes,
                created: now,
                closed: None,
            },
        );
    }

    pub fn update_bytes(&mut self, client: &SocketAddr, bytes: u32) {
        if let Some(e) = self.map.get_mut(client) {
            e.bytes = e.bytes.max(bytes);
        }
    }

    pub fn closed(&mut self, client: &SocketAddr, now: Instant) {
        if let Some(e) = self.map.get_mut(client) {
            e.closed.get_or_insert(now);
        }
    }

    pub fn lookup(&self, client: &SocketAddr, now: Instant) -> Option<&Entry> {
        self.map.get(client).filter(|e| self.live_at(e, now))
    }

    pub fn expire(&mut self, now: Instant) {
        let grace = self.close_grace;
        self.map.retain(|_, e| live(e, now, grace));
    }

    fn live_at(&self, e: &Entry, now: Instant) -> bool {
        live(e, now, self.close_grace)
    }

    /// Entries held (expired ones go at the next `expire`).
    pub fn live(&self) -> usize {
        self.map.len()
    }
}

fn live(e: &Entry, now: Instant, close_grace: Duration) -> bool {
    now.duration_since(e.created) < MAX_AGE
        && e.closed.is_none_or(|c| now.duration_since(c) < close_grace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], p))
    }

    #[test]
    fn lives_until_close_plus_grace() {
        let t0 = Instant::now();
        let mut s = Store::new(10, crate::config::CLOSE_GRACE);
        s.insert(a(1), a(25), Action::Deny, true, 10, t0);
        assert!(s.lookup(&a(1), t0 + Duration::from_secs(600)).is_some());
        assert!(s.lookup(&a(2), t0).is_none());
        s.closed(&a(1), t0 + Duration::from_secs(600));
        assert!(s.lookup(&a(1), t0 + Duration::from_secs(629)).is_some());
        assert!(s.lookup(&a(1), t0 + Duration::from_secs(631)).is_none());
        assert!(s.lookup(&a(1), t0 + MAX_AGE).is_none());
    }

    #[test]
    fn bounded() {
        let t0 = Instant::now();
        let mut s = Store::new(3, crate::config::CLOSE_GRACE);
        for p in 0..10 {
            s.insert(
                a(p),
                a(25),
                Action::Deny,
                true,
                1,
                t0 + Duration::from_millis(u64::from(p)),
            );
        }
        assert_eq!(s.live(), 3);
        // The newest survive.
        assert!(s.lookup(&a(9), t0 + Duration::from_secs(1)).is_some());
        assert!(s.lookup(&a(0), t0 + Duration::from_secs(1)).is_none());
    }
}
