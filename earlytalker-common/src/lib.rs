//! The one definition of everything earlytalker's kernel programs and its agent
//! exchange: map names and sizes, the `#[repr(C)]` map and ring-buffer types,
//! event kinds, end reasons, connection flags and statistics.
//!
//! The kernel crate uses it as is (no_std, no allocation); the agent and the tests
//! enable the `user` feature for aya's `Pod`. Numbers arriving from the kernel
//! (event kinds, reasons) are converted with `TryFrom`: an unknown value is an
//! error for the caller to count and log, never a default.
#![no_std]

use core::{fmt, mem::size_of};

pub mod stats;
pub use stats::{Stat, StatInfo, STATS};

/// How many of a client's first payload bytes are kept for the log.
pub const PAYLOAD_MAX: usize = 64;

/// Names of the maps, as the agent looks them up.
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_PORTS: &str = "PORTS";
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_HANDSHAKES: &str = "HANDSHAKES";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_ALLOW: &str = "ALLOW";
pub const MAP_PASSED: &str = "PASSED";
pub const MAP_TRACKED: &str = "TRACKED";
pub const MAP_PENALTY: &str = "PENALTY";
pub const MAP_PROXY_PORTS: &str = "PROXY_PORTS";
pub const MAP_TAILS: &str = "TAILS";
/// TAILS index of PROG_INGRESS_PROXY.
pub const TAIL_PROXY: u32 = 0;

/// Program names, as the agent and the bench look them up.
pub const PROG_INGRESS: &str = "et_ingress";
pub const PROG_EGRESS: &str = "et_egress";
/// The tail of et_ingress for a balancer's bytes on a PROXY protocol port.
pub const PROG_INGRESS_PROXY: &str = "et_ingress_proxy";
/// The penalty box, at XDP; attached only when a penalty is configured.
pub const PROG_XDP: &str = "et_xdp";
/// An empty classifier in the same object: the bench's floor. Never attached by
/// the agent.
pub const PROG_FLOOR: &str = "et_floor";

/// Default sizes; the agent may resize CONNS, HANDSHAKES and EVENTS at load time.
pub const DEFAULT_MAX_CONNS: u32 = 65_536;
pub const DEFAULT_MAX_HANDSHAKES: u32 = 65_536;
pub const DEFAULT_EVENTS_BYTES: u32 = 1 << 20;
/// Allowlist prefixes (an LPM trie allocates per entry, so the bound costs nothing).
pub const MAX_ALLOW: u32 = 65_536;
/// Penalty box: client address -> CLOCK_MONOTONIC ns until which its SYNs are
/// refused at XDP (LRU).
pub const MAX_PENALTY: u32 = 65_536;
/// Pass cache: client addresses that passed recently (LRU).
pub const DEFAULT_MAX_PASSED: u32 = 131_072;

/// PORTS is a 65,536-bit bitmap in u64 words: one array lookup per packet.
/// PROXY_PORTS, the same shape, marks the watched ports behind a balancer that
/// sends a PROXY protocol header (looked up once per connection).
pub const PORT_WORDS: u32 = 1024;

/// The longest PROXY protocol header taken (v1 is at most 107 bytes; v2 is 16
/// plus its length: 28 for TCP over IPv4, 52 over IPv6, more with TLVs).
pub const PROXY_MAX: usize = 256;
/// The v2 signature; v1 begins "PROXY ".
pub const PROXY_V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// TRACKED: a counting filter in front of CONNS and HANDSHAKES, so that a
/// segment of a connection in neither (every segment after the greeting) costs
/// one array load instead of two hash-table misses. Each bucket counts the
/// entries of both maps whose key hashes there (`tracked_bucket`): 0 is an exact
/// "not tracked". The kernel adds before it inserts and subtracts after it
/// removes, so a count is never below the truth; entries the LRU maps evict
/// leave it above, which only costs look-ups until the agent repairs it.
pub const TRACKED_BITS: u32 = 13;
pub const TRACKED_BUCKETS: u32 = 1 << TRACKED_BITS;
/// A bucket is `changes << 32 | count`: every change moves the upper half, so
/// the agent's repair (a compare-and-swap) fails on any concurrent change.
pub const TRACKED_ADD: u64 = (1 << 32) | 1;
/// Adds 2^32 - 1: count - 1 and changes + 1 (the count is >= 1 here).
pub const TRACKED_SUB: u64 = (1 << 32) - 1;

/// The TRACKED bucket of a connection, from the client's address (as four
/// native-order words of the mapped address) and both ports: Fibonacci hashing.
#[inline(always)]
pub fn tracked_bucket(client: [u32; 4], client_port: u16, server_port: u16) -> u32 {
    let a = client[0] ^ client[1] ^ client[2] ^ client[3];
    let x = (u64::from(a) << 32) | (u64::from(client_port) << 16) | u64::from(server_port);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TRACKED_BITS)) as u32
}

/// skb->mark of the agent's own reply segments, which egress lets through.
pub const REPLY_MARK: u32 = 0x6574_616c; // "etal"

/// One TCP connection, as seen from the server. IPv4 addresses are stored
/// IPv4-mapped (`::ffff:a.b.c.d`) so both families share one map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    pub server_port: u16,
    /// Always zero: hash keys must not carry stray padding bytes.
    pub pad: u32,
}

impl ConnKey {
    /// Its TRACKED bucket.
    #[inline(always)]
    pub fn bucket(&self) -> u32 {
        let a = &self.client_addr;
        let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        tracked_bucket(
            [w(0), w(4), w(8), w(12)],
            self.client_port,
            self.server_port,
        )
    }
}

/// Tracked state of a connection until its greeting has left the server.
/// While HELD, it also carries what the agent needs to forge the client's
/// handshake-completing ACK at the release time (timestamps, window).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the handshake completed
    /// (or when a SYN carrying data arrived).
    pub established_ns: u64,
    /// A HELD connection is released (its handshake completed) at this instant.
    pub release_ns: u64,
    /// When the first client payload byte arrived; 0 if none yet.
    pub first_ns: u64,
    /// Client sequence number of its first payload byte (ISN + 1).
    pub client_base: u32,
    /// Highest client sequence end seen before the greeting: bytes = end - base,
    /// so retransmissions are not counted twice.
    pub client_end: u32,
    /// Server's initial sequence number: the agent's reply to a denied client
    /// starts at server_isn + 1, where the held greeting would have.
    pub server_isn: u32,
    /// `ConnFlags` bits; a plain u32 because the kernel sets them with atomic ORs.
    pub flags: u32,
    pub payload_len: u32,
    /// TSval of the server's first SYN-ACK (0 without timestamps): a SYN
    /// cookie's low six bits encode the options the server agreed to.
    pub synack_ts: u32,
    /// The client's latest TSval while held (valid with CLIENT_TS).
    pub client_ts: u32,
    /// The client's latest advertised window while held, as sent (scaled).
    pub client_win: u16,
    /// SYN-ACKs the server has sent so far (retransmissions included).
    pub synacks: u16,
    /// With PROXIED: the length of the balancer's PROXY header, the first
    /// bytes of the client's sequence space (not early talk).
    pub proxy_len: u16,
    pub pad: [u16; 3],
    pub payload: [u8; PAYLOAD_MAX],
}

impl Conn {
    #[inline(always)]
    pub fn has(&self, f: ConnFlags) -> bool {
        self.flags & f.bits() != 0
    }

    /// The flags, unknown bits kept (the printer shows them in hex).
    pub fn flag_set(&self) -> ConnFlags {
        ConnFlags::from_bits_retain(self.flags)
    }

    /// Whether the kept first bytes begin with an EHLO command (any case), as
    /// an early-pipelining client's do. The kernel reads five fixed bytes.
    #[inline(always)]
    pub fn starts_with_ehlo(&self) -> bool {
        self.payload_len >= 5
            && self.payload[0] | 0x20 == b'e'
            && self.payload[1] | 0x20 == b'h'
            && self.payload[2] | 0x20 == b'l'
            && self.payload[3] | 0x20 == b'o'
            && self.payload[4] == b' '
    }

    /// Whether the server holds only a request socket (or a cookie) for this
    /// connection: held, and no client segment has completed its handshake.
    #[inline(always)]
    pub fn before_accept(&self) -> bool {
        self.has(ConnFlags::HELD) && !self.has(ConnFlags::OPENED)
    }

    /// Client payload bytes before the greeting (sequence space, wraps),
    /// a balancer's PROXY header not counted.
    pub fn early_bytes(&self) -> u32 {
        let n = self.client_end.wrapping_sub(self.client_base);
        let header = u32::from(self.proxy_len);
        if self.has(ConnFlags::PROXIED) && n >= header {
            n - header
        } else {
            n
        }
    }
}

bitflags::bitflags! {
    /// State of a tracked connection. EARLY, SYN_DATA, HELD, COOKIE, CLIENT_TS,
    /// OPENED, CLIENT_FIN and PASS_CACHED describe what happened before the greeting; DENY and GREETED
    /// mark the two settled states (only one of them is ever set); REPORTED and
    /// CLOSED are claims that make the verdict and the close one record each.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ConnFlags: u32 {
        /// Client sent payload before the greeting was released.
        const EARLY = 1 << 0;
        /// The payload arrived in the SYN itself (TCP Fast Open): an early
        /// talker, tracked from its SYN and never held.
        const SYN_DATA = 1 << 1;
        /// Held before the MTA accepted: the handshake's last ACK was withheld,
        /// so the server keeps a request socket (or a cookie) the MTA cannot
        /// accept until the agent releases it at `release_ns`.
        const HELD = 1 << 2;
        /// The client sent FIN before the greeting.
        const CLIENT_FIN = 1 << 3;
        /// Enforced (deny/denysoft): every further segment of the connection is
        /// dropped in both directions, except the agent's reply (REPLY_MARK).
        const DENY = 1 << 4;
        /// The greeting left; the entry is kept only to report the connection's
        /// end (defer-reject needs to know how long the verdict matters).
        const GREETED = 1 << 5;
        /// Not held: the client's address passed recently (pass cache).
        const PASS_CACHED = 1 << 6;
        /// The pre-greeting verdict was emitted (claimed atomically).
        const REPORTED = 1 << 7;
        /// The close of a tracked early talker was reported (claimed atomically).
        const CLOSED = 1 << 8;
        /// Early, but allowed: a client that passed before (PASS_CACHED) whose
        /// first bytes are an EHLO, as Exim's early pipelining (PIPECONNECT)
        /// sends, while CfgFlags::PIPECONNECT is set. Never denied.
        const PIPECONNECT = 1 << 9;
        /// The client sends TCP timestamps (CLIENT_TS valid in `client_ts`).
        const CLIENT_TS = 1 << 10;
        /// A held connection's client segments reach the server again (its
        /// data passed, or the release time came): the MTA has, or will have,
        /// a socket for it.
        const OPENED = 1 << 11;
        /// The server answered with a SYN cookie: it keeps no request socket,
        /// so nothing retransmits and nothing needs resetting while held.
        const COOKIE = 1 << 12;
        /// On a PROXY protocol port: the client is a balancer, whose first
        /// bytes must be a PROXY header naming the real client. Its own address
        /// earns no pass and loses none.
        const PROXY_PORT = 1 << 13;
        /// The PROXY header arrived (`proxy_len` bytes): the agent has it.
        const PROXIED = 1 << 14;
    }
}

/// Prints flags as `EARLY | HELD`, the way postscreen prints its state flags;
/// unknown bits in hex, none as `-`.
macro_rules! print_flags {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.is_empty() {
                    return f.write_str("-");
                }
                bitflags::parser::to_writer(self, f)
            }
        }
    };
}

print_flags!(ConnFlags);

/// Half-open connection: recorded when the server answers a SYN, so that a SYN
/// flood only churns this map and never evicts established connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Server's initial sequence number: the completing ACK acknowledges isn + 1.
    pub server_isn: u32,
    /// The SYN-ACK's ack number: the client's first payload sequence number.
    pub client_base: u32,
    /// TSval of the first SYN-ACK (0 without timestamps).
    pub synack_ts: u32,
    /// SYN-ACKs sent so far.
    pub synacks: u16,
    /// Whether the first SYN-ACK was a SYN cookie (no request socket).
    pub cookie: u16,
}

/// Run-time settings, one entry; the agent may rewrite it while running.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// How long the greeting is held after the handshake; 0 = no hold.
    pub wait_ns: u64,
    /// `CfgFlags` bits.
    pub flags: u64,
    /// A client address that passed is not held again for this long; 0 = off.
    pub pass_ttl_ns: u64,
}

impl Config {
    #[inline(always)]
    pub fn has(&self, f: CfgFlags) -> bool {
        self.flags & f.bits() != 0
    }
}

bitflags::bitflags! {
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CfgFlags: u64 {
        /// Drop early talkers' bytes and their greeting (deny, denysoft).
        const ENFORCE = 1 << 0;
        /// Keep early talkers tracked until they close (defer-reject).
        const TRACK_EARLY = 1 << 1;
        /// Allow PIPECONNECT (see ConnFlags::PIPECONNECT): the MTA advertises
        /// it, or the operator said so.
        const PIPECONNECT = 1 << 2;
        /// The penalty box drops a SYN instead of answering it with a RST.
        const PENALTY_DROP = 1 << 3;
    }
}

print_flags!(CfgFlags);

/// Ring buffer record. `kind` and `reason` stay raw numbers here: the agent
/// converts them with `EventKind::try_from` and `Reason::try_from`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    pub reason: u32,
    /// When the event was emitted (the greeting's release for a verdict).
    pub now_ns: u64,
    pub key: ConnKey,
    pub conn: Conn,
}

/// Ring buffer record of kind Proxied: the event, then the header's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProxyRecord {
    pub event: Event,
    pub len: u32,
    pub pad: u32,
    pub header: [u8; PROXY_MAX],
}

/// A number from the kernel that names nothing this agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Unknown {
    pub what: &'static str,
    pub value: u32,
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {}", self.what, self.value)
    }
}

/// Declares a `#[repr(u32)]` enum with checked conversion from the raw number.
macro_rules! raw_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $n:literal,)+ }) => {
        $(#[$m])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v = $n,)+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)+];
        }

        impl TryFrom<u32> for $name {
            type Error = Unknown;
            fn try_from(n: u32) -> Result<Self, Unknown> {
                match n {
                    $($n => Ok($name::$v),)+
                    value => Err(Unknown { what: $what, value }),
                }
            }
        }
    };
}

raw_enum! {
    /// What a ring-buffer record says.
    EventKind, "event kind" {
        /// First client payload before the greeting (once per connection).
        Early = 1,
        /// Final word on a connection's pre-greeting phase: its greeting left,
        /// or it ended before one did.
        Verdict = 2,
        /// An early talker tracked after its greeting (TRACK_EARLY) has closed.
        Closed = 3,
        /// A connection is held before the MTA accepted it: the agent completes
        /// its handshake at `conn.release_ns`.
        Held = 4,
        /// A balancer's PROXY header (a `ProxyRecord`): who the client really is.
        Proxied = 5,
    }
}

raw_enum! {
    /// Why a verdict or a close was emitted.
    Reason, "end reason" {
        /// Early events carry no reason.
        None = 0,
        /// The server's first payload (the greeting) left.
        Greeting = 1,
        ClientRst = 2,
        ServerFin = 3,
        ServerRst = 4,
        ClientFin = 5,
        /// On a PROXY protocol port, the first bytes were no PROXY header (or
        /// one split across segments): dropped, as the MTA would.
        BadProxyHeader = 6,
    }
}

// The layouts both sides compile against; a change that moves a field breaks the
// build here rather than the agent's reading of the kernel's bytes.
const _: () = {
    use core::mem::offset_of;
    assert!(size_of::<ConnKey>() == 40);
    assert!(offset_of!(ConnKey, client_port) == 32);
    assert!(offset_of!(ConnKey, pad) == 36);
    assert!(size_of::<Conn>() == 64 + PAYLOAD_MAX);
    assert!(offset_of!(Conn, client_base) == 24);
    assert!(offset_of!(Conn, flags) == 36);
    assert!(offset_of!(Conn, synack_ts) == 44);
    assert!(offset_of!(Conn, client_win) == 52);
    assert!(offset_of!(Conn, proxy_len) == 56);
    assert!(offset_of!(Conn, pad) == 58);
    assert!(offset_of!(Conn, payload) == 64);
    assert!(size_of::<Handshake>() == 16);
    assert!(size_of::<Config>() == 24);
    assert!(size_of::<Event>() == 16 + 40 + 64 + PAYLOAD_MAX);
    assert!(offset_of!(Event, key) == 16);
    assert!(offset_of!(Event, conn) == 56);
    // 8-byte alignment: ring-buffer records are 8-byte aligned.
    assert!(core::mem::align_of::<Event>() == 8);
    assert!(size_of::<ProxyRecord>() == size_of::<Event>() + 8 + PROXY_MAX);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): plain #[repr(C)] data with explicit padding fields, valid for
    // any bit pattern; the layouts are asserted above.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::Handshake {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn raw_numbers_convert_both_ways_and_unknowns_are_errors() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::try_from(*k as u32), Ok(*k));
        }
        for r in Reason::ALL {
            assert_eq!(Reason::try_from(*r as u32), Ok(*r));
        }
        assert_eq!(
            EventKind::try_from(0),
            Err(Unknown {
                what: "event kind",
                value: 0
            })
        );
        assert_eq!(
            Reason::try_from(7).unwrap_err().to_string(),
            "unknown end reason 7"
        );
    }

    #[test]
    fn flags_print_like_postscreen() {
        let f = ConnFlags::EARLY | ConnFlags::DENY;
        assert_eq!(f.to_string(), "EARLY | DENY");
        assert_eq!(ConnFlags::empty().to_string(), "-");
        assert_eq!(
            ConnFlags::from_bits_retain(1 | 1 << 20).to_string(),
            "EARLY | 0x100000"
        );
        assert_eq!(
            (CfgFlags::ENFORCE | CfgFlags::TRACK_EARLY).to_string(),
            "ENFORCE | TRACK_EARLY"
        );
    }
}
