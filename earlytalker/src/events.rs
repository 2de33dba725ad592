//! Turning kernel records into verdicts, and remembering early talkers until their
//! verdict arrives (or until it is clear that no greeting is coming).

use crate::config::Taken;
use earlytalker_common::{
    Conn, ConnFlags, ConnKey, Event, EventKind, ProxyRecord, Reason, Unknown, PAYLOAD_MAX,
    PROXY_MAX,
};
// foldhash: keyed per process (addresses and ports are the client's choice) and
// several times faster than SipHash on these small keys, looked up per connection.
use foldhash::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client payload arrived before the greeting.
    EarlyTalker,
    /// The greeting left first.
    Pass,
    /// The connection ended before any greeting and the client said nothing.
    Hangup,
    /// Talked first, but as Exim's early pipelining does: a client that passed
    /// before, opening with EHLO, while PIPECONNECT is allowed.
    Pipeconnect,
}

/// How the connection's pre-greeting phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Greeting,
    ClientReset,
    ServerClose,
    ServerReset,
    /// The client closed while held: the MTA never saw it.
    ClientClose,
    /// The agent gave up waiting for a greeting.
    NoGreeting,
    /// Enforced: the client got our reply instead of the greeting.
    Denied,
    /// On a PROXY protocol port, no PROXY header came first: dropped.
    BadProxyHeader,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Greeting => "greeting",
            End::ClientReset => "client_reset",
            End::ServerClose => "server_close",
            End::ServerReset => "server_reset",
            End::ClientClose => "client_close",
            End::NoGreeting => "no_greeting",
            End::Denied => "denied",
            End::BadProxyHeader => "bad_proxy_header",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: Kind,
    pub end: End,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Client payload bytes before the greeting.
    pub bytes: u32,
    /// First client byte, after the handshake.
    pub after_ms: Option<f64>,
    /// Greeting released, after the handshake.
    pub greeting_after_ms: Option<f64>,
    pub payload: Vec<u8>,
    /// What was done to an early talker.
    pub action: Taken,
    /// A pass that went through a real hold (not one let by the pass cache):
    /// the kernel recorded it in the pass cache, if that is on.
    pub earned_pass: bool,
    /// The connection (its client is the balancer's address behind a PROXY
    /// protocol port; `client` is then set to the real client's).
    pub key: ConnKey,
}

fn addr(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn client_of(key: &ConnKey) -> SocketAddr {
    SocketAddr::new(addr(key.client_addr), key.client_port)
}

pub fn server_of(key: &ConnKey) -> SocketAddr {
    SocketAddr::new(addr(key.server_addr), key.server_port)
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    // Rounded to microseconds: enough for a log, stable in JSON.
    (to_ns.saturating_sub(from_ns) / 1_000) as f64 / 1_000.0
}

/// Builds the verdict for a connection snapshot ending for `end` at `now_ns`.
pub fn verdict(key: &ConnKey, conn: &Conn, end: End, now_ns: u64, action: Taken) -> Verdict {
    let early = conn.has(ConnFlags::EARLY);
    let kind = match (early, end) {
        (true, _) if conn.has(ConnFlags::PIPECONNECT) => Kind::Pipeconnect,
        (true, _) => Kind::EarlyTalker,
        (false, End::Greeting) => Kind::Pass,
        (false, _) => Kind::Hangup,
    };
    let len = (conn.payload_len as usize).min(PAYLOAD_MAX);
    Verdict {
        kind,
        end,
        client: client_of(key),
        server: server_of(key),
        bytes: if early { conn.early_bytes() } else { 0 },
        after_ms: early.then(|| ms_between(conn.established_ns, conn.first_ns)),
        greeting_after_ms: (end == End::Greeting).then(|| ms_between(conn.established_ns, now_ns)),
        payload: conn.payload[..len].to_vec(),
        action,
        earned_pass: kind == Kind::Pass && !conn.has(ConnFlags::PASS_CACHED),
        key: *key,
    }
}

/// One ring-buffer record, its numbers checked.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub kind: EventKind,
    pub reason: Reason,
    pub now_ns: u64,
    pub key: ConnKey,
    pub conn: Conn,
}

/// Why a ring-buffer record could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DecodeError {
    #[error("a kernel record of {0} bytes is shorter than an event")]
    Short(usize),
    #[error("a kernel record has an {0}")]
    Unknown(Unknown),
    #[error("a kernel record of kind {0:?} has reason {1:?}")]
    Mismatch(EventKind, Reason),
    #[error("a kernel PROXY header record claims {0} bytes")]
    ProxyLength(u32),
}

/// Decodes one ring-buffer record, converting its kind and reason with a check.
pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    if buf.len() < std::mem::size_of::<Event>() {
        return Err(DecodeError::Short(buf.len()));
    }
    // SAFETY: length checked; Event is plain #[repr(C)] data valid for any bytes,
    // read unaligned because ring-buffer records are only 8-byte aligned by contract.
    let ev = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<Event>()) };
    let kind = EventKind::try_from(ev.kind).map_err(DecodeError::Unknown)?;
    let reason = Reason::try_from(ev.reason).map_err(DecodeError::Unknown)?;
    // What the kernel emits: early and hold events carry no reason, a verdict
    // ends the pre-greeting phase (a client's FIN only while held: otherwise the
    // MTA has the connection and answers it), a close has a FIN or RST.
    let fits = match kind {
        EventKind::Early | EventKind::Held | EventKind::Proxied => reason == Reason::None,
        EventKind::Verdict => match reason {
            Reason::None => false,
            Reason::ClientFin => ev.conn.has(ConnFlags::HELD),
            Reason::BadProxyHeader => ev.conn.has(ConnFlags::PROXY_PORT),
            _ => true,
        },
        EventKind::Closed => !matches!(reason, Reason::None | Reason::Greeting),
    };
    if !fits {
        return Err(DecodeError::Mismatch(kind, reason));
    }
    Ok(Record {
        kind,
        reason,
        now_ns: ev.now_ns,
        key: ev.key,
        conn: ev.conn,
    })
}

/// The header bytes of a Proxied record (`decode` has checked its event).
pub fn proxy_header(buf: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let size = std::mem::size_of::<ProxyRecord>();
    if buf.len() < size {
        return Err(DecodeError::Short(buf.len()));
    }
    // SAFETY: length checked; plain #[repr(C)] data valid for any bytes, read
    // unaligned (ring-buffer records are only 8-byte aligned).
    let r = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<ProxyRecord>()) };
    let len = usize::try_from(r.len).unwrap_or(usize::MAX);
    if len == 0 || len > PROXY_MAX {
        return Err(DecodeError::ProxyLength(r.len));
    }
    Ok(r.header[..len].to_vec())
}

/// How a verdict's pre-greeting phase ended, by the kernel's reason.
fn end_of(reason: Reason) -> End {
    match reason {
        Reason::Greeting => End::Greeting,
        Reason::ClientRst => End::ClientReset,
        Reason::ClientFin => End::ClientClose,
        // Never on a verdict: `decode` refuses it.
        Reason::None => End::NoGreeting,
        Reason::ServerFin => End::ServerClose,
        Reason::ServerRst => End::ServerReset,
        Reason::BadProxyHeader => End::BadProxyHeader,
    }
}

/// Drops a kernel record already seen for the same connection: two CPUs racing
/// on one connection may both report it (see the kernel's `claim`). A connection
/// is its 4-tuple plus the time of its handshake, so a reused client port is a
/// different connection. Bounded: the race spans microseconds, so remembering the
/// last `cap` to `2 * cap` identities is plenty. Two generations instead of a FIFO
/// of removals: one hash insert per record, and dropping a generation is a clear.
pub struct Dedupe {
    current: HashSet<(EventKind, ConnKey, u64)>,
    previous: HashSet<(EventKind, ConnKey, u64)>,
    cap: usize,
}

impl Dedupe {
    pub fn new(cap: usize) -> Self {
        let set = || HashSet::with_capacity_and_hasher(cap, Default::default());
        Dedupe {
            current: set(),
            previous: set(),
            cap: cap.max(1),
        }
    }

    /// True the first time this (kind, connection) is seen.
    pub fn first(&mut self, ev: &Record) -> bool {
        let id = (ev.kind, ev.key, ev.conn.established_ns);
        if self.previous.contains(&id) || !self.current.insert(id) {
            return false;
        }
        if self.current.len() >= self.cap {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        true
    }
}

struct Pending {
    conn: Conn,
    /// Monotonic ns after which the agent stops waiting for the greeting.
    deadline_ns: u64,
}

/// Early talkers seen, waiting for their final verdict from the kernel.
pub struct Tracker {
    action: Taken,
    grace_ns: u64,
    pending: HashMap<ConnKey, Pending>,
    /// Connections (4-tuple, handshake time) already reported by the sweep, so a
    /// late kernel verdict is not logged twice, while a new connection on a
    /// reused port still is; value = monotonic ns when it may be forgotten.
    reported: HashMap<(ConnKey, u64), u64>,
    /// Bound on both tables; the kernel's own table is bounded the same way.
    limit: usize,
}

impl Tracker {
    pub fn new(action: Taken, grace_ns: u64, limit: usize) -> Self {
        Tracker {
            action,
            grace_ns,
            pending: HashMap::default(),
            reported: HashMap::default(),
            limit,
        }
    }

    /// What is logged as done to early talkers from now on (after a reload).
    pub fn set_action(&mut self, action: Taken) {
        self.action = action;
    }

    /// Handles one kernel record; returns the verdict to log, if any.
    pub fn on_event(&mut self, ev: &Record) -> Option<Verdict> {
        match ev.kind {
            EventKind::Early => {
                if self.pending.len() >= self.limit {
                    // Do not grow without bound; the kernel verdict still arrives.
                    return None;
                }
                self.pending.insert(
                    ev.key,
                    Pending {
                        conn: ev.conn,
                        deadline_ns: ev.conn.release_ns.saturating_add(self.grace_ns),
                    },
                );
                None
            }
            EventKind::Verdict => {
                // Both tables hold early talkers only: empty for the usual pass.
                if !self.pending.is_empty() {
                    self.pending.remove(&ev.key);
                }
                if !self.reported.is_empty()
                    && self
                        .reported
                        .remove(&(ev.key, ev.conn.established_ns))
                        .is_some()
                {
                    return None;
                }
                Some(verdict(
                    &ev.key,
                    &ev.conn,
                    end_of(ev.reason),
                    ev.now_ns,
                    self.action,
                ))
            }
            EventKind::Closed | EventKind::Held | EventKind::Proxied => None,
        }
    }

    /// Early talkers whose greeting never came: `lookup` gives the kernel's current
    /// view of the connection (None if it is gone).
    pub fn sweep(
        &mut self,
        now_ns: u64,
        mut lookup: impl FnMut(&ConnKey) -> Option<Conn>,
    ) -> Vec<Verdict> {
        self.reported.retain(|_, until| *until > now_ns);
        let due: Vec<ConnKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for key in due {
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            // The kernel's entry, if it is still this connection's.
            let conn = lookup(&key)
                .filter(|c| c.established_ns == p.conn.established_ns)
                .unwrap_or(p.conn);
            if self.reported.len() < self.limit {
                self.reported.insert(
                    (key, p.conn.established_ns),
                    now_ns.saturating_add(self.grace_ns * 10),
                );
            }
            out.push(verdict(&key, &conn, End::NoGreeting, now_ns, self.action));
        }
        out
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use EventKind::{Early as EV_EARLY, Verdict as EV_VERDICT};
    use Reason::{ClientRst as R_CLIENT_RST, Greeting as R_GREETING, None as R_NONE};

    pub(crate) fn key4(c: [u8; 4], cp: u16, s: [u8; 4], sp: u16) -> ConnKey {
        let mut ca = [0u8; 16];
        ca[10] = 0xff;
        ca[11] = 0xff;
        let mut sa = ca;
        ca[12..].copy_from_slice(&c);
        sa[12..].copy_from_slice(&s);
        ConnKey {
            client_addr: ca,
            server_addr: sa,
            client_port: cp,
            server_port: sp,
            pad: 0,
        }
    }

    pub(crate) fn conn(early: &[u8]) -> Conn {
        let mut c = Conn {
            established_ns: 1_000_000_000,
            release_ns: 2_000_000_000,
            first_ns: 0,
            client_base: u32::MAX - 3, // exercises sequence wrap-around
            client_end: u32::MAX - 3,
            server_isn: 7,
            flags: 0,
            payload_len: 0,
            synack_ts: 0,
            client_ts: 0,
            client_win: 0,
            synacks: 1,
            proxy_len: 0,
            pad: [0; 3],
            payload: [0; PAYLOAD_MAX],
        };
        if !early.is_empty() {
            c.flags |= ConnFlags::EARLY.bits();
            c.first_ns = 1_003_500_000;
            c.client_end = c.client_base.wrapping_add(early.len() as u32);
            let n = early.len().min(PAYLOAD_MAX);
            c.payload[..n].copy_from_slice(&early[..n]);
            c.payload_len = n as u32;
        }
        c
    }

    fn ev(kind: EventKind, reason: Reason, key: ConnKey, conn: Conn, now_ns: u64) -> Record {
        Record {
            kind,
            reason,
            now_ns,
            key,
            conn,
        }
    }

    /// The bytes the kernel would put in the ring for this record.
    pub(crate) fn raw(kind: u32, reason: u32, key: ConnKey, conn: Conn) -> Vec<u8> {
        let e = Event {
            kind,
            reason,
            now_ns: 9,
            key,
            conn,
        };
        // SAFETY: viewing a plain-data struct as bytes for the test.
        unsafe {
            std::slice::from_raw_parts(
                (&e as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn addresses_unmap_ipv4_and_keep_ipv6() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        assert_eq!(client_of(&k).to_string(), "10.0.0.2:40000");
        assert_eq!(server_of(&k).to_string(), "10.0.0.1:25");
        let mut k6 = k;
        k6.client_addr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(client_of(&k6).to_string(), "[fd00::2]:40000");
    }

    #[test]
    fn early_verdict_counts_bytes_across_wrap() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let v = verdict(
            &k,
            &conn(b"EHLO bot\r\n"),
            End::Greeting,
            2_231_000_000,
            Taken::Log,
        );
        assert_eq!(v.kind, Kind::EarlyTalker);
        assert_eq!(v.bytes, 10);
        assert_eq!(v.after_ms, Some(3.5));
        assert_eq!(v.greeting_after_ms, Some(1231.0));
        assert_eq!(v.payload, b"EHLO bot\r\n");
    }

    #[test]
    fn pass_and_hangup() {
        let k = key4([10, 0, 0, 2], 1, [10, 0, 0, 1], 25);
        let v = verdict(&k, &conn(b""), End::Greeting, 2_000_000_000, Taken::Log);
        assert_eq!((v.kind, v.bytes, v.after_ms), (Kind::Pass, 0, None));
        let v = verdict(&k, &conn(b""), End::ClientReset, 2_000_000_000, Taken::Log);
        assert_eq!((v.kind, v.greeting_after_ms), (Kind::Hangup, None));
    }

    #[test]
    fn decode_round_trips_every_kind_and_rejects_the_rest() {
        let k = key4([1, 2, 3, 4], 5, [6, 7, 8, 9], 25);
        for (kind, reason) in [
            (EV_EARLY, R_NONE),
            (EV_VERDICT, R_GREETING),
            (EV_VERDICT, R_CLIENT_RST),
            (EV_VERDICT, Reason::ServerFin),
            (EV_VERDICT, Reason::ServerRst),
            (EventKind::Closed, R_CLIENT_RST),
            (EventKind::Closed, Reason::ClientFin),
            (EventKind::Closed, Reason::ServerFin),
            (EventKind::Closed, Reason::ServerRst),
            (EventKind::Held, R_NONE),
            (EventKind::Proxied, R_NONE),
        ] {
            let r = decode(&raw(kind as u32, reason as u32, k, conn(b"EHLO\r\n")))
                .unwrap_or_else(|e| panic!("{kind:?}/{reason:?}: {e}"));
            assert_eq!((r.kind, r.reason, r.key), (kind, reason, k));
            assert_eq!(r.conn.payload[..r.conn.payload_len as usize], *b"EHLO\r\n");
        }
        // Every kind the ABI defines is covered above.
        assert_eq!(EventKind::ALL.len(), 5);
        let bytes = raw(EV_VERDICT as u32, R_GREETING as u32, k, conn(b""));
        assert_eq!(decode(&bytes[..10]).unwrap_err(), DecodeError::Short(10));
        let e = decode(&raw(77, 1, k, conn(b""))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a kernel record has an unknown event kind 77"
        );
        let e = decode(&raw(2, 9, k, conn(b""))).unwrap_err();
        assert_eq!(e.to_string(), "a kernel record has an unknown end reason 9");
        // A bad PROXY header ends only a connection on a PROXY protocol port.
        let bad = raw(
            EV_VERDICT as u32,
            Reason::BadProxyHeader as u32,
            k,
            conn(b""),
        );
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::Mismatch(EV_VERDICT, Reason::BadProxyHeader)
        );
        let mut proxied = conn(b"");
        proxied.flags |= ConnFlags::PROXY_PORT.bits();
        let r = decode(&raw(
            EV_VERDICT as u32,
            Reason::BadProxyHeader as u32,
            k,
            proxied,
        ))
        .unwrap();
        assert_eq!(end_of(r.reason), End::BadProxyHeader);
        // A header record: its bytes, or a clear error if short or too long.
        let ev = raw(EventKind::Proxied as u32, 0, k, proxied);
        let mut rec = ev.clone();
        rec.extend_from_slice(&15u32.to_ne_bytes());
        rec.extend_from_slice(&0u32.to_ne_bytes());
        let mut header = [0u8; PROXY_MAX];
        header[..15].copy_from_slice(b"PROXY UNKNOWN\r\n");
        rec.extend_from_slice(&header);
        assert_eq!(proxy_header(&rec).unwrap(), b"PROXY UNKNOWN\r\n");
        assert_eq!(proxy_header(&ev).unwrap_err(), DecodeError::Short(ev.len()));
        rec[ev.len()..ev.len() + 4].copy_from_slice(&300u32.to_ne_bytes());
        assert_eq!(
            proxy_header(&rec).unwrap_err(),
            DecodeError::ProxyLength(300)
        );
        assert_eq!(
            decode(&raw(
                EV_VERDICT as u32,
                Reason::ClientFin as u32,
                k,
                conn(b"")
            ))
            .unwrap_err(),
            DecodeError::Mismatch(EV_VERDICT, Reason::ClientFin)
        );
        // … which only a held connection ends with: the MTA never saw it.
        let mut held = conn(b"");
        held.flags |= ConnFlags::HELD.bits();
        let r = decode(&raw(EV_VERDICT as u32, Reason::ClientFin as u32, k, held)).unwrap();
        assert_eq!(end_of(r.reason), End::ClientClose);
        assert!(decode(&raw(EV_EARLY as u32, R_GREETING as u32, k, conn(b""))).is_err());
    }

    #[test]
    fn tracker_logs_once_and_sweeps_silent_servers() {
        let mut t = Tracker::new(Taken::Log, 5_000_000_000, 100);
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let c = conn(b"EHLO bot\r\n");
        assert!(t.on_event(&ev(EV_EARLY, R_NONE, k, c, 1)).is_none());
        assert_eq!(t.pending(), 1);
        // Not yet due (release 2 s + grace 5 s).
        assert!(t.sweep(6_999_999_999, |_| None).is_empty());
        let mut later = c;
        later.client_end = later.client_base.wrapping_add(30);
        let out = t.sweep(7_000_000_000, |_| Some(later));
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].end, out[0].bytes), (End::NoGreeting, 30));
        // The kernel's verdict after that is not logged a second time.
        assert!(t
            .on_event(&ev(EV_VERDICT, R_GREETING, k, later, 8))
            .is_none());
        // ...but a new connection on the same (reused) port is.
        let mut reused = later;
        reused.established_ns += 1_000;
        t.on_event(&ev(EV_EARLY, R_NONE, k, reused, 9));
        assert!(t
            .on_event(&ev(EV_VERDICT, R_GREETING, k, reused, 10))
            .is_some());
        // A verdict in time is logged and clears the pending entry.
        let k2 = key4([10, 0, 0, 3], 40001, [10, 0, 0, 1], 25);
        t.on_event(&ev(EV_EARLY, R_NONE, k2, c, 1));
        let v = t
            .on_event(&ev(EV_VERDICT, R_GREETING, k2, c, 2_100_000_000))
            .unwrap();
        assert_eq!(v.kind, Kind::EarlyTalker);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn dedupe_by_connection_identity() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let c = conn(b"EHLO\r\n");
        let mut d = Dedupe::new(2);
        let v = ev(EV_VERDICT, R_CLIENT_RST, k, c, 5);
        assert!(d.first(&v));
        assert!(
            !d.first(&v),
            "the same connection's second verdict is dropped"
        );
        // Its early event is another kind: kept.
        assert!(d.first(&ev(EV_EARLY, R_NONE, k, c, 5)));
        // The same port reused later is another connection.
        let mut c2 = c;
        c2.established_ns += 1;
        assert!(d.first(&ev(EV_VERDICT, R_CLIENT_RST, k, c2, 9)));
        // Still remembered one generation later...
        assert!(!d.first(&v));
        // ...but bounded: after two more generations it is forgotten.
        for p in 1..=4 {
            assert!(d.first(&ev(
                EV_VERDICT,
                R_CLIENT_RST,
                key4([10, 0, 0, 2], p, [10, 0, 0, 1], 25),
                c,
                5
            )));
        }
        assert!(d.first(&v));
    }

    #[test]
    fn tracker_is_bounded() {
        let mut t = Tracker::new(Taken::Log, 1, 2);
        for p in 0..10 {
            t.on_event(&ev(
                EV_EARLY,
                R_NONE,
                key4([1, 1, 1, 1], p, [2, 2, 2, 2], 25),
                conn(b"x"),
                1,
            ));
        }
        assert_eq!(t.pending(), 2);
    }
}
