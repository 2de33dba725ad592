//! The maps, and the small accessors every stage uses: counters, the run-time
//! configuration, watched ports, the allowlist and the pass cache.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use earlytalker_common::{
    Config, Conn, ConnKey, Handshake, Stat, DEFAULT_EVENTS_BYTES, DEFAULT_MAX_CONNS,
    DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_PASSED, MAX_ALLOW, MAX_PENALTY, PORT_WORDS, TRACKED_ADD,
    TRACKED_BUCKETS, TRACKED_SUB,
};

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "PORTS")]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map(name = "PROXY_PORTS")]
static PROXY_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// Tail calls: TAIL_PROXY is et_ingress_proxy (installed by the agent).
#[map(name = "TAILS")]
pub static TAILS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "CONNS")]
pub static CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

#[map(name = "HANDSHAKES")]
pub static HANDSHAKES: LruHashMap<ConnKey, Handshake> =
    LruHashMap::with_max_entries(DEFAULT_MAX_HANDSHAKES, 0);

/// Counting filter over CONNS and HANDSHAKES (see earlytalker-common). Mapped
/// into the agent, which subtracts for what it deletes and repairs evictions.
#[map(name = "TRACKED")]
static TRACKED: Array<u64> = Array::with_max_entries(TRACKED_BUCKETS, BPF_F_MMAPABLE);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

#[map(name = "ALLOW")]
static ALLOW: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

/// Client address -> bpf_ktime_get_ns of its last pass after a real hold.
#[map(name = "PASSED")]
static PASSED: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(DEFAULT_MAX_PASSED, 0);

/// The penalty box: client address -> bpf_ktime_get_ns until which its SYNs
/// are refused (written by the agent).
#[map(name = "PENALTY")]
static PENALTY: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(MAX_PENALTY, 0);

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

/// Whether `port`'s bit is set in a port bitmap (PORT_WORDS u64 words).
#[inline(always)]
fn port_bit(map: &Array<u64>, port: u16) -> bool {
    match map.get(u32::from(port >> 6)) {
        Some(word) => (*word >> (port & 63)) & 1 == 1,
        None => false,
    }
}

#[inline(always)]
pub fn port_watched(port: u16) -> bool {
    port_bit(&PORTS, port)
}

/// Whether a balancer sends a PROXY header first on this port.
#[inline(always)]
pub fn proxy_port(port: u16) -> bool {
    port_bit(&PROXY_PORTS, port)
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
    // Renewed in place: an LRU insert over an existing key takes a free node
    // and a bucket lock, a look-up neither.
    if let Some(t) = PASSED.get_ptr_mut(addr) {
        // SAFETY: plain u64 map value; a racing renewal writes a time as good.
        unsafe { *t = now_ns };
        return;
    }
    let _ = PASSED.insert(addr, now_ns, 0);
}

/// Whether `addr` is in the penalty box now (the expiry is exact: the time is
/// compared, whenever the agent gets round to deleting the entry).
#[inline(always)]
pub fn penalized(addr: &[u8; 16], now_ns: u64) -> bool {
    match PENALTY.get_ptr(addr) {
        // SAFETY: plain u64 read from a map value.
        Some(t) => now_ns < unsafe { *t },
        None => false,
    }
}

/// An address that early-talks loses its pass.
#[inline(always)]
pub fn forget_pass(addr: &[u8; 16]) {
    let _ = PASSED.remove(addr);
}

/// False only if no entry of CONNS or HANDSHAKES has this bucket: then neither
/// map needs a look-up.
#[inline(always)]
pub fn maybe_tracked(bucket: u32) -> bool {
    filter_hit(&TRACKED, bucket)
}

/// Whether a counting filter's bucket may have entries (see TRACKED).
#[inline(always)]
pub fn filter_hit(filter: &Array<u64>, bucket: u32) -> bool {
    match filter.get(bucket) {
        Some(v) => *v as u32 != 0,
        None => true,
    }
}

#[inline(always)]
fn count(bucket: u32, delta: u64) {
    filter_add(&TRACKED, bucket, delta);
}

/// Adds TRACKED_ADD or TRACKED_SUB to a counting filter's bucket.
#[inline(always)]
pub fn filter_add(filter: &Array<u64>, bucket: u32, delta: u64) {
    if let Some(p) = filter.get_ptr_mut(bucket) {
        // SAFETY: array value live for this run, 8-byte aligned; both directions
        // and the agent change it concurrently, hence the atomic add.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, delta,
            );
        }
    }
}

/// Inserts a handshake not yet in HANDSHAKES (counted first).
#[inline(always)]
pub fn add_handshake(key: &ConnKey, hs: &Handshake) -> bool {
    let b = key.bucket();
    count(b, TRACKED_ADD);
    if HANDSHAKES.insert(key, hs, u64::from(BPF_NOEXIST)).is_err() {
        count(b, TRACKED_SUB);
        return false;
    }
    true
}

/// Removes a handshake; true if this run removed it (then uncounted).
#[inline(always)]
pub fn remove_handshake(key: &ConnKey) -> bool {
    if HANDSHAKES.remove(key).is_err() {
        return false;
    }
    count(key.bucket(), TRACKED_SUB);
    true
}

/// Stops tracking a connection; true if this run removed it (then uncounted).
#[inline(always)]
pub fn untrack(key: &ConnKey) -> bool {
    if CONNS.remove(key).is_err() {
        return false;
    }
    count(key.bucket(), TRACKED_SUB);
    true
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
    c.proxy_len = 0;
    c.pad = [0; 3];
    Some(c)
}

/// What `track` did.
pub enum Track {
    Added,
    /// Another run inserted this connection first (two of its segments on two
    /// CPUs at once): that entry stands.
    Exists,
    /// The table refused it (counted).
    Full,
}

const EEXIST: i32 = 17;

/// Starts tracking `conn`, never over an entry: the filter counts each once.
#[inline(always)]
pub fn track(key: &ConnKey, conn: &Conn) -> Track {
    let b = key.bucket();
    count(b, TRACKED_ADD);
    if let Err(e) = CONNS.insert(key, conn, u64::from(BPF_NOEXIST)) {
        count(b, TRACKED_SUB);
        if e == -EEXIST {
            return Track::Exists;
        }
        stat(Stat::MapFull);
        return Track::Full;
    }
    stat(Stat::Tracked);
    Track::Added
}
