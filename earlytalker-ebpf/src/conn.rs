//! A tracked connection's life, in the order it happens: a new connection, client
//! data before the greeting, the verdict, the settled state (denied, or greeted
//! and kept for defer-reject) and the close.

use crate::{
    emit::emit,
    maps::{self, stat},
    parse::{load_payload, seq_after, Seg},
    NEXT,
};
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use earlytalker_common::{CfgFlags, Config, Conn, ConnFlags, ConnKey, EventKind, Reason, Stat};

/// A new connection from a client that passed a real hold recently is greeted
/// without delay (and still watched for a race).
#[inline(always)]
pub fn apply_pass_cache(key: &ConnKey, conn: &mut Conn, cfg: &Config, now_ns: u64) {
    if maps::recently_passed(&key.client_addr, cfg, now_ns) {
        conn.release_ns = now_ns;
        conn.flags |= ConnFlags::PASS_CACHED.bits();
        stat(Stat::PassCacheHits);
    }
}

/// Sets flag bits with an atomic OR: both directions may update one entry at
/// once on different CPUs, and a plain `|=` could lose a bit (say DENY).
/// The result is not used: this toolchain (LLVM 22 through bpf-linker) emits a
/// non-fetching `lock |=` even where the old value is asked for, which the
/// differential fuzzer caught; so no decision here relies on a fetched value.
#[inline(always)]
pub fn set_flags(conn: &mut Conn, bits: ConnFlags) {
    // SAFETY: the map value is live for this program run and 4-byte aligned.
    unsafe {
        core::intrinsics::atomic_or::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut conn.flags,
            bits.bits(),
        );
    }
}

/// Marks `bit` as reported; true if it was not yet. Two CPUs racing on the same
/// connection in the same instant may both see "not yet": the agent drops the
/// duplicate by connection identity (4-tuple and handshake time).
#[inline(always)]
fn claim(conn: &mut Conn, bit: ConnFlags) -> bool {
    if conn.has(bit) {
        return false;
    }
    set_flags(conn, bit);
    true
}

/// Copies up to PAYLOAD_MAX bytes of the segment's payload into `conn`.
#[inline(always)]
fn copy_payload(ctx: &TcContext, seg: &Seg, conn: &mut Conn) {
    let n = load_payload(ctx, seg, &mut conn.payload);
    if n > 0 {
        conn.payload_len = n;
    }
}

/// Client payload before the greeting: count it, keep the first bytes once, and
/// under enforcement condemn the connection. Returns the TC verdict for the segment.
#[inline(always)]
pub fn client_data(
    ctx: &TcContext,
    seg: &Seg,
    key: &ConnKey,
    conn: &mut Conn,
    cfg: &Config,
    now_ns: u64,
) -> i32 {
    let end = seg.seq.wrapping_add(seg.payload_len);
    if seq_after(end, conn.client_end) {
        conn.client_end = end;
    }
    let first = !conn.has(ConnFlags::EARLY);
    if first {
        conn.first_ns = now_ns;
        copy_payload(ctx, seg, conn);
    }
    // Exim's early pipelining: a client that passed before (the only way a real
    // one learns the server offers PIPECONNECT) opening with EHLO. Allowed when
    // the agent says the MTA offers it; anyone else is judged as usual.
    let pipeconnect = first
        && cfg.has(CfgFlags::PIPECONNECT)
        && conn.has(ConnFlags::PASS_CACHED)
        && conn.starts_with_ehlo();
    // The early mark and, under enforcement, the deny are set in one atomic OR.
    // (Only for a connection not yet early: one logged before a reload to deny
    // stays logged rather than being silently cut off.)
    let mut bits = ConnFlags::EARLY;
    if pipeconnect {
        bits |= ConnFlags::PIPECONNECT;
    } else if first && cfg.has(CfgFlags::ENFORCE) {
        bits |= ConnFlags::DENY;
    }
    set_flags(conn, bits);
    if first {
        if pipeconnect {
            stat(Stat::Pipeconnect);
        } else {
            // An address that early-talks loses its pass (behind a balancer,
            // the agent takes the real client's).
            if !conn.has(ConnFlags::PROXY_PORT) {
                maps::forget_pass(&key.client_addr);
            }
            stat(Stat::Early);
        }
        // The MTA may ask about it within milliseconds (defer-reject: the
        // bytes let in complete the handshake at once): no batching.
        let wake = cfg.has(CfgFlags::TRACK_EARLY);
        emit(EventKind::Early, Reason::None, key, conn, now_ns, wake);
    }
    if conn.has(ConnFlags::DENY) {
        stat(Stat::DenyDrops);
        return TC_ACT_SHOT;
    }
    NEXT
}

/// Final event for a connection's pre-greeting phase. Its entry is forgotten,
/// unless defer-reject needs to hear when an early talker's connection ends:
/// returns whether it was kept (and `conn` is still its entry).
#[inline(always)]
pub fn verdict(key: &ConnKey, conn: &mut Conn, reason: Reason, now_ns: u64, cfg: &Config) -> bool {
    if !claim(conn, ConnFlags::REPORTED) {
        return false;
    }
    // A PIPECONNECT client talked first but is no early talker: it is neither
    // counted as a pass nor kept for defer-reject.
    let talked = conn.has(ConnFlags::EARLY);
    let early = talked && !conn.has(ConnFlags::PIPECONNECT);
    if reason == Reason::Greeting {
        if !talked {
            stat(Stat::Pass);
            // Only a real hold earns (or renews) a pass, as in postscreen.
            // A balancer's address earns nothing: the agent records the real
            // client's pass.
            if cfg.pass_ttl_ns > 0 && !conn.has(ConnFlags::PASS_CACHED | ConnFlags::PROXY_PORT) {
                maps::record_pass(&key.client_addr, now_ns);
            }
        }
    } else if early {
        stat(Stat::ClosedEarly);
    }
    emit(EventKind::Verdict, reason, key, conn, now_ns, false);
    if reason == Reason::Greeting && early && cfg.has(CfgFlags::TRACK_EARLY) {
        set_flags(conn, ConnFlags::GREETED);
        true
    } else {
        maps::untrack(key);
        false
    }
}

/// A segment of a connection whose pre-greeting phase is over, in either
/// direction; Some(TC verdict) if so. Denied: nothing more passes (the client's
/// retransmissions, pipelined commands and FIN never reach the MTA; the MTA's
/// greeting and the reset its socket sends at teardown never reach the client,
/// which already has our reply and FIN). Greeted early talker kept for
/// defer-reject: only the end of the connection is reported, as `rst` or `fin`.
#[inline(always)]
pub fn settled(seg: &Seg, key: &ConnKey, conn: &mut Conn, rst: Reason, fin: Reason) -> Option<i32> {
    if conn.has(ConnFlags::DENY) {
        stat(Stat::DenyDrops);
        return Some(TC_ACT_SHOT);
    }
    if !conn.has(ConnFlags::GREETED) {
        return None;
    }
    if seg.rst {
        closed(key, conn, rst, maps::now());
    } else if seg.fin {
        closed(key, conn, fin, maps::now());
    }
    Some(NEXT)
}

/// A tracked early talker's connection ended after its greeting.
#[inline(always)]
fn closed(key: &ConnKey, conn: &mut Conn, reason: Reason, now_ns: u64) {
    if !claim(conn, ConnFlags::CLOSED) {
        return;
    }
    emit(EventKind::Closed, reason, key, conn, now_ns, false);
    maps::untrack(key);
}
