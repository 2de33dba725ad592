//! The penalty box, at XDP (attached only when a penalty is configured): a SYN
//! to a watched port from an address the agent put in the box is answered with
//! a RST built here in place of the SYN and sent back out (XDP_TX), or dropped,
//! so the MTA's listen queue never sees it. The allowlist wins. Anything else
//! passes untouched after the same bounded parse as the TC programs.

use crate::{
    maps::{self, config, now, stat},
    parse::{addr_bytes, parse, Dir, Frame, Seg},
};
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_xdp_adjust_tail,
    macros::xdp,
    programs::XdpContext,
};
use earlytalker_common::{CfgFlags, Stat};

#[xdp]
pub fn et_xdp(ctx: XdpContext) -> u32 {
    refuse(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn refuse(ctx: &XdpContext) -> Option<u32> {
    let seg = parse(ctx, Dir::Ingress)?;
    if !seg.syn || seg.ack {
        return None;
    }
    let addr = addr_bytes(seg.src);
    if !maps::penalized(&addr, now()) || maps::allowlisted(&addr) {
        return None;
    }
    stat(Stat::PenaltyRefused);
    if config().has(CfgFlags::PENALTY_DROP) {
        return Some(XDP_DROP);
    }
    // A SYN this code cannot turn around (IP options, IPv6 extension
    // headers) is dropped instead.
    Some(reset(ctx, &seg).unwrap_or(XDP_DROP))
}

#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    crate::parse::ptr_at::<T, XdpContext>(ctx, off).map(|p| p.cast_mut())
}

/// Folds a one's-complement sum to the 16-bit checksum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the big-endian 16-bit words of `b`.
#[inline(always)]
fn words<const N: usize>(b: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

/// Turns the SYN into the RST|ACK a closed port would send: addresses and
/// ports swapped, ack = SYN's seq + 1, no options, no payload.
#[inline(always)]
fn reset(ctx: &XdpContext, seg: &Seg) -> Option<u32> {
    let ip_len = if seg.v6 { 40 } else { 20 };
    if seg.tcp_off != seg.ip_off + ip_len {
        return None;
    }
    let want = seg.tcp_off + 20;
    let have = ctx.end() - ctx.start();
    if have < want {
        return None;
    }
    if have > want {
        // SAFETY: shrinking the frame the kernel handed us; every pointer is
        // derived again (and bounds-checked) below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - want) as i32)) } != 0 {
            return None;
        }
    }
    let eth: *mut [u8; 12] = at(ctx, 0)?;
    // SAFETY: bounds checked by `at`; the frame is ours to rewrite.
    let eth = unsafe { &mut *eth };
    for i in 0..6 {
        eth.swap(i, i + 6);
    }
    let tcp: *mut [u8; 20] = at(ctx, seg.tcp_off)?;
    // SAFETY: as above.
    let tcp = unsafe { &mut *tcp };
    let pseudo = if seg.v6 {
        let ip: *mut [u8; 40] = at(ctx, seg.ip_off)?;
        // SAFETY: as above.
        let ip = unsafe { &mut *ip };
        for i in 8..24 {
            ip.swap(i, i + 16);
        }
        ip[4] = 0;
        ip[5] = 20; // payload length
        ip[6] = 6; // next header: TCP
        ip[7] = 64; // hop limit
        let mut addrs = [0u8; 32];
        addrs.copy_from_slice(&ip[8..40]);
        words(&addrs)
    } else {
        let ip: *mut [u8; 20] = at(ctx, seg.ip_off)?;
        // SAFETY: as above.
        let ip = unsafe { &mut *ip };
        for i in 12..16 {
            ip.swap(i, i + 4);
        }
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2] = 0;
        ip[3] = 40; // total length
        ip[4] = 0;
        ip[5] = 0; // id
        ip[6] = 0x40;
        ip[7] = 0; // don't fragment
        ip[8] = 64; // ttl
        ip[10] = 0;
        ip[11] = 0;
        let c = fold(words(ip)).to_be_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
        let mut addrs = [0u8; 8];
        addrs.copy_from_slice(&ip[12..20]);
        words(&addrs)
    };
    let (sport, dport) = ([tcp[0], tcp[1]], [tcp[2], tcp[3]]);
    tcp[0..2].copy_from_slice(&dport);
    tcp[2..4].copy_from_slice(&sport);
    tcp[4..8].copy_from_slice(&[0; 4]);
    tcp[8..12].copy_from_slice(&seg.seq.wrapping_add(1).to_be_bytes());
    tcp[12] = 5 << 4; // 20-byte header
    tcp[13] = 0x14; // RST | ACK
    tcp[14..20].copy_from_slice(&[0; 6]); // window, checksum, urgent pointer
    let c = fold(pseudo + 6 + 20 + words(tcp)).to_be_bytes();
    tcp[16] = c[0];
    tcp[17] = c[1];
    Some(XDP_TX)
}

/// An empty XDP program: the bench's floor for `et_xdp`, and, on the far end of
/// a veth in the tests, what makes that end receive XDP_TX frames (a veth hands
/// them only to a peer that runs NAPI). The agent never loads it.
#[xdp]
pub fn et_xdp_floor(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
