//! earlytalker's kernel side: two TC programs on each monitored interface.
//!
//! * ingress (client -> server): records the handshake's completion, the client's
//!   payload before the greeting (bytes, time, first bytes) and emits an Early
//!   event once;
//! * egress (server -> client): remembers SYN-ACKs, holds the server's first payload
//!   segment (TC_ACT_SHOT; TCP keeps it queued and retries) until `wait` after the
//!   handshake, then releases it and emits the verdict.
//!
//! Only TCP whose server port is in PORTS is looked at; everything else leaves after
//! a few loads. No payload is parsed: at most the first 64 client bytes are copied.
//!
//! Stages: `parse` (headers), `maps` (maps, counters, configuration), `conn` (a
//! connection's life), `emit` (records for the agent); this file only dispatches
//! each segment by direction and kind. Types and numbers shared with the agent
//! come from earlytalker-common.
#![no_std]
#![no_main]
// Atomic fetch-or on map values (BPF ISA v3); core exposes no atomic types here.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conn;
mod emit;
mod maps;
mod parse;

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_tcp_sock,
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use conn::{apply_pass_cache, client_data, set_flags, settled, verdict};
use earlytalker_common::{CfgFlags, Conn, ConnFlags, ConnKey, Handshake, Reason, Stat, REPLY_MARK};
use maps::{config, conn_mut, now, stat, CONNS, HANDSHAKES};
use parse::{parse, Dir, Seg};

/// "No opinion": TCX_NEXT. TC_ACT_OK would be TCX_PASS, which ends the TCX chain
/// and silently skips every program attached after ours (a firewall, say).
/// When no later program decides, the packet passes.
pub const NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn et_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    let Some(seg) = parse(ctx, Dir::Ingress) else {
        return NEXT;
    };
    let key = seg.key(Dir::Ingress);
    // The clock and the config are read only on the paths that use them: most
    // segments of a watched port need nothing but a lookup.
    if seg.syn {
        return ingress_syn(ctx, &seg, &key);
    }
    if let Some(conn) = conn_mut(&key) {
        return ingress_tracked(ctx, &seg, &key, conn);
    }
    ingress_handshake_ack(ctx, &seg, &key)
}

/// A client's SYN: a new connection on this 4-tuple, or TCP Fast Open data.
#[inline(always)]
fn ingress_syn(ctx: &TcContext, seg: &Seg, key: &ConnKey) -> i32 {
    if seg.ack {
        return NEXT;
    }
    if seg.payload_len == 0 {
        // Forget any stale (e.g. denied) connection on this 4-tuple. Looked up
        // first: a lookup takes no lock, a delete does, even on a miss.
        if CONNS.get_ptr(key).is_some() {
            let _ = CONNS.remove(key);
        }
        return NEXT;
    }
    if maps::allowlisted(&key.client_addr) {
        return NEXT;
    }
    stat(Stat::SynData);
    let cfg = config();
    let now_ns = now();
    if cfg.has(CfgFlags::ENFORCE) {
        // TCP Fast Open under enforcement: drop the SYN so no byte reaches the
        // MTA; the client falls back to a plain SYN and its data, once sent
        // after the handshake, is early like any other.
        return TC_ACT_SHOT;
    }
    // The client talked in its very first packet.
    let Some(conn) = maps::scratch_conn(&cfg, now_ns, seg.seq.wrapping_add(1), 0) else {
        return NEXT;
    };
    conn.flags |= ConnFlags::SYN_DATA.bits();
    client_data(ctx, seg, key, conn, &cfg, now_ns);
    // The SYN flag itself takes one sequence number before the data.
    conn.client_end = conn.client_base.wrapping_add(seg.payload_len);
    if maps::track(key, conn) {
        debug!(ctx, "syn with {} bytes of data", seg.payload_len);
    }
    NEXT
}

/// A client segment of a tracked connection.
#[inline(always)]
fn ingress_tracked(ctx: &TcContext, seg: &Seg, key: &ConnKey, conn: &mut Conn) -> i32 {
    if let Some(act) = settled(seg, key, conn, Reason::ClientRst, Reason::ClientFin) {
        return act;
    }
    let now_ns = now();
    let cfg = config();
    if seg.rst {
        let _ = verdict(key, conn, Reason::ClientRst, now_ns, &cfg);
        return NEXT;
    }
    let mut act = NEXT;
    if seg.payload_len > 0 {
        act = client_data(ctx, seg, key, conn, &cfg, now_ns);
    }
    if seg.fin {
        set_flags(conn, ConnFlags::CLIENT_FIN);
    }
    act
}

/// An untracked client segment: tracking starts with the handshake's last ACK,
/// which acknowledges the server's ISN + 1; anything else (connections older
/// than the agent, stray ACKs) stays untracked.
#[inline(always)]
fn ingress_handshake_ack(ctx: &TcContext, seg: &Seg, key: &ConnKey) -> i32 {
    if !seg.ack || seg.rst {
        return NEXT;
    }
    let hs = match HANDSHAKES.get_ptr(key) {
        // SAFETY: a copy is taken at once; a concurrent SYN-ACK rewrite is harmless.
        Some(h) => unsafe { *h },
        None => return NEXT,
    };
    if seg.ack_seq != hs.server_isn.wrapping_add(1) {
        return NEXT;
    }
    let _ = HANDSHAKES.remove(key);
    let (cfg, now_ns) = (config(), now());
    let Some(conn) = maps::scratch_conn(&cfg, now_ns, hs.client_base, hs.server_isn) else {
        return NEXT;
    };
    apply_pass_cache(key, conn, &cfg, now_ns);
    let mut act = NEXT;
    if seg.payload_len > 0 {
        act = client_data(ctx, seg, key, conn, &cfg, now_ns);
    }
    if seg.fin {
        conn.flags |= ConnFlags::CLIENT_FIN.bits();
    }
    if !maps::track(key, conn) {
        // Untracked from here on: fail open rather than hold a client forever.
        return NEXT;
    }
    act
}

#[classifier]
pub fn et_egress(ctx: TcContext) -> i32 {
    egress(&ctx)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).mark } == REPLY_MARK {
        // The agent's reply to a denied client.
        return NEXT;
    }
    let Some(seg) = parse(ctx, Dir::Egress) else {
        return NEXT;
    };
    let key = seg.key(Dir::Egress);
    if seg.syn {
        if seg.ack {
            egress_synack(&seg, &key);
        }
        return NEXT;
    }
    // The MTA's bare ACKs (half of its segments during DATA) need no state, nor
    // do its replies once the session is under way (only FIN and RST can then
    // matter, to report the end of a connection tracked for defer-reject). The
    // socket is at hand on egress for local MTAs; routed traffic has none.
    if !seg.fin && !seg.rst {
        if seg.payload_len == 0 {
            return NEXT;
        }
        // SAFETY: reading a field of the context the kernel handed us.
        let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
        if !sk.is_null() && session_under_way(sk) {
            return NEXT;
        }
    }
    match conn_mut(&key) {
        Some(conn) => egress_tracked(&seg, &key, conn),
        None => NEXT,
    }
}

/// The server's SYN-ACK: remember the half-open connection.
#[inline(always)]
fn egress_synack(seg: &Seg, key: &ConnKey) {
    match conn_mut(key) {
        // TFO connections are tracked from their SYN; learn the ISN now.
        Some(c) => c.server_isn = seg.seq,
        None => {
            if maps::allowlisted(&key.client_addr) {
                return;
            }
            let hs = Handshake {
                server_isn: seg.seq,
                client_base: seg.ack_seq,
            };
            let _ = HANDSHAKES.insert(key, hs, 0);
            stat(Stat::Handshakes);
        }
    }
}

/// A server segment of a tracked connection: the greeting is held until the
/// release time, then let through with the verdict.
#[inline(always)]
fn egress_tracked(seg: &Seg, key: &ConnKey, conn: &mut Conn) -> i32 {
    if let Some(act) = settled(seg, key, conn, Reason::ServerRst, Reason::ServerFin) {
        return act;
    }
    let now_ns = now();
    let cfg = config();
    if seg.payload_len > 0 {
        if now_ns < conn.release_ns {
            // Hold: TCP keeps the segment queued and retries every ~500 ms.
            set_flags(conn, ConnFlags::HELD);
            stat(Stat::HoldDrops);
            return TC_ACT_SHOT;
        }
        let kept = verdict(key, conn, Reason::Greeting, now_ns, &cfg);
        // The greeting and the MTA's close in one segment (it read the early
        // bytes and the client's FIN, answered and closed while the greeting
        // was held, and TCP sent it all at once): this segment is also the end.
        if kept && (seg.fin || seg.rst) {
            settled(seg, key, conn, Reason::ServerRst, Reason::ServerFin);
        }
        return NEXT;
    }
    if seg.rst {
        let _ = verdict(key, conn, Reason::ServerRst, now_ns, &cfg);
    } else if seg.fin {
        let _ = verdict(key, conn, Reason::ServerFin, now_ns, &cfg);
    }
    NEXT
}

/// Whether this TCP socket's session is under way: the client acknowledged payload
/// (a passive open's bytes_acked counts no SYN) and the MTA received some. Both
/// hold only once a greeting went out and the client answered it: a denied
/// client never gets a byte to the MTA, even if its ACK of our reply is taken
/// by the MTA's socket for an ACK of the held greeting.
#[inline(always)]
fn session_under_way(sk: *mut bpf_sock) -> bool {
    // SAFETY: sk is the socket the kernel attached to this skb; bpf_tcp_sock
    // returns NULL unless it is a full TCP socket.
    let tp = unsafe { bpf_tcp_sock(sk) };
    // SAFETY: non-NULL result of bpf_tcp_sock, valid for this run.
    !tp.is_null() && unsafe { (*tp).bytes_acked > 0 && (*tp).bytes_received > 0 }
}

/// An empty classifier: the floor the benchmark measures the others against
/// (same object, same attach point, same run). The agent never loads it.
#[classifier]
pub fn et_floor(_ctx: TcContext) -> i32 {
    NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
