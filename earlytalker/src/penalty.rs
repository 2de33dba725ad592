//! The penalty box's bookkeeping (`--penalty N/WINDOW:TTL`): the agent counts
//! each address's early talks within WINDOW; at N it writes the address to the
//! kernel's PENALTY map with its expiry, and the XDP program refuses its SYNs
//! until then (it compares the time itself, so the expiry is exact). Expired
//! entries are deleted on the agent's tick. Bounded: at most MAX_ADDRESSES
//! addresses are remembered (the stalest forgotten first).

use crate::{config::Penalty, loader::mapped};
use aya::maps::{HashMap, MapData};
use std::{
    collections::{HashMap as StdMap, VecDeque},
    net::IpAddr,
};

const MAX_ADDRESSES: usize = 65_536;

pub struct PenaltyBox {
    rule: Penalty,
    /// Times (CLOCK_MONOTONIC ns) of each address's recent early talks.
    recent: StdMap<IpAddr, VecDeque<u64>>,
    /// Addresses in the box, until when.
    boxed: StdMap<IpAddr, u64>,
    /// The kernel's PENALTY map; None in unit tests.
    map: Option<HashMap<MapData, [u8; 16], u64>>,
}

impl PenaltyBox {
    pub fn new(rule: Penalty, map: Option<HashMap<MapData, [u8; 16], u64>>) -> Self {
        PenaltyBox {
            rule,
            recent: StdMap::new(),
            boxed: StdMap::new(),
            map,
        }
    }

    /// An early talk from `addr`; Some(expiry) if that put it in the box.
    pub fn offend(&mut self, addr: IpAddr, now_ns: u64) -> Option<u64> {
        let window = u64::try_from(self.rule.window.as_nanos()).unwrap_or(u64::MAX);
        if self.recent.len() >= MAX_ADDRESSES && !self.recent.contains_key(&addr) {
            self.forget_stalest();
        }
        let times = self.recent.entry(addr).or_default();
        times.push_back(now_ns);
        while times
            .front()
            .is_some_and(|t| now_ns.saturating_sub(*t) > window)
        {
            times.pop_front();
        }
        if times.len() < self.rule.n as usize {
            return None;
        }
        self.recent.remove(&addr);
        let ttl = u64::try_from(self.rule.ttl.as_nanos()).unwrap_or(u64::MAX);
        let until = now_ns.saturating_add(ttl);
        if let Some(m) = &mut self.map {
            if let Err(e) = m.insert(mapped(addr), until, 0) {
                log::error!("penalty box: cannot add {addr}: {e}");
                return None;
            }
        }
        self.boxed.insert(addr, until);
        Some(until)
    }

    /// Deletes the entries whose time is up (the kernel already ignores them).
    pub fn expire(&mut self, now_ns: u64) {
        let done: Vec<IpAddr> = self
            .boxed
            .iter()
            .filter(|(_, until)| **until <= now_ns)
            .map(|(a, _)| *a)
            .collect();
        for a in done {
            self.boxed.remove(&a);
            if let Some(m) = &mut self.map {
                let _ = m.remove(&mapped(a));
            }
        }
    }

    /// Addresses in the box now.
    pub fn len(&self) -> usize {
        self.boxed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.boxed.is_empty()
    }

    fn forget_stalest(&mut self) {
        let stalest = self
            .recent
            .iter()
            .min_by_key(|(_, t)| t.back().copied().unwrap_or(0))
            .map(|(a, _)| *a);
        if let Some(a) = stalest {
            self.recent.remove(&a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    #[test]
    fn n_talks_within_the_window_box_an_address_for_the_ttl() {
        let rule = Penalty {
            n: 3,
            window: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
        };
        let mut b = PenaltyBox::new(rule, None);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(b.offend(a, 0), None);
        assert_eq!(b.offend(a, 5 * S), None);
        // The first talk is out of the window by now: still two.
        assert_eq!(b.offend(a, 11 * S), None);
        assert_eq!(b.offend(other, 11 * S), None);
        assert_eq!(b.offend(a, 12 * S), Some(72 * S));
        assert_eq!(b.len(), 1);
        b.expire(71 * S);
        assert_eq!(b.len(), 1);
        b.expire(72 * S);
        assert!(b.is_empty());
    }
}
