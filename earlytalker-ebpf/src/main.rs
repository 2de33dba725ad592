//! earlytalker's kernel side: two TC programs on each monitored interface.
//!
//! * egress (server -> client): remembers SYN-ACKs (and whether the server
//!   answered with a SYN cookie), and reports the greeting or the end;
//! * ingress (client -> server): withholds the handshake's last ACK for `wait`, so
//!   the server keeps a request socket (or a cookie) that the MTA cannot accept;
//!   every client ACK until the release is withheld too. The agent completes the
//!   handshake at the release time with an ACK it forges from the client. Client
//!   bytes before that are early talk: denied (dropped; the agent answers and
//!   resets the request socket) or let through, which completes the handshake.
//!
//! With a penalty configured, a third program (`xdp`) refuses boxed clients'
//! SYNs at XDP.
//!
//! Only TCP whose server port is in PORTS is looked at; everything else leaves
//! after a glance at the port (a few loads at fixed offsets). A segment of a
//! connection in neither map leaves after one more load (the TRACKED filter).
//! No payload is parsed: at most the first 64 client bytes are copied, and the
//! TCP options of SYNs, SYN-ACKs and held ACKs are read.
//!
//! Stages: `parse` (headers, options), `maps` (maps, the filter, counters,
//! configuration), `conn` (a connection's life), `emit` (records for the agent),
//! `xdp` (the penalty box), `proxy` (a PROXY header's length), `bound` (the
//! bench's lower bound, never loaded by the agent); this file only dispatches
//! each segment by direction and kind. Types and numbers shared with the agent
//! come from earlytalker-common.
#![no_std]
#![no_main]
// Atomic fetch-or on map values (BPF ISA v3); core exposes no atomic types here.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bound;
mod conn;
mod emit;
mod maps;
mod parse;
mod proxy;
mod xdp;

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_tcp_sock,
    macros::classifier,
    programs::TcContext,
};
use conn::{apply_pass_cache, client_data, set_flags, settled, verdict};
use earlytalker_common::{
    CfgFlags, Config, Conn, ConnFlags, ConnKey, EventKind, Handshake, Reason, Stat, REPLY_MARK,
    TAIL_PROXY,
};
use emit::emit;
use maps::{config, conn_mut, maybe_tracked, now, stat, Track, CONNS, HANDSHAKES, TAILS};
use parse::{parse, Dir, Opts, Seg};

/// "No opinion": TCX_NEXT. TC_ACT_OK would be TCX_PASS, which ends the TCX chain
/// and silently skips every program attached after ours (a firewall, say).
/// When no later program decides, the packet passes.
pub const NEXT: i32 = TC_ACT_UNSPEC;

/// After the release time, the client's bare ACKs are still withheld this long:
/// the agent's release (re-sent for up to ~0.6 s if lost) completes the
/// handshake; after that the client's own ACKs may (fail open).
const RELEASE_GRACE_NS: u64 = 1_000_000_000;

#[classifier]
#[inline(always)]
pub fn et_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    let Some(seg) = parse(ctx, Dir::Ingress) else {
        return NEXT;
    };
    let tracked = maybe_tracked(seg.bucket(Dir::Ingress));
    // The clock and the config are read only on the paths that use them: most
    // segments of a watched port need nothing but the filter's answer.
    if !tracked && !seg.syn {
        // In neither map: a session under way, or older than the agent.
        return NEXT;
    }
    let key = seg.key(Dir::Ingress);
    if seg.syn {
        return ingress_syn(ctx, &seg, &key, tracked);
    }
    if let Some(conn) = conn_mut(&key) {
        return dispatch(ctx, &seg, &key, conn);
    }
    ingress_handshake_ack(ctx, &seg, &key)
}

/// A tracked connection's client segment. Bytes from a balancer on a PROXY
/// protocol port go to `et_ingress_proxy`, which finds the header's end: that
/// scan is verified once, in its own program, not on every path here.
#[inline(always)]
fn dispatch(ctx: &TcContext, seg: &Seg, key: &ConnKey, conn: &mut Conn) -> i32 {
    if seg.payload_len > 0 && conn.has(ConnFlags::PROXY_PORT) {
        // SAFETY: ctx is this program's context; TAILS holds et_ingress_proxy.
        unsafe { TAILS.tail_call(ctx, TAIL_PROXY) };
        // Not there (the agent did not install it): let the MTA have it.
        return NEXT;
    }
    ingress_tracked::<false>(ctx, seg, key, conn)
}

/// The tail of `et_ingress` for a balancer's bytes on a PROXY protocol port.
#[classifier]
pub fn et_ingress_proxy(ctx: TcContext) -> i32 {
    let Some(seg) = parse(&ctx, Dir::Ingress) else {
        return NEXT;
    };
    let key = seg.key(Dir::Ingress);
    match conn_mut(&key) {
        Some(conn) => ingress_tracked::<true>(&ctx, &seg, &key, conn),
        None => NEXT,
    }
}

/// A client's SYN: a new connection on this 4-tuple, or TCP Fast Open data. A
/// client whose SYN carries data talked before any greeting: an early talker.
/// (TFO would also let the server accept it at once, past the hold.)
#[inline(always)]
fn ingress_syn(ctx: &TcContext, seg: &Seg, key: &ConnKey, tracked: bool) -> i32 {
    if seg.ack {
        return NEXT;
    }
    // Forget any stale (e.g. denied) connection on this 4-tuple. Looked up
    // first: a lookup takes no lock, a delete does, even on a miss.
    if tracked && CONNS.get_ptr(key).is_some() {
        maps::untrack(key);
    }
    if seg.payload_len == 0 {
        return NEXT;
    }
    if maps::allowlisted(&key.client_addr) {
        return NEXT;
    }
    stat(Stat::SynData);
    let cfg = config();
    if cfg.has(CfgFlags::ENFORCE) {
        // Under enforcement: drop the SYN so no byte reaches the MTA; the
        // client falls back to a plain SYN, is held, and its data, sent again
        // after the handshake, is early like any other.
        return TC_ACT_SHOT;
    }
    let now_ns = now();
    // Logged: the client talked in its very first packet; the MTA gets it as
    // sent (at once if it accepts TFO), and it is never held.
    let Some(conn) = maps::scratch_conn(&cfg, now_ns, seg.seq.wrapping_add(1), 0) else {
        return NEXT;
    };
    conn.flags |= ConnFlags::SYN_DATA.bits();
    client_data(ctx, seg, key, conn, &cfg, now_ns);
    // The SYN flag itself takes one sequence number before the data.
    conn.client_end = conn.client_base.wrapping_add(seg.payload_len);
    let _ = maps::track(key, conn);
    NEXT
}

/// A client segment of a tracked connection; PROXY: on a PROXY protocol port,
/// where the balancer's header comes first.
#[inline(always)]
fn ingress_tracked<const PROXY: bool>(
    ctx: &TcContext,
    seg: &Seg,
    key: &ConnKey,
    conn: &mut Conn,
) -> i32 {
    if let Some(act) = settled(seg, key, conn, Reason::ClientRst, Reason::ClientFin) {
        return act;
    }
    let now_ns = now();
    let cfg = config();
    if seg.rst {
        // Let through: it ends the request socket too.
        let _ = verdict(key, conn, Reason::ClientRst, now_ns, &cfg);
        return NEXT;
    }
    if conn.before_accept() {
        if now_ns < conn.release_ns {
            return ingress_held::<PROXY>(ctx, seg, key, conn, &cfg, now_ns);
        }
        if seg.payload_len == 0
            && !seg.fin
            && now_ns < conn.release_ns.saturating_add(RELEASE_GRACE_NS)
        {
            // The agent's ACK completes the handshake. A client ACK now (its
            // answer to the SYN-ACK the release provokes) would complete it
            // first and echo the first SYN-ACK's timestamp, seeding the
            // socket's RTT with the whole hold.
            stat(Stat::HoldDrops);
            return TC_ACT_SHOT;
        }
        // Past that, the client's own segments complete the handshake (if
        // the agent's release never came).
        set_flags(conn, ConnFlags::OPENED);
    }
    unheld::<PROXY>(ctx, seg, key, conn, &cfg, now_ns)
}

/// A client segment that reaches the server: its bytes before the greeting are
/// early talk; its FIN is noted.
#[inline(always)]
fn unheld<const PROXY: bool>(
    ctx: &TcContext,
    seg: &Seg,
    key: &ConnKey,
    conn: &mut Conn,
    cfg: &Config,
    now_ns: u64,
) -> i32 {
    let mut act = NEXT;
    if seg.payload_len > 0 {
        let data = if PROXY && conn.has(ConnFlags::PROXY_PORT) {
            match proxy::step(ctx, seg, key, conn, cfg, now_ns) {
                proxy::Step::Rest(rest) => Some(rest),
                // A repeated header, or (Bad) bytes the MTA drops itself.
                _ => None,
            }
        } else {
            Some(*seg)
        };
        if let Some(data) = data.filter(|d| d.payload_len > 0) {
            act = client_data(ctx, &data, key, conn, cfg, now_ns);
        }
    }
    if seg.fin {
        set_flags(conn, ConnFlags::CLIENT_FIN);
    }
    act
}

/// A client segment while its connection is held before the MTA accepted it.
#[inline(always)]
fn ingress_held<const PROXY: bool>(
    ctx: &TcContext,
    seg: &Seg,
    key: &ConnKey,
    conn: &mut Conn,
    cfg: &Config,
    now_ns: u64,
) -> i32 {
    if seg.payload_len > 0 {
        let mut data = *seg;
        if PROXY && conn.has(ConnFlags::PROXY_PORT) {
            match proxy::step(ctx, seg, key, conn, cfg, now_ns) {
                proxy::Step::Rest(rest) if rest.payload_len > 0 => data = rest,
                proxy::Step::Bad => return TC_ACT_SHOT,
                // The balancer's header alone: still held (the agent's release
                // carries the header to the MTA).
                _ => {
                    note_client_ack(ctx, seg, conn);
                    stat(Stat::HoldDrops);
                    return TC_ACT_SHOT;
                }
            }
        }
        let act = client_data(ctx, &data, key, conn, cfg, now_ns);
        if act != NEXT {
            // Denied: the MTA never sees the connection.
            return act;
        }
        // Logged (or PIPECONNECT): the bytes reach the MTA as they were sent,
        // and their segment completes the handshake.
        set_flags(conn, ConnFlags::OPENED);
        if seg.fin {
            set_flags(conn, ConnFlags::CLIENT_FIN);
        }
        return NEXT;
    }
    if seg.fin {
        // The client gave up before its greeting: the MTA never hears of it
        // (the agent resets the request socket and answers the client's FIN).
        set_flags(conn, ConnFlags::CLIENT_FIN);
        let _ = verdict(key, conn, Reason::ClientFin, now_ns, cfg);
        return TC_ACT_SHOT;
    }
    // An ACK (to a retransmitted SYN-ACK, say): withheld, and remembered for
    // the agent's release ACK.
    note_client_ack(ctx, seg, conn);
    stat(Stat::HoldDrops);
    TC_ACT_SHOT
}

/// The client's window and timestamp, as the release ACK must carry them.
#[inline(always)]
fn note_client_ack(ctx: &TcContext, seg: &Seg, conn: &mut Conn) {
    conn.client_win = parse::window(ctx, seg);
    if let Some((tsval, _)) = Opts::of(seg).timestamps(ctx) {
        conn.client_ts = tsval;
        // Atomic: egress may set flags on the same entry at once.
        set_flags(conn, ConnFlags::CLIENT_TS);
    }
}

/// An untracked client segment: tracking starts with the handshake's last ACK,
/// which acknowledges the server's ISN + 1; anything else (connections older
/// than the agent, stray ACKs) stays untracked. That ACK is withheld for `wait`
/// (unless the client is in the pass cache): the hold.
#[inline(always)]
fn ingress_handshake_ack(ctx: &TcContext, seg: &Seg, key: &ConnKey) -> i32 {
    if seg.rst {
        // A client (a port scanner, say) refusing the SYN-ACK: the handshake
        // is over; its entry would only linger until evicted.
        maps::remove_handshake(key);
        return NEXT;
    }
    if !seg.ack {
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
    // Two segments acknowledging the SYN-ACK (the ACK and a bot's first
    // bytes right behind it) may get here at once on two CPUs: both go on, and
    // whichever inserts second joins the first one's entry (below).
    maps::remove_handshake(key);
    let (cfg, now_ns) = (config(), now());
    let Some(conn) = maps::scratch_conn(&cfg, now_ns, hs.client_base, hs.server_isn) else {
        return NEXT;
    };
    conn.synack_ts = hs.synack_ts;
    conn.synacks = hs.synacks;
    if hs.cookie != 0 {
        conn.flags |= ConnFlags::COOKIE.bits();
    }
    if maps::proxy_port(key.server_port) {
        // The client is a balancer: its own address has no pass; the real
        // client's is looked up by the agent when the header names it.
        conn.flags |= ConnFlags::PROXY_PORT.bits();
    } else {
        apply_pass_cache(key, conn, &cfg, now_ns);
    }
    if cfg.wait_ns == 0 || conn.has(ConnFlags::PASS_CACHED) {
        // Not held: watched for bytes that race the greeting.
        if seg.payload_len > 0 && conn.has(ConnFlags::PROXY_PORT) {
            // A balancer's header on the ACK: judged once tracked.
            return match maps::track(key, conn) {
                Track::Added | Track::Exists => joined(ctx, seg, key),
                Track::Full => NEXT,
            };
        }
        let act = unheld::<false>(ctx, seg, key, conn, &cfg, now_ns);
        return match maps::track(key, conn) {
            Track::Added => act,
            Track::Exists => joined(ctx, seg, key),
            // Untracked from here on: fail open.
            Track::Full => NEXT,
        };
    }
    conn.flags |= ConnFlags::HELD.bits();
    note_client_ack(ctx, seg, conn);
    match maps::track(key, conn) {
        Track::Added => {}
        Track::Exists => return joined(ctx, seg, key),
        // No room to hold it: let the MTA have it (fail open).
        Track::Full => return NEXT,
    }
    let Some(conn) = conn_mut(key) else {
        return NEXT;
    };
    stat(Stat::Held);
    emit(EventKind::Held, Reason::None, key, conn, now_ns, true);
    // A bot's first bytes (or a balancer's header) may ride on this very ACK.
    if seg.payload_len > 0 && conn.has(ConnFlags::PROXY_PORT) {
        return dispatch(ctx, seg, key, conn);
    }
    ingress_held::<false>(ctx, seg, key, conn, &cfg, now_ns)
}

/// The other CPU's entry for this connection won the insertion: this
/// segment is one of its segments.
#[inline(always)]
fn joined(ctx: &TcContext, seg: &Seg, key: &ConnKey) -> i32 {
    match conn_mut(key) {
        Some(conn) => dispatch(ctx, seg, key, conn),
        None => NEXT,
    }
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
    // SAFETY: reading a field of the context the kernel handed us.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    let tracked = || maybe_tracked(seg.bucket(Dir::Egress));
    let key = seg.key(Dir::Egress);
    if seg.syn {
        if seg.ack {
            egress_synack(ctx, &seg, &key, sk.is_null(), tracked());
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
        if !sk.is_null() && session_under_way(sk) {
            return NEXT;
        }
    }
    if !tracked() {
        return NEXT;
    }
    match conn_mut(&key) {
        Some(conn) => egress_tracked(&seg, &key, conn),
        None => NEXT,
    }
}

/// The server's SYN-ACK: remember the half-open connection. A SYN cookie's
/// SYN-ACK belongs to no socket (the kernel does not attach one under a SYN
/// flood); a request socket's does.
#[inline(always)]
fn egress_synack(ctx: &TcContext, seg: &Seg, key: &ConnKey, cookie: bool, tracked: bool) {
    let mut stale = None;
    if tracked {
        if let Some(c) = conn_mut(key) {
            if c.has(ConnFlags::SYN_DATA) && c.synacks == 0 {
                // Tracked from its SYN (TFO): learn the ISN now.
                c.server_isn = seg.seq;
            }
            // A held request socket retransmits its SYN-ACK.
            c.synacks = c.synacks.saturating_add(1);
            return;
        }
        if let Some(h) = HANDSHAKES.get_ptr_mut(key) {
            // SAFETY: map value valid for this run; a lost count only means one
            // retransmission fewer counted.
            let h = unsafe { &mut *h };
            if h.server_isn == seg.seq {
                h.synacks = h.synacks.saturating_add(1);
                return;
            }
            stale = Some(h);
        }
    }
    if maps::allowlisted(&key.client_addr) {
        return;
    }
    let ts = Opts::of(seg).timestamps(ctx);
    let hs = Handshake {
        server_isn: seg.seq,
        client_base: seg.ack_seq,
        synack_ts: ts.map_or(0, |t| t.0),
        synacks: 1,
        cookie: u16::from(cookie),
    };
    match stale {
        // A new handshake on the 4-tuple of one never completed: rewritten in
        // place, so the entry stays counted once.
        Some(h) => *h = hs,
        None => {
            if !maps::add_handshake(key, &hs) {
                return;
            }
        }
    }
    stat(Stat::Handshakes);
}

/// A server segment of a tracked connection: the greeting (the verdict), or
/// the end of the connection.
#[inline(always)]
fn egress_tracked(seg: &Seg, key: &ConnKey, conn: &mut Conn) -> i32 {
    if let Some(act) = settled(seg, key, conn, Reason::ServerRst, Reason::ServerFin) {
        return act;
    }
    let now_ns = now();
    let cfg = config();
    if seg.payload_len > 0 {
        let kept = verdict(key, conn, Reason::Greeting, now_ns, &cfg);
        // The greeting and the MTA's close in one segment (it read the early
        // bytes and the client's FIN, answered and closed at once): this
        // segment is also the end.
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
pub(crate) fn session_under_way(sk: *mut bpf_sock) -> bool {
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
