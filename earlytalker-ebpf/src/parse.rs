//! Bounded L2/L3/L4 parsing: Ethernet (up to two VLAN tags), IPv4 or IPv6 (up to
//! four extension headers), TCP. No payload is parsed.

use crate::maps::port_watched;
use aya_ebpf::programs::{TcContext, XdpContext};
use earlytalker_common::{tracked_bucket, ConnKey};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const VLAN_HLEN: usize = 4;

/// Which end of the segment is the watched server port.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server: the destination port is watched.
    Ingress,
    /// Server to client: the source port is watched.
    Egress,
}

/// A parsed TCP segment; ports in host order, addresses as in ConnKey (kept as
/// words: byte arrays merged across the IPv4/IPv6 paths compile to per-byte moves).
#[derive(Clone, Copy)]
pub struct Seg {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    /// Offset of the IP header, and whether it is IPv6.
    pub ip_off: usize,
    pub v6: bool,
    /// Offset of the TCP header from the start of the packet.
    pub tcp_off: usize,
    /// Length of the TCP options (the header beyond its 20 fixed bytes).
    pub opt_len: u32,
    /// Offset of the TCP payload from the start of the packet.
    pub payload_off: usize,
    pub payload_len: u32,
}

impl Seg {
    /// The same segment without its first `n` payload bytes (n <= payload_len).
    #[inline(always)]
    pub fn skip(&self, n: u32) -> Seg {
        let mut s = *self;
        s.payload_off += n as usize;
        s.payload_len -= n;
        s.seq = s.seq.wrapping_add(n);
        s
    }

    /// The connection's key, the client being the source on ingress.
    #[inline(always)]
    pub fn key(&self, dir: Dir) -> ConnKey {
        let (client, server, cport, sport) = match dir {
            Dir::Ingress => (self.src, self.dst, self.sport, self.dport),
            Dir::Egress => (self.dst, self.src, self.dport, self.sport),
        };
        ConnKey {
            client_addr: addr_bytes(client),
            server_addr: addr_bytes(server),
            client_port: cport,
            server_port: sport,
            pad: 0,
        }
    }
}

impl Seg {
    /// The connection's TRACKED bucket (as `ConnKey::bucket`).
    #[inline(always)]
    pub fn bucket(&self, dir: Dir) -> u32 {
        match dir {
            Dir::Ingress => tracked_bucket(self.src, self.sport, self.dport),
            Dir::Egress => tracked_bucket(self.dst, self.dport, self.sport),
        }
    }
}

/// A packet the parser can read: a TC skb or an XDP frame.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet's length (beyond the linear part for an skb).
    fn total_len(&self) -> u32;
    /// Whether `parse` first glances at the server port. TC only: on XDP,
    /// LLVM narrowed the glance's 32-bit `data_end` into a plain number,
    /// which the verifier rejects as a packet bound.
    const GLANCE: bool;
}

impl Frame for TcContext {
    const GLANCE: bool = true;
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn total_len(&self) -> u32 {
        self.len()
    }
}

impl Frame for XdpContext {
    const GLANCE: bool = false;
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn total_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

#[inline(always)]
pub fn ptr_at<T, F: Frame>(ctx: &F, off: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// IPv4 address (as in the packet) to IPv4-mapped IPv6 (`::ffff:a.b.c.d`), as words.
#[inline(always)]
fn mapped(a: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), a]
}

/// Address words back to the bytes ConnKey stores: the same 16 bytes in memory.
#[inline(always)]
pub fn addr_bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is valid for both.
    unsafe { core::mem::transmute(w) }
}

/// Copies the first bytes of the segment's payload, at most N, into `dst`:
/// how many, or 0 if none could be.
#[inline(always)]
pub fn load_payload<const N: usize>(ctx: &TcContext, seg: &Seg, dst: &mut [u8; N]) -> u32 {
    // Volatile read: LLVM must not reuse what it proved about payload_len earlier,
    // or it drops the checks below that the verifier needs for the length argument.
    // SAFETY: reading a local field.
    let plen = unsafe { core::ptr::read_volatile(&seg.payload_len) };
    let n = if plen > N as u32 { N as u32 } else { plen };
    if n == 0 || n > N as u32 {
        return 0;
    }
    // SAFETY: n is in 1..=N, the size of the destination.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            seg.payload_off as u32,
            dst.as_mut_ptr().cast(),
            n,
        )
    };
    if ret == 0 {
        n
    } else {
        0
    }
}

/// An unaligned word load from the packet (bounds checked by the caller's ptr_at).
#[inline(always)]
fn load<T: Copy>(p: *const T) -> T {
    // SAFETY: the caller checked the bounds; the kernel allows unaligned packet loads.
    unsafe { core::ptr::read_unaligned(p) }
}

/// Sequence-space "a is after b" (RFC 1982 style).
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Returns None for anything that is not a TCP segment we can read the header of
/// (including non-first IP fragments), or whose server port (by `dir`) is not
/// watched: that check comes before any address is copied, so other traffic
/// costs a few loads and one array lookup.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F, dir: Dir) -> Option<Seg> {
    let glanced = if F::GLANCE { glance(ctx, dir) } else { None };
    if glanced == Some(false) {
        return None;
    }
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let mut proto = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = EthHdr::LEN;
    // At most two VLAN tags (802.1ad + 802.1Q); usually offloaded into skb metadata.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let tag: *const [u8; 4] = ptr_at(ctx, off)?;
        // SAFETY: bounds checked by ptr_at.
        proto = be16(unsafe { [(*tag)[2], (*tag)[3]] });
        off += VLAN_HLEN;
    }

    let ip_off = off;
    let (v6, l4_off, l4_len) = match proto {
        ETH_P_IP => {
            let (o, l) = ipv4(ctx, off)?;
            (false, o, l)
        }
        ETH_P_IPV6 => {
            let (o, l) = ipv6(ctx, off)?;
            (true, o, l)
        }
        _ => return None,
    };
    off = l4_off;

    let tcp: *const TcpHdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { &*tcp };
    let sport = be16(tcp.source);
    let dport = be16(tcp.dest);
    // (Already known if the glance saw this header.)
    if glanced.is_none() && !port_watched(if dir == Dir::Ingress { dport } else { sport }) {
        return None;
    }
    let doff = u32::from(tcp.doff()) * 4;
    if doff < 20 || doff > l4_len {
        return None;
    }
    let (src, dst) = if v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ip_off)?;
        // SAFETY: bounds checked by ptr_at; only field addresses are taken here.
        unsafe {
            (
                load((&raw const (*ip).src_addr).cast::<[u32; 4]>()),
                load((&raw const (*ip).dst_addr).cast::<[u32; 4]>()),
            )
        }
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ip_off)?;
        // SAFETY: as above.
        unsafe {
            (
                mapped(load((&raw const (*ip).src_addr).cast::<u32>())),
                mapped(load((&raw const (*ip).dst_addr).cast::<u32>())),
            )
        }
    };
    Some(Seg {
        src,
        dst,
        sport,
        dport,
        seq: be32(tcp.seq),
        ack_seq: be32(tcp.ack_seq),
        syn: tcp.syn() != 0,
        ack: tcp.ack() != 0,
        fin: tcp.fin() != 0,
        rst: tcp.rst() != 0,
        ip_off,
        v6,
        tcp_off: off,
        opt_len: doff - 20,
        payload_off: off + doff as usize,
        payload_len: l4_len - doff,
    })
}

/// Whether the server port (by `dir`) of TCP in an untagged IPv4 packet without
/// options, or an IPv6 packet without extension headers, is watched: most of a
/// relay's traffic is turned away after a few loads at fixed offsets (the full
/// parse cost an unwatched packet a third more than an empty program). None
/// for anything else (VLAN tags, IP options, extension headers, short
/// packets): `parse` checks the port itself. Where this reads a non-first IPv4
/// fragment, `parse` drops it either way.
#[inline(always)]
fn glance<F: Frame>(ctx: &F, dir: Dir) -> Option<bool> {
    // The server port's offset in the TCP header.
    let at = match dir {
        Dir::Ingress => 2,
        Dir::Egress => 0,
    };
    let eth = ptr_at::<EthHdr, F>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let port = match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {
            let h = ptr_at::<[u8; Ipv4Hdr::LEN + 4], F>(ctx, EthHdr::LEN)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            // Version 4, no options; protocol TCP.
            if h[0] != 0x45 || h[9] != IPPROTO_TCP {
                return None;
            }
            be16([h[Ipv4Hdr::LEN + at], h[Ipv4Hdr::LEN + at + 1]])
        }
        ETH_P_IPV6 => {
            let h = ptr_at::<[u8; Ipv6Hdr::LEN + 4], F>(ctx, EthHdr::LEN)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            // Next header TCP: no extension headers.
            if h[6] != IPPROTO_TCP {
                return None;
            }
            be16([h[Ipv6Hdr::LEN + at], h[Ipv6Hdr::LEN + at + 1]])
        }
        _ => return None,
    };
    Some(port_watched(port))
}

/// IPv4 header at `off`: (offset of the TCP header, bytes from there on).
#[inline(always)]
fn ipv4<F: Frame>(ctx: &F, off: usize) -> Option<(usize, u32)> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.proto != IPPROTO_TCP {
        return None;
    }
    // Fragment offset != 0: no TCP header here.
    if be16(ip.frags) & 0x1fff != 0 {
        return None;
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return None;
    }
    let tot = u32::from(be16(ip.tot_len));
    // tot_len 0 is BIG TCP (> 64 KiB); fall back to the skb length.
    let tot = if tot == 0 {
        ctx.total_len().saturating_sub(off as u32)
    } else {
        tot
    };
    Some((off + ihl, tot.saturating_sub(ihl as u32)))
}

/// IPv6 header at `off`, with up to four extension headers (hop-by-hop, routing,
/// destination options; a fragment header ends the walk unless it is the first
/// fragment): (offset of the TCP header, bytes from there on).
#[inline(always)]
fn ipv6<F: Frame>(ctx: &F, mut off: usize) -> Option<(usize, u32)> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let mut next = ip.next_hdr;
    let mut plen = u32::from(be16(ip.payload_len));
    if plen == 0 {
        plen = ctx.total_len().saturating_sub((off + Ipv6Hdr::LEN) as u32);
    }
    off += Ipv6Hdr::LEN;
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let h: *const [u8; 2] = ptr_at(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { *h };
                let len = (usize::from(h[1]) + 1) * 8;
                next = h[0];
                off += len;
                plen = plen.saturating_sub(len as u32);
            }
            44 => {
                let h: *const [u8; 4] = ptr_at(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { *h };
                if be16([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                off += 8;
                plen = plen.saturating_sub(8);
            }
            _ => break,
        }
    }
    if next != IPPROTO_TCP {
        return None;
    }
    Some((off, plen))
}

const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_TS: u8 = 8;
/// Options looked at before the timestamp: stacks put it first (NOP NOP TS)
/// or after MSS and SACK-permitted, so five cover them all, and keep the
/// verifier's walk short.
const OPT_STEPS: usize = 5;

/// A segment's TCP options, read in place with a short walk (cold paths only:
/// SYN-ACKs and the ACKs of a held connection). Every read goes through
/// bpf_skb_load_bytes, so no variable offset ever indexes the stack.
pub struct Opts {
    /// Offset of the TCP header in the packet.
    tcp: u32,
    /// Bytes of options.
    len: u32,
}

/// One step of a walk: where an option starts, its kind and length.
struct Opt {
    at: u32,
    kind: u8,
    len: u32,
}

impl Opts {
    #[inline(always)]
    pub fn of(seg: &Seg) -> Opts {
        Opts {
            tcp: seg.tcp_off as u32,
            len: seg.opt_len,
        }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, ctx: &TcContext, rel: u32) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        // SAFETY: N bytes into a local buffer of N bytes; the helper checks the
        // packet bounds.
        let ret = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                self.tcp + rel,
                b.as_mut_ptr().cast(),
                N as u32,
            )
        };
        (ret == 0).then_some(b)
    }

    /// The option at `i` bytes into the options, if one starts there.
    #[inline(always)]
    fn at(&self, ctx: &TcContext, i: u32) -> Option<Opt> {
        if i >= self.len {
            return None;
        }
        let [kind] = self.load::<1>(ctx, 20 + i)?;
        if kind == OPT_EOL {
            return None;
        }
        if kind == OPT_NOP {
            return Some(Opt {
                at: i,
                kind,
                len: 1,
            });
        }
        let [len] = self.load::<1>(ctx, 21 + i)?;
        let len = u32::from(len);
        if len < 2 || i + len > self.len {
            return None;
        }
        Some(Opt { at: i, kind, len })
    }

    /// The timestamp option's (TSval, TSecr), if present.
    #[inline(always)]
    pub fn timestamps(&self, ctx: &TcContext) -> Option<(u32, u32)> {
        let mut i = 0;
        for _ in 0..OPT_STEPS {
            let o = self.at(ctx, i)?;
            if o.kind == OPT_TS && o.len == 10 {
                let b = self.load::<8>(ctx, 22 + o.at)?;
                return Some((
                    be32([b[0], b[1], b[2], b[3]]),
                    be32([b[4], b[5], b[6], b[7]]),
                ));
            }
            i += o.len;
        }
        None
    }
}

/// The segment's advertised window, as sent (unscaled).
#[inline(always)]
pub fn window(ctx: &TcContext, seg: &Seg) -> u16 {
    match ptr_at::<TcpHdr, _>(ctx, seg.tcp_off) {
        // SAFETY: bounds checked by ptr_at.
        Some(t) => be16(unsafe { (*t).window }),
        None => 0,
    }
}
