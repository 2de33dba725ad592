//! PROXY protocol ports: behind a balancer, the client's byte stream starts
//! with the balancer's header naming the real client. That header is not early
//! talk. The kernel finds only its length (v1: up to its CRLF; v2: 16 bytes
//! plus its length field), hands its bytes to the agent through the ring
//! buffer (the agent parses the addresses), and judges what follows it.

use crate::{
    conn::{set_flags, verdict},
    maps::{stat, EVENTS},
    parse::{load_payload, seq_after, Seg},
};
use aya_ebpf::{bindings::BPF_RB_FORCE_WAKEUP, programs::TcContext};
use earlytalker_common::{
    Config, Conn, ConnFlags, ConnKey, EventKind, ProxyRecord, Reason, Stat, PROXY_MAX, PROXY_V2_SIG,
};

/// v1's longest header, CRLF included.
const V1_MAX: usize = 107;

pub enum Step {
    /// The segment's bytes beyond the header (possibly none): client data.
    Rest(Seg),
    /// Header bytes already taken (a retransmission), or bytes that cannot be
    /// taken yet (out of order, or no room in the ring buffer): not early talk.
    Old,
    /// No PROXY header where one must be: the verdict is out.
    Bad,
}

/// A client segment with payload, on a PROXY protocol port.
#[inline(always)]
pub fn step(
    ctx: &TcContext,
    seg: &Seg,
    key: &ConnKey,
    conn: &mut Conn,
    cfg: &Config,
    now_ns: u64,
) -> Step {
    if conn.has(ConnFlags::PROXIED) {
        let header_end = conn.client_base.wrapping_add(u32::from(conn.proxy_len));
        if !seq_after(seg.seq.wrapping_add(seg.payload_len), header_end) {
            return Step::Old;
        }
        if seq_after(header_end, seg.seq) {
            return Step::Rest(seg.skip(header_end.wrapping_sub(seg.seq)));
        }
        return Step::Rest(*seg);
    }
    if seg.seq != conn.client_base {
        // The stream's first bytes are missing: the balancer sends them again.
        return Step::Old;
    }
    let Some(mut rec) = EVENTS.reserve::<ProxyRecord>(0) else {
        // Taken at the balancer's next try.
        stat(Stat::EventsLost);
        return Step::Old;
    };
    let r = rec.as_mut_ptr();
    // SAFETY: the reserved slot is ours until submit or discard.
    let n = load_payload(ctx, seg, unsafe { &mut (*r).header });
    if n == 0 {
        rec.discard(0);
        return Step::Old;
    }
    // SAFETY: as above; the header bytes were just written.
    let len = header_len(unsafe { &(*r).header }, n);
    if len == 0 || len > n {
        // Not a header, or one split across segments (a balancer writes it
        // whole): the MTA would drop the connection.
        rec.discard(0);
        let _ = verdict(key, conn, Reason::BadProxyHeader, now_ns, cfg);
        return Step::Bad;
    }
    conn.proxy_len = len as u16;
    set_flags(conn, ConnFlags::PROXIED);
    // SAFETY: as above.
    unsafe {
        (*r).event.kind = EventKind::Proxied as u32;
        (*r).event.reason = Reason::None as u32;
        (*r).event.now_ns = now_ns;
        (*r).event.key = *key;
        (*r).event.conn = *conn;
        (*r).len = len;
        (*r).pad = 0;
    }
    // The agent decides at once whether the real client is held.
    rec.submit(u64::from(BPF_RB_FORCE_WAKEUP));
    stat(Stat::ProxyHeaders);
    Step::Rest(seg.skip(len))
}

/// The length of the PROXY header at the start of `h` (of which `n` bytes are
/// valid), or 0 if it is none. A v1 header not ended within `n` bytes is none;
/// a v2 header may be longer than `n` (the caller checks).
#[inline(always)]
fn header_len(h: &[u8; PROXY_MAX], n: u32) -> u32 {
    if n >= 16 {
        let mut v2 = true;
        for (i, b) in PROXY_V2_SIG.iter().enumerate() {
            if h[i] != *b {
                v2 = false;
            }
        }
        // Version 2 in the high nibble.
        if v2 {
            return if h[12] >> 4 == 2 {
                16 + ((u32::from(h[14]) << 8) | u32::from(h[15]))
            } else {
                0
            };
        }
    }
    if n < 8 {
        return 0;
    }
    for (i, b) in b"PROXY ".iter().enumerate() {
        if h[i] != *b {
            return 0;
        }
    }
    for i in 7..V1_MAX {
        if i as u32 >= n {
            return 0;
        }
        if h[i] == b'\n' {
            return if h[i - 1] == b'\r' { i as u32 + 1 } else { 0 };
        }
    }
    0
}
