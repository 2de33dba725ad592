//! The maps, and the small accessors every stage uses: counters, the run-time
//! configuration, watched ports, the allowlist and the pass cache.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use earlytalker_common::{
    Config, Conn, ConnKey, Handshake, Stat, DEFAULT_EVENTS_BYTES, DEFAULT_MAX_CONNS,
    DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_PASSED, MAX_ALLOW, PORT_WORDS,
};

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "PORTS")]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map(name = "CONNS")]
pub static CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

#[map(name = "HANDSHAKES")]
pub static HANDSHAKES: LruHashMap<ConnKey, Handshake> =
    LruHashMap::with_max_entries(DEFAULT_MAX_HANDSHAKES, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

#[map(name = "ALLOW")]
static ALLOW: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

/// Client address -> bpf_ktime_get_ns of its last pass after a real hold.
#[map(name = "PASSED")]
static PASSED: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(DEFAULT_MAX_PASSED, 0);

/// Where a new connection entry is built before insertion: a Conn is too big to
/// keep two of on the 512-byte BPF stack.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Conn> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[inline(always)]
pub fn stat(s: Stat) {
    if let Some(p) = STATS.get_ptr_mut(s as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
pub fn port_watched(port: u16) -> bool {
    match PORTS.get(u32::from(port >> 6)) {
        Some(word) => (*word >> (port & 63)) & 1 == 1,
        None => false,
    }
}

/// Allowlisted clients are never held, flagged or acted upon. Looked up once per
/// connection (SYN-ACK, or a SYN carrying data), never per segment.
#[inline(always)]
pub fn allowlisted(addr: &[u8; 16]) -> bool {
    if ALLOW.get(Key::new(128, *addr)).is_some() {
        stat(Stat::AllowHits);
        return true;
    }
    false
}

/// Whether `addr` passed a real hold less than the pass TTL ago.
#[inline(always)]
pub fn recently_passed(addr: &[u8; 16], cfg: &Config, now_ns: u64) -> bool {
    if cfg.pass_ttl_ns == 0 {
        return false;
    }
    match PASSED.get_ptr(addr) {
        // SAFETY: plain u64 read from a map value.
        Some(t) => now_ns.saturating_sub(unsafe { *t }) < cfg.pass_ttl_ns,
        None => false,
    }
}

#[inline(always)]
pub fn record_pass(addr: &[u8; 16], now_ns: u64) {
    let _ = PASSED.insert(addr, now_ns, 0);
}

/// An address that early-talks loses its pass.
#[inline(always)]
pub fn forget_pass(addr: &[u8; 16]) {
    let _ = PASSED.remove(addr);
}

/// The tracked connection, if any, as a map value valid for this program run.
#[inline(always)]
pub fn conn_mut(key: &ConnKey) -> Option<&'static mut Conn> {
    let p = CONNS.get_ptr_mut(key)?;
    // SAFETY: the map value stays valid for this program run; races with the
    // other direction touch disjoint fields or set flags atomically.
    Some(unsafe { &mut *p })
}

/// A fresh entry in this CPU's scratch slot. Only `payload[..payload_len]` is
/// meaningful, so the payload bytes are not cleared.
#[inline(always)]
pub fn scratch_conn(
    cfg: &Config,
    now_ns: u64,
    client_base: u32,
    server_isn: u32,
) -> Option<&'static mut Conn> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within this program run.
    let c = unsafe { &mut *p };
    c.established_ns = now_ns;
    c.release_ns = now_ns + cfg.wait_ns;
    c.first_ns = 0;
    c.client_base = client_base;
    c.client_end = client_base;
    c.server_isn = server_isn;
    c.flags = 0;
    c.payload_len = 0;
    c.synack_ts = 0;
    c.client_ts = 0;
    c.client_win = 0;
    c.synacks = 0;
    c.pad = 0;
    Some(c)
}

/// Starts tracking `conn`; false (counted) if the table refused it.
#[inline(always)]
pub fn track(key: &ConnKey, conn: &Conn) -> bool {
    if CONNS.insert(key, conn, 0).is_err() {
        stat(Stat::MapFull);
        return false;
    }
    stat(Stat::Tracked);
    true
}
