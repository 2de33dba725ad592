//! PROXY protocol ports (`--proxy-protocol`): behind a balancer, the kernel
//! hands over the header it found at the start of the client's bytes, and the
//! agent reads from it who the client really is (v1 or v2, with the `ppp`
//! crate). From then on that address is the one logged, looked up in the
//! allowlist and pass cache, published to the fleet and given to the MTA's
//! policy and milter lookups.

use earlytalker_common::ConnKey;
use foldhash::HashMap;
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// What a header says.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    /// The real client.
    Client(SocketAddr),
    /// LOCAL (v2) or UNKNOWN (v1): the balancer speaks for itself (a health
    /// check, say), so its own address stands.
    Balancer,
}

/// Reads a whole header; Err names what is wrong with it.
pub fn parse(header: &[u8]) -> Result<Said, String> {
    use ppp::{v1, v2, HeaderResult};
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => {
                Said::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            v1::Addresses::Tcp6(a) => {
                Said::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            v1::Addresses::Unknown => Said::Balancer,
        }),
        HeaderResult::V2(Ok(h)) => {
            if h.command == v2::Command::Local {
                return Ok(Said::Balancer);
            }
            Ok(match h.addresses {
                v2::Addresses::IPv4(a) => {
                    Said::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v2::Addresses::IPv6(a) => {
                    Said::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v2::Addresses::Unix(_) | v2::Addresses::Unspecified => Said::Balancer,
            })
        }
        HeaderResult::V1(Err(e)) => Err(format!("PROXY v1: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("PROXY v2: {e}")),
    }
}

/// Connections behind a balancer and their real clients, until the
/// connection's verdict (or its close, for an early talker the MTA may still
/// ask about). Bounded: entries older than MAX_AGE go at the next sweep, and a
/// full table takes no more (those clients are then known by the balancer's
/// address, and said so once).
pub struct Table {
    map: HashMap<ConnKey, Entry>,
    cap: usize,
    full_said: bool,
}

struct Entry {
    client: SocketAddr,
    since: Instant,
    /// Let through at the header: the real client is allowlisted or passed.
    known: bool,
}

const MAX_AGE: Duration = Duration::from_secs(3600);

impl Table {
    pub fn new(cap: usize) -> Self {
        Table {
            map: HashMap::default(),
            cap,
            full_said: false,
        }
    }

    pub fn insert(&mut self, key: ConnKey, client: SocketAddr, known: bool) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            if !self.full_said {
                self.full_said = true;
                log::warn!(
                    "{} connections behind a balancer await their verdict: further ones are logged with the balancer's address (said once)",
                    self.cap
                );
            }
            return;
        }
        self.map.insert(
            key,
            Entry {
                client,
                since: Instant::now(),
                known,
            },
        );
    }

    /// The real client of `key`, if it came through a balancer.
    pub fn client(&self, key: &ConnKey) -> Option<SocketAddr> {
        self.map.get(key).map(|e| e.client)
    }

    /// Whether `key`'s real client was let through at the header.
    pub fn known(&self, key: &ConnKey) -> bool {
        self.map.get(key).is_some_and(|e| e.known)
    }

    pub fn remove(&mut self, key: &ConnKey) {
        if !self.map.is_empty() {
            self.map.remove(key);
        }
    }

    pub fn sweep(&mut self, now: Instant) {
        self.map
            .retain(|_, e| now.saturating_duration_since(e.since) < MAX_AGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_headers_name_the_real_client() {
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n"),
            Ok(Said::Client("192.0.2.7:40000".parse().unwrap()))
        );
        assert_eq!(
            parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n"),
            Ok(Said::Client("[2001:db8::7]:40000".parse().unwrap()))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Said::Balancer));
        let mut v2 = earlytalker_common::PROXY_V2_SIG.to_vec();
        // PROXY command, TCP over IPv4, 12 address bytes.
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 9, 10, 0, 0, 1, 0x9c, 0x40, 0, 25,
        ]);
        assert_eq!(
            parse(&v2),
            Ok(Said::Client("192.0.2.9:40000".parse().unwrap()))
        );
        // LOCAL: the balancer's own connection.
        v2[12] = 0x20;
        assert_eq!(parse(&v2), Ok(Said::Balancer));
        assert!(parse(b"PROXY TCP4 nonsense\r\n").is_err());
        assert!(parse(b"EHLO bot\r\n").is_err());
    }
}
