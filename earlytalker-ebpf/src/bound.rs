//! The benchmark's lower bound, never loaded by the agent: the least that any
//! design keeping per-connection state in a map must do, on maps of its own.
//! Every segment is parsed and checked against a counting filter (a client
//! segment that hits it updates its entry); one entry is inserted at the
//! SYN-ACK and deleted at the greeting. No hold, no verdict record, no clock,
//! no configuration, no allowlist or pass cache. `cargo xtask bench` runs it
//! side by side with an empty program, as it does `et_ingress` and `et_egress`.

use crate::{
    maps::{filter_add, filter_hit, scratch_conn},
    parse::{parse, Dir},
    session_under_way, NEXT,
};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use earlytalker_common::{Config, Conn, ConnKey, TRACKED_ADD, TRACKED_SUB};

/// Sized by the bench as CONNS and TRACKED are by the agent (one entry here,
/// so that the agent's copy of the object costs nothing).
#[map(name = "LB_CONNS")]
static LB_CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(1, 0);

#[map(name = "LB_FILTER")]
static LB_FILTER: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[classifier]
#[inline(always)]
pub fn et_lb_ingress(ctx: TcContext) -> i32 {
    let Some(seg) = parse(&ctx, Dir::Ingress) else {
        return NEXT;
    };
    if !filter_hit(&LB_FILTER, seg.bucket(Dir::Ingress)) {
        return NEXT;
    }
    if let Some(c) = LB_CONNS.get_ptr_mut(seg.key(Dir::Ingress)) {
        // SAFETY: a map value, valid for this program run.
        unsafe { (*c).client_end = seg.seq };
    }
    NEXT
}

#[classifier]
#[inline(always)]
pub fn et_lb_egress(ctx: TcContext) -> i32 {
    let Some(seg) = parse(&ctx, Dir::Egress) else {
        return NEXT;
    };
    let (key, bucket) = (seg.key(Dir::Egress), seg.bucket(Dir::Egress));
    if seg.syn {
        if seg.ack {
            if let Some(c) = scratch_conn(&Config::default(), 0, seg.ack_seq, seg.seq) {
                filter_add(&LB_FILTER, bucket, TRACKED_ADD);
                if LB_CONNS.insert(key, c, u64::from(BPF_NOEXIST)).is_err() {
                    filter_add(&LB_FILTER, bucket, TRACKED_SUB);
                }
            }
        }
        return NEXT;
    }
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
    if !filter_hit(&LB_FILTER, bucket) {
        return NEXT;
    }
    // The greeting (or the end): looked up first, as a real design reads its
    // entry before it forgets it.
    if LB_CONNS.get_ptr(key).is_some() && LB_CONNS.remove(key).is_ok() {
        filter_add(&LB_FILTER, bucket, TRACKED_SUB);
    }
    NEXT
}
