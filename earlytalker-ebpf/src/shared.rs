//! The single definition of everything the kernel programs and the agent exchange
//! through maps. The agent includes this very file (`#[path]`), so it must stay plain
//! `#[repr(C)]` data with explicit padding and no dependencies.

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

/// Default sizes; the agent may resize CONNS, HANDSHAKES and EVENTS at load time.
pub const DEFAULT_MAX_CONNS: u32 = 65_536;
pub const DEFAULT_MAX_HANDSHAKES: u32 = 65_536;
pub const DEFAULT_EVENTS_BYTES: u32 = 1 << 20;
/// Allowlist prefixes (an LPM trie allocates per entry, so the bound costs nothing).
pub const MAX_ALLOW: u32 = 65_536;
/// Pass cache: client addresses that passed recently (LRU).
pub const DEFAULT_MAX_PASSED: u32 = 131_072;

/// PORTS is a 65,536-bit bitmap in u64 words: one array lookup per packet.
pub const PORT_WORDS: u32 = 1024;

/// One TCP connection, as seen from the server. IPv4 addresses are stored
/// IPv4-mapped (`::ffff:a.b.c.d`) so both families share one map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    pub server_port: u16,
    /// Always zero: hash keys must not carry stray padding bytes.
    pub pad: u32,
}

/// Tracked state of a connection until its greeting has left the server.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the handshake completed
    /// (or when a SYN carrying data arrived).
    pub established_ns: u64,
    /// Server payload is held (dropped, TCP retries) until this instant.
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
    pub flags: u32,
    pub payload_len: u32,
    pub pad: u32,
    pub payload: [u8; PAYLOAD_MAX],
}

/// Client sent payload before the greeting was released.
pub const F_EARLY: u32 = 1 << 0;
/// The payload arrived in the SYN itself (TCP Fast Open).
pub const F_SYN_DATA: u32 = 1 << 1;
/// At least one greeting segment was held back.
pub const F_HELD: u32 = 1 << 2;
/// The client sent FIN before the greeting.
pub const F_CLIENT_FIN: u32 = 1 << 3;
/// Enforced (deny/denysoft): every further segment of the connection is dropped in
/// both directions, except the agent's reply (marked REPLY_MARK).
pub const F_DENY: u32 = 1 << 4;
/// The greeting left; the entry is kept only to report the connection's end
/// (defer-reject needs to know how long the verdict matters).
pub const F_GREETED: u32 = 1 << 5;

/// Not held: the client's address passed recently (pass cache).
pub const F_PASS_CACHED: u32 = 1 << 6;
/// The pre-greeting verdict was emitted (claimed atomically: one per connection).
pub const F_REPORTED: u32 = 1 << 7;
/// The close of a tracked early talker was reported (claimed atomically).
pub const F_CLOSED: u32 = 1 << 8;

/// skb->mark of the agent's own reply segments, which egress lets through.
pub const REPLY_MARK: u32 = 0x6574_616c; // "etal"

/// Half-open connection: recorded when the server answers a SYN, so that a SYN
/// flood only churns this map and never evicts established connections.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Handshake {
    /// Server's initial sequence number: the completing ACK acknowledges isn + 1.
    pub server_isn: u32,
    /// The SYN-ACK's ack number: the client's first payload sequence number.
    pub client_base: u32,
}

/// Run-time settings, one entry; the agent may rewrite it while running.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// How long the greeting is held after the handshake; 0 = no hold.
    pub wait_ns: u64,
    pub flags: u64,
    /// A client address that passed is not held again for this long; 0 = off.
    pub pass_ttl_ns: u64,
}

/// Config.flags: drop early talkers' bytes and their greeting (deny, denysoft).
pub const CFG_ENFORCE: u64 = 1 << 0;
/// Config.flags: keep early talkers tracked until they close (defer-reject).
pub const CFG_TRACK_EARLY: u64 = 1 << 1;

/// Ring buffer record.
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

/// First client payload before the greeting (sent once per connection).
pub const EV_EARLY: u32 = 1;
/// Final word on a connection: its greeting left, or it closed before one did.
pub const EV_VERDICT: u32 = 2;
/// An early talker tracked after its greeting (CFG_TRACK_EARLY) has closed.
pub const EV_CLOSED: u32 = 3;

/// Why a verdict was emitted.
pub const R_GREETING: u32 = 1;
pub const R_CLIENT_RST: u32 = 2;
pub const R_SERVER_FIN: u32 = 3;
pub const R_SERVER_RST: u32 = 4;
pub const R_CLIENT_FIN: u32 = 5;

/// Indexes into the per-CPU STATS array.
pub const S_TRACKED: u32 = 0;
pub const S_EARLY: u32 = 1;
pub const S_PASS: u32 = 2;
pub const S_HOLD_DROPS: u32 = 3;
pub const S_EVENTS_LOST: u32 = 4;
pub const S_MAP_FULL: u32 = 5;
pub const S_HANDSHAKES: u32 = 6;
pub const S_SYN_DATA: u32 = 7;
pub const S_CLOSED_EARLY: u32 = 8;
pub const S_DENY_DROPS: u32 = 9;
pub const S_ALLOW_HITS: u32 = 10;
pub const S_PASS_CACHE_HITS: u32 = 11;
pub const S_COUNT: u32 = 12;

/// Names for the counters, indexed like STATS.
pub const STAT_NAMES: [&str; S_COUNT as usize] = [
    "connections_tracked",
    "early_talkers",
    "passes",
    "greeting_segments_held",
    "events_lost",
    "conn_map_insert_failures",
    "handshakes_seen",
    "syn_data",
    "closed_before_greeting",
    "enforced_segments_dropped",
    "allowlist_hits",
    "pass_cache_hits",
];
