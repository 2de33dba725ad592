//! Differential fuzzing of the kernel programs: crafted packets run through the
//! real, loaded `et_ingress`/`et_egress` with BPF_PROG_TEST_RUN, and through a
//! plain-Rust reference model of the same state machine; after every packet the
//! verdict, both connection maps and the emitted events must agree.
//!
//! Time is made irrelevant: the hold is either 0 (always released) or effectively
//! infinite (always held), and wall-clock fields are not compared.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use std::{collections::HashMap, os::fd::AsFd};

// The layouts and numbers come from the ABI crate, as the kernel's do; the
// model below keeps its own reading of the rules, which is what is compared.
pub use earlytalker_common::REPLY_MARK;
use earlytalker_common::{
    CfgFlags, Config, Conn, ConnFlags, ConnKey as Key, Event, EventKind, Handshake, Reason,
    MAP_TRACKED, PAYLOAD_MAX, PROG_EGRESS, PROG_INGRESS, TRACKED_BUCKETS,
};

const F_EARLY: u32 = ConnFlags::EARLY.bits();
const F_OPENED: u32 = ConnFlags::OPENED.bits();
const F_SYN_DATA: u32 = ConnFlags::SYN_DATA.bits();
const F_HELD: u32 = ConnFlags::HELD.bits();
const F_CLIENT_FIN: u32 = ConnFlags::CLIENT_FIN.bits();
const F_DENY: u32 = ConnFlags::DENY.bits();
const F_GREETED: u32 = ConnFlags::GREETED.bits();
const F_REPORTED: u32 = ConnFlags::REPORTED.bits();
const F_CLOSED: u32 = ConnFlags::CLOSED.bits();
const F_PASS_CACHED: u32 = ConnFlags::PASS_CACHED.bits();
const F_PIPECONNECT: u32 = ConnFlags::PIPECONNECT.bits();
const CFG_ENFORCE: u64 = CfgFlags::ENFORCE.bits();
const CFG_TRACK_EARLY: u64 = CfgFlags::TRACK_EARLY.bits();
const CFG_PIPECONNECT: u64 = CfgFlags::PIPECONNECT.bits();
const EV_EARLY: u32 = EventKind::Early as u32;
const EV_VERDICT: u32 = EventKind::Verdict as u32;
const EV_CLOSED: u32 = EventKind::Closed as u32;
const EV_HELD: u32 = EventKind::Held as u32;
const R_GREETING: u32 = Reason::Greeting as u32;
const R_CLIENT_RST: u32 = Reason::ClientRst as u32;
const R_SERVER_FIN: u32 = Reason::ServerFin as u32;
const R_SERVER_RST: u32 = Reason::ServerRst as u32;
const R_CLIENT_FIN: u32 = Reason::ClientFin as u32;
const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC as u32
const SHOT: u32 = 2;
const PORT: u16 = 25;

/// What is compared of a connection entry: everything but the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnView {
    client_base: u32,
    client_end: u32,
    server_isn: u32,
    flags: u32,
    synacks: u16,
    payload: Vec<u8>,
}

impl ConnView {
    fn of(c: &Conn) -> Self {
        let n = (c.payload_len as usize).min(PAYLOAD_MAX);
        ConnView {
            client_base: c.client_base,
            client_end: c.client_end,
            server_isn: c.server_isn,
            flags: c.flags,
            synacks: c.synacks,
            payload: c.payload[..n].to_vec(),
        }
    }
}

/// What is compared of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventView {
    kind: u32,
    reason: u32,
    key: Key,
    conn: ConnView,
}

// ------------------------------------------------------------------ model

struct Seg {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    seq: u32,
    ack_seq: u32,
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    payload_off: usize,
    payload_len: u32,
}

fn be16(p: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(o)?, *p.get(o + 1)?]))
}

fn be32(p: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(o..o + 4)?.try_into().ok()?))
}

fn mapped(a: &[u8]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(a);
    m
}

/// The reference parser: Ethernet, up to two VLAN tags, IPv4 (options, no
/// non-first fragments) or IPv6 (up to four extension headers), TCP.
fn parse(p: &[u8], ingress: bool) -> Option<Seg> {
    let need = |off: usize, n: usize| (off + n <= p.len()).then_some(());
    need(0, 14)?;
    let mut proto = be16(p, 12)?;
    let mut off = 14;
    for _ in 0..2 {
        if proto != 0x8100 && proto != 0x88a8 {
            break;
        }
        need(off, 4)?;
        proto = be16(p, off + 2)?;
        off += 4;
    }
    let ip_off = off;
    let (v6, l4_len);
    if proto == 0x0800 {
        need(off, 20)?;
        if p[off + 9] != 6 || be16(p, off + 6)? & 0x1fff != 0 {
            return None;
        }
        let ihl = usize::from(p[off] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        let tot = u32::from(be16(p, off + 2)?);
        let tot = if tot == 0 {
            (p.len() as u32).saturating_sub(off as u32)
        } else {
            tot
        };
        l4_len = tot.saturating_sub(ihl as u32);
        v6 = false;
        off += ihl;
    } else if proto == 0x86dd {
        need(off, 40)?;
        let mut next = p[off + 6];
        let mut plen = u32::from(be16(p, off + 4)?);
        if plen == 0 {
            plen = (p.len() as u32).saturating_sub((off + 40) as u32);
        }
        off += 40;
        for _ in 0..4 {
            match next {
                0 | 43 | 60 => {
                    need(off, 2)?;
                    let len = (usize::from(p[off + 1]) + 1) * 8;
                    next = p[off];
                    off += len;
                    plen = plen.saturating_sub(len as u32);
                }
                44 => {
                    need(off, 4)?;
                    if be16(p, off + 2)? & 0xfff8 != 0 {
                        return None;
                    }
                    next = p[off];
                    off += 8;
                    plen = plen.saturating_sub(8);
                }
                _ => break,
            }
        }
        if next != 6 {
            return None;
        }
        v6 = true;
        l4_len = plen;
    } else {
        return None;
    }
    need(off, 20)?;
    let (sport, dport) = (be16(p, off)?, be16(p, off + 2)?);
    if (if ingress { dport } else { sport }) != PORT {
        return None;
    }
    let doff = u32::from(p[off + 12] >> 4) * 4;
    if doff < 20 || doff > l4_len {
        return None;
    }
    let flags = p[off + 13];
    let (src, dst) = if v6 {
        (
            p[ip_off + 8..ip_off + 24].try_into().ok()?,
            p[ip_off + 24..ip_off + 40].try_into().ok()?,
        )
    } else {
        (
            mapped(&p[ip_off + 12..ip_off + 16]),
            mapped(&p[ip_off + 16..ip_off + 20]),
        )
    };
    Some(Seg {
        src,
        dst,
        sport,
        dport,
        seq: be32(p, off + 4)?,
        ack_seq: be32(p, off + 8)?,
        fin: flags & 1 != 0,
        syn: flags & 2 != 0,
        rst: flags & 4 != 0,
        ack: flags & 16 != 0,
        payload_off: off + doff as usize,
        payload_len: l4_len - doff,
    })
}

fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[derive(Default)]
pub struct Model {
    pub wait_zero: bool,
    pub enforce: bool,
    /// The pass cache is on (a TTL longer than any run) and PIPECONNECT allowed.
    pub pass: bool,
    passed: std::collections::HashSet<[u8; 16]>,
    conns: HashMap<Key, ConnView>,
    hs: HashMap<Key, Handshake>,
    events: Vec<EventView>,
}

impl Model {
    fn emit(&mut self, kind: u32, reason: u32, key: Key, c: &ConnView) {
        self.events.push(EventView {
            kind,
            reason,
            key,
            conn: c.clone(),
        });
    }

    fn client_data(&mut self, p: &[u8], seg: &Seg, key: Key, c: &mut ConnView) -> u32 {
        let end = seg.seq.wrapping_add(seg.payload_len);
        if after(end, c.client_end) {
            c.client_end = end;
        }
        if c.flags & F_EARLY == 0 {
            let n = (seg.payload_len as usize).min(PAYLOAD_MAX);
            if n > 0 && seg.payload_off + n <= p.len() {
                c.payload = p[seg.payload_off..seg.payload_off + n].to_vec();
            }
            // A client that passed before opening with "EHLO ": PIPECONNECT.
            let ehlo = c.payload.len() >= 5
                && c.payload[..4].eq_ignore_ascii_case(b"ehlo")
                && c.payload[4] == b' ';
            c.flags |= F_EARLY;
            if self.pass && c.flags & F_PASS_CACHED != 0 && ehlo {
                c.flags |= F_PIPECONNECT;
            } else {
                if self.enforce {
                    c.flags |= F_DENY;
                }
                self.passed.remove(&key.client_addr);
            }
            self.emit(EV_EARLY, 0, key, c);
        }
        if c.flags & F_DENY != 0 {
            SHOT
        } else {
            NEXT
        }
    }
    fn verdict(&mut self, key: Key, mut c: ConnView, reason: u32) {
        // Claimed once per connection.
        if c.flags & F_REPORTED != 0 {
            return;
        }
        c.flags |= F_REPORTED;
        self.emit(EV_VERDICT, reason, key, &c);
        let talked = c.flags & F_EARLY != 0;
        // Only a real hold earns a pass.
        if reason == R_GREETING && !talked && self.pass && c.flags & F_PASS_CACHED == 0 {
            self.passed.insert(key.client_addr);
        }
        let early = talked && c.flags & F_PIPECONNECT == 0;
        if reason == R_GREETING && early && !self.enforce {
            c.flags |= F_GREETED;
            self.conns.insert(key, c);
        } else {
            self.conns.remove(&key);
        }
    }

    fn closed(&mut self, key: Key, c: &ConnView, reason: u32) {
        if c.flags & F_CLOSED != 0 {
            return;
        }
        let mut c = c.clone();
        c.flags |= F_CLOSED;
        self.emit(EV_CLOSED, reason, key, &c);
        self.conns.remove(&key);
    }

    /// A segment of a connection past its pre-greeting phase, as in the kernel:
    /// a denied one drops everything; a greeted early talker reports only its end.
    fn settled(&mut self, seg: &Seg, key: Key, c: &ConnView, rst: u32, fin: u32) -> Option<u32> {
        if c.flags & F_DENY != 0 {
            return Some(SHOT);
        }
        if c.flags & F_GREETED == 0 {
            return None;
        }
        if seg.rst {
            self.closed(key, c, rst);
        } else if seg.fin {
            self.closed(key, c, fin);
        }
        Some(NEXT)
    }

    /// A client segment that reaches the server.
    fn unheld(&mut self, p: &[u8], seg: &Seg, key: Key, mut c: ConnView) -> u32 {
        let mut act = NEXT;
        if seg.payload_len > 0 {
            act = self.client_data(p, seg, key, &mut c);
        }
        if seg.fin {
            c.flags |= F_CLIENT_FIN;
        }
        self.conns.insert(key, c);
        act
    }

    /// A client segment while held (the release time never comes in a run:
    /// the wait is longer than any run, or zero and nothing is held).
    fn held(&mut self, p: &[u8], seg: &Seg, key: Key, mut c: ConnView) -> u32 {
        if seg.payload_len > 0 {
            let act = self.client_data(p, seg, key, &mut c);
            if act == NEXT {
                // Logged: the data completes the handshake.
                c.flags |= F_OPENED;
                if seg.fin {
                    c.flags |= F_CLIENT_FIN;
                }
            }
            self.conns.insert(key, c);
            return act;
        }
        if seg.fin {
            c.flags |= F_CLIENT_FIN;
            self.verdict(key, c, R_CLIENT_FIN);
            return SHOT;
        }
        self.conns.insert(key, c);
        SHOT
    }

    pub fn ingress(&mut self, p: &[u8]) -> u32 {
        let Some(seg) = parse(p, true) else {
            return NEXT;
        };
        let key = Key {
            client_addr: seg.src,
            server_addr: seg.dst,
            client_port: seg.sport,
            server_port: seg.dport,
            pad: 0,
        };
        if seg.syn {
            if seg.ack {
                return NEXT;
            }
            self.conns.remove(&key);
            if seg.payload_len == 0 {
                return NEXT;
            }
            if self.enforce {
                return SHOT;
            }
            let base = seg.seq.wrapping_add(1);
            let mut c = ConnView {
                client_base: base,
                client_end: base,
                server_isn: 0,
                flags: F_SYN_DATA,
                synacks: 0,
                payload: vec![],
            };
            self.client_data(p, &seg, key, &mut c);
            c.client_end = base.wrapping_add(seg.payload_len);
            self.conns.insert(key, c);
            return NEXT;
        }
        if let Some(c) = self.conns.get(&key).cloned() {
            if let Some(act) = self.settled(&seg, key, &c, R_CLIENT_RST, R_CLIENT_FIN) {
                return act;
            }
            if seg.rst {
                self.verdict(key, c, R_CLIENT_RST);
                return NEXT;
            }
            if c.flags & F_HELD != 0 && c.flags & F_OPENED == 0 {
                return self.held(p, &seg, key, c);
            }
            return self.unheld(p, &seg, key, c);
        }
        if seg.rst {
            // A client refusing the SYN-ACK ends the handshake.
            self.hs.remove(&key);
            return NEXT;
        }
        if !seg.ack {
            return NEXT;
        }
        let Some(h) = self.hs.get(&key).copied() else {
            return NEXT;
        };
        if seg.ack_seq != h.server_isn.wrapping_add(1) {
            return NEXT;
        }
        self.hs.remove(&key);
        let mut c = ConnView {
            client_base: h.client_base,
            client_end: h.client_base,
            server_isn: h.server_isn,
            flags: 0,
            synacks: h.synacks,
            payload: vec![],
        };
        if self.pass && self.passed.contains(&key.client_addr) {
            // Passed before: not held.
            c.flags |= F_PASS_CACHED;
        }
        if self.wait_zero || c.flags & F_PASS_CACHED != 0 {
            return self.unheld(p, &seg, key, c);
        }
        // Held before accept: the agent hears of it, and this ACK is withheld.
        c.flags |= F_HELD;
        self.emit(EV_HELD, 0, key, &c);
        self.held(p, &seg, key, c)
    }

    pub fn egress(&mut self, p: &[u8], mark: u32) -> u32 {
        if mark == REPLY_MARK {
            return NEXT;
        }
        let Some(seg) = parse(p, false) else {
            return NEXT;
        };
        let key = Key {
            client_addr: seg.dst,
            server_addr: seg.src,
            client_port: seg.dport,
            server_port: seg.sport,
            pad: 0,
        };
        if seg.syn {
            if seg.ack {
                if let Some(c) = self.conns.get_mut(&key) {
                    if c.flags & F_SYN_DATA != 0 && c.synacks == 0 {
                        c.server_isn = seg.seq;
                    }
                    c.synacks = c.synacks.saturating_add(1);
                } else if let Some(h) = self.hs.get_mut(&key).filter(|h| h.server_isn == seg.seq) {
                    h.synacks = h.synacks.saturating_add(1);
                } else {
                    // BPF_PROG_TEST_RUN gives every skb a socket: never a cookie.
                    self.hs.insert(
                        key,
                        Handshake {
                            server_isn: seg.seq,
                            client_base: seg.ack_seq,
                            synack_ts: 0,
                            synacks: 1,
                            cookie: 0,
                        },
                    );
                }
            }
            return NEXT;
        }
        // Bare ACKs from the server carry nothing to act on.
        if seg.payload_len == 0 && !seg.fin && !seg.rst {
            return NEXT;
        }
        let Some(c) = self.conns.get(&key).cloned() else {
            return NEXT;
        };
        if let Some(act) = self.settled(&seg, key, &c, R_SERVER_RST, R_SERVER_FIN) {
            return act;
        }
        if seg.payload_len > 0 {
            self.verdict(key, c, R_GREETING);
            // Greeting and close in one segment: the kept entry ends here too.
            if seg.fin || seg.rst {
                if let Some(kept) = self.conns.get(&key).cloned() {
                    self.settled(&seg, key, &kept, R_SERVER_RST, R_SERVER_FIN);
                }
            }
            return NEXT;
        }
        if seg.rst {
            self.verdict(key, c, R_SERVER_RST);
        } else if seg.fin {
            self.verdict(key, c, R_SERVER_FIN);
        }
        NEXT
    }
}

// ------------------------------------------------------------------ generator

/// xorshift64*: deterministic per seed, so any disagreement can be replayed.
/// A quiet one never takes a chance: packets built with it are well formed.
pub struct Rng(u64, bool);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, false)
    }

    fn quiet() -> Self {
        Rng(1, true)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        !self.1 && self.below(100) < pct
    }
}

/// One endpoint pair's sequence state, so that scripts reach deep states.
#[derive(Clone, Copy)]
struct Flow {
    v6: bool,
    cport: u16,
    cseq: u32,
    sseq: u32,
}

const C4: [u8; 4] = [10, 99, 0, 2];
const S4: [u8; 4] = [10, 99, 0, 1];
const C6: [u8; 16] = [0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const S6: [u8; 16] = [0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Builds one packet (ingress = client to server) with random mutations.
fn packet(
    r: &mut Rng,
    f: &Flow,
    ingress: bool,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::new();
    let (sp, dp) = if ingress {
        (f.cport, PORT)
    } else {
        (PORT, f.cport)
    };
    // Sometimes the other watched-or-not port.
    let (sp, dp) = if r.chance(3) {
        (sp ^ 1, dp ^ 1)
    } else {
        (sp, dp)
    };
    tcp.extend_from_slice(&sp.to_be_bytes());
    tcp.extend_from_slice(&dp.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    let opt_words = if r.chance(20) { r.below(11) as u8 } else { 0 };
    let mut doff = 5 + opt_words;
    if r.chance(3) {
        doff = r.below(16) as u8; // bad data offset
    }
    tcp.push(doff << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend(std::iter::repeat_n(1u8, usize::from(opt_words) * 4));
    tcp.extend_from_slice(payload);

    let mut ip = Vec::new();
    if f.v6 {
        let mut ext = Vec::new();
        let mut next = 6u8;
        let n_ext = if r.chance(25) { r.below(6) } else { 0 };
        for _ in 0..n_ext {
            let kind = [0u8, 43, 60, 44][r.below(4) as usize];
            if kind == 44 {
                let frag_off: u16 = if r.chance(50) {
                    0
                } else {
                    (r.below(100) as u16) << 3
                };
                let mut h = vec![next, 0];
                h.extend_from_slice(&frag_off.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1]);
                h.extend(ext);
                ext = h;
            } else {
                let len8 = r.below(3) as u8;
                let mut h = vec![next, len8];
                h.extend(std::iter::repeat_n(0u8, 6 + usize::from(len8) * 8));
                h.extend(ext);
                ext = h;
            }
            next = kind;
        }
        if r.chance(3) {
            next = 17;
        }
        let plen = (ext.len() + tcp.len()) as u16;
        let plen = if r.chance(4) {
            0
        } else if r.chance(4) {
            r.below(2000) as u16
        } else {
            plen
        };
        ip.extend_from_slice(&[0x60, 0, 0, 0]);
        ip.extend_from_slice(&plen.to_be_bytes());
        ip.push(next);
        ip.push(64);
        let (s, d) = if ingress { (C6, S6) } else { (S6, C6) };
        ip.extend_from_slice(&s);
        ip.extend_from_slice(&d);
        ip.extend(ext);
    } else {
        let opt_words = if r.chance(15) { r.below(11) as u8 } else { 0 };
        let mut ihl = 5 + opt_words;
        if r.chance(3) {
            ihl = r.below(16) as u8;
        }
        let tot = (20 + usize::from(opt_words) * 4 + tcp.len()) as u16;
        let tot = if r.chance(4) {
            0
        } else if r.chance(4) {
            r.below(2000) as u16
        } else {
            tot
        };
        let frags: u16 = if r.chance(5) {
            r.below(0x4000) as u16
        } else {
            0x4000
        };
        ip.push(0x40 | ihl);
        ip.push(0);
        ip.extend_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&[0, 1]);
        ip.extend_from_slice(&frags.to_be_bytes());
        ip.push(64);
        ip.push(if r.chance(3) { 17 } else { 6 });
        ip.extend_from_slice(&[0, 0]);
        let (s, d) = if ingress { (C4, S4) } else { (S4, C4) };
        ip.extend_from_slice(&s);
        ip.extend_from_slice(&d);
        ip.extend(std::iter::repeat_n(1u8, usize::from(opt_words) * 4));
    }

    let mut eth = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let proto: u16 = if f.v6 { 0x86dd } else { 0x0800 };
    let vlans = if r.chance(10) { 1 + r.below(3) } else { 0 };
    for i in 0..vlans {
        eth.extend_from_slice(&(if i == 0 { 0x88a8u16 } else { 0x8100 }).to_be_bytes());
        eth.extend_from_slice(&[0, 7]);
    }
    let proto = if r.chance(2) { 0x0806 } else { proto };
    eth.extend_from_slice(&proto.to_be_bytes());
    eth.extend(ip);
    eth.extend(tcp);
    if r.chance(8) {
        let cut = 14 + r.below(eth.len() as u64 - 13) as usize;
        eth.truncate(cut);
    }
    if r.chance(3) {
        // Ethernet padding after the IP packet.
        eth.extend_from_slice(&[0; 6]);
    }
    eth
}

/// A random step of some flow: mostly the handshake/session script, sometimes
/// noise. Returns (ingress?, packet, mark).
fn step(r: &mut Rng, flows: &mut [Flow]) -> (bool, Vec<u8>, u32) {
    let i = r.below(flows.len() as u64) as usize;
    let mut f = flows[i];
    let mut data: Vec<u8> = (0..r.below(100))
        .map(|_| (r.next_u64() >> 56) as u8)
        .collect();
    // Often an EHLO in any case (PIPECONNECT), now and then one a byte short.
    if r.chance(50) {
        let verb: &[u8] =
            [&b"EHLO "[..], b"ehlo ", b"EhLo ", b"EHLO", b"HELO "][r.below(5) as usize];
        data.splice(0..0, verb.iter().copied());
    }
    let out = match r.below(12) {
        0 => {
            // New connection: fresh ISNs; sometimes data in the SYN.
            f.cseq = r.next_u64() as u32;
            f.sseq = r.next_u64() as u32;
            let d = if r.chance(15) { &data[..] } else { &[][..] };
            (true, packet(r, &f, true, 0x02, f.cseq, 0, d))
        }
        1 => (
            false,
            packet(r, &f, false, 0x12, f.sseq, f.cseq.wrapping_add(1), &[]),
        ),
        2 => {
            let ack = if r.chance(85) {
                f.sseq.wrapping_add(1)
            } else {
                r.next_u64() as u32
            };
            let d = if r.chance(20) { &data[..] } else { &[][..] };
            (
                true,
                packet(r, &f, true, 0x10, f.cseq.wrapping_add(1), ack, d),
            )
        }
        3 | 4 => {
            // Client data (possibly a retransmission).
            let seq = f.cseq.wrapping_add(1).wrapping_add(r.below(40) as u32);
            (
                true,
                packet(r, &f, true, 0x18, seq, f.sseq.wrapping_add(1), &data),
            )
        }
        5 | 6 => {
            // Server payload: the greeting, then more; sometimes with the
            // server's FIN in the same segment.
            let g = b"220 mx ESMTP\r\n";
            let flags = if r.chance(20) { 0x19 } else { 0x18 };
            (
                false,
                packet(
                    r,
                    &f,
                    false,
                    flags,
                    f.sseq.wrapping_add(1),
                    f.cseq.wrapping_add(1),
                    g,
                ),
            )
        }
        7 => (
            true,
            packet(
                r,
                &f,
                true,
                0x11,
                f.cseq.wrapping_add(1),
                f.sseq.wrapping_add(1),
                &[],
            ),
        ),
        8 => {
            let ingress = r.chance(50);
            (ingress, packet(r, &f, ingress, 0x04, f.cseq, 0, &[]))
        }
        9 => (
            false,
            packet(
                r,
                &f,
                false,
                0x11,
                f.sseq.wrapping_add(1),
                f.cseq.wrapping_add(1),
                &[],
            ),
        ),
        10 => {
            // Any flags, any numbers, either way.
            let ingress = r.chance(50);
            let flags = (r.next_u64() >> 56) as u8;
            let (seq, ack) = (r.next_u64() as u32, r.next_u64() as u32);
            (ingress, packet(r, &f, ingress, flags, seq, ack, &data))
        }
        _ => (
            false,
            packet(
                r,
                &f,
                false,
                0x10,
                f.sseq.wrapping_add(1),
                f.cseq.wrapping_add(1),
                &[],
            ),
        ),
    };
    flows[i] = f;
    let mark = if !out.0 && r.chance(3) { REPLY_MARK } else { 0 };
    (out.0, out.1, mark)
}

// ------------------------------------------------------------------ harness

/// The kernel side: the real object, loaded (not attached).
pub struct Kernel {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
}

impl Kernel {
    pub fn load(object: &[u8], wait_zero: bool, enforce: bool, pass: bool) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNS", 4096)
            .map_max_entries("HANDSHAKES", 4096)
            .load(object)
            .context("loading the object")?;
        let mut flags = if enforce {
            CFG_ENFORCE
        } else {
            CFG_TRACK_EARLY
        };
        if pass {
            flags |= CFG_PIPECONNECT;
        }
        let cfg = Config {
            wait_ns: if wait_zero { 0 } else { u64::MAX / 4 },
            flags,
            pass_ttl_ns: if pass { u64::MAX / 4 } else { 0 },
        };
        let mut c: Array<_, Config> = Array::try_from(ebpf.map_mut("CONFIG").context("CONFIG")?)?;
        c.set(0, cfg, 0)?;
        let mut ports: Array<_, u64> = Array::try_from(ebpf.map_mut("PORTS").context("PORTS")?)?;
        ports.set(u32::from(PORT >> 6), 1u64 << (PORT & 63), 0)?;
        for name in [PROG_INGRESS, PROG_EGRESS] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS")?)?;
        Ok(Kernel { ebpf, events })
    }

    /// The program's verdict, or None when BPF_PROG_TEST_RUN itself refuses the
    /// input (kernels with the 2026 stable fix reject an IPv4/IPv6 EtherType
    /// whose L3 header is shorter than 20/40 bytes, before running anything).
    fn run(&mut self, ingress: bool, data: &[u8], mark: u32) -> Result<Option<u32>> {
        let name = if ingress { PROG_INGRESS } else { PROG_EGRESS };
        let p: &SchedClassifier = self.ebpf.program(name).context(name)?.try_into()?;
        // struct __sk_buff: mark is its third u32 (len, pkt_type, mark, ...).
        let mut ctx = vec![0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let r = p.test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: if mark == 0 { None } else { Some(&ctx) },
            repeat: 1,
            ..Default::default()
        });
        match r {
            Ok(r) => Ok(Some(r.return_value)),
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(22) && short_l3(data) =>
            {
                Ok(None)
            }
            Err(e) => Err(anyhow!("test_run ({} bytes): {e:?}", data.len())),
        }
    }

    fn conns(&self) -> Result<HashMap<Key, ConnView>> {
        let m: BpfHashMap<_, Key, Conn> =
            BpfHashMap::try_from(self.ebpf.map("CONNS").context("CONNS")?)?;
        Ok(m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, ConnView::of(&v)))
            .collect())
    }

    fn handshakes(&self) -> Result<HashMap<Key, Handshake>> {
        let m: BpfHashMap<_, Key, Handshake> =
            BpfHashMap::try_from(self.ebpf.map("HANDSHAKES").context("HANDSHAKES")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// The TRACKED filter's counts, by bucket (mapped as the agent maps it: a
    /// syscall per bucket would make each step cost 8,192 of them).
    fn filter(&self) -> Result<Vec<u32>> {
        let Some(aya::maps::Map::Array(data)) = self.ebpf.map(MAP_TRACKED) else {
            bail!("TRACKED is not an array");
        };
        let f = earlytalker::tracked::Filter::map(data.fd().as_fd())?;
        Ok(f.buckets()
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::SeqCst) as u32)
            .collect())
    }

    fn drain(&mut self) -> Vec<EventView> {
        let mut v = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: length checked; Event is plain data.
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                v.push(EventView {
                    kind: e.kind,
                    reason: e.reason,
                    key: e.key,
                    conn: ConnView::of(&e.conn),
                });
            }
        }
        v
    }
}

/// The input test_run refuses: IPv4/IPv6 EtherType right after the MAC header,
/// with less than a full IP header behind it.
fn short_l3(p: &[u8]) -> bool {
    match be16(p, 12) {
        Some(0x0800) => p.len() < 14 + 20,
        Some(0x86dd) => p.len() < 14 + 40,
        _ => false,
    }
}

/// What a run covered, so that a test can insist the deep states were reached.
#[derive(Debug, Default, Clone, Copy)]
pub struct Coverage {
    pub compared: u64,
    /// Inputs BPF_PROG_TEST_RUN refused (see `Kernel::run`).
    pub refused: u64,
    pub dropped: u64,
    pub early_events: u64,
    pub verdict_events: u64,
    pub closed_events: u64,
    /// Early events allowed as PIPECONNECT.
    pub pipeconnect: u64,
}

/// A client that passes, then comes back opening with EHLO: with the pass cache
/// on and no hold, the PIPECONNECT path, reached at the start of each run
/// rather than left to chance. Well-formed packets, compared like the others.
fn pipeconnect_script(r: &mut Rng, f: &mut Flow) -> Vec<(bool, Vec<u8>, u32)> {
    let mut q = Rng::quiet();
    let mut out = Vec::new();
    for again in [false, true] {
        f.cseq = r.next_u64() as u32;
        f.sseq = r.next_u64() as u32;
        let (c1, s1) = (f.cseq.wrapping_add(1), f.sseq.wrapping_add(1));
        out.push((true, packet(&mut q, f, true, 0x02, f.cseq, 0, &[]), 0));
        out.push((false, packet(&mut q, f, false, 0x12, f.sseq, c1, &[]), 0));
        if again {
            // The handshake's ACK carries the EHLO, as Exim's does.
            out.push((
                true,
                packet(&mut q, f, true, 0x18, c1, s1, b"EHLO pipe.example\r\n"),
                0,
            ));
        } else {
            out.push((true, packet(&mut q, f, true, 0x10, c1, s1, &[]), 0));
            out.push((
                false,
                packet(&mut q, f, false, 0x18, s1, c1, b"220 mx ESMTP\r\n"),
                0,
            ));
            out.push((true, packet(&mut q, f, true, 0x04, c1, 0, &[]), 0));
        }
    }
    out
}

/// The configurations each run goes through: hold or not, enforce or not,
/// pass cache (and PIPECONNECT) or not.
pub const CONFIGS: u64 = 8;

/// Runs `cases` random packets per configuration (`CONFIGS` of them) from `seed`.
/// Fails at the first disagreement, naming the seed, the step and the packet.
pub fn differential(object: &[u8], seed: u64, cases: u64) -> Result<Coverage> {
    let mut cov = Coverage::default();
    let configs = (0..CONFIGS).map(|i| (i & 1 != 0, i & 2 != 0, i & 4 != 0));
    for (wait_zero, enforce, pass) in configs {
        let mut k = Kernel::load(object, wait_zero, enforce, pass)?;
        let mut m = Model {
            wait_zero,
            enforce,
            pass,
            ..Default::default()
        };
        let mut r = Rng::new(
            seed ^ (u64::from(pass) << 2 | u64::from(wait_zero) << 1 | u64::from(enforce)),
        );
        let mut flows: Vec<Flow> = (0..4)
            .map(|i| Flow {
                v6: i % 2 == 1,
                cport: 40000 + i as u16,
                cseq: 1000,
                sseq: 5000,
            })
            .collect();
        let mut script = if pass {
            pipeconnect_script(&mut r, &mut flows[0])
        } else {
            Vec::new()
        };
        script.reverse();
        for n in 0..cases {
            let (ingress, pkt, mark) = match script.pop() {
                Some(scripted) => scripted,
                None => step(&mut r, &mut flows),
            };
            let got = k.run(ingress, &pkt, mark)?;
            let want = if ingress {
                m.ingress(&pkt)
            } else {
                m.egress(&pkt, mark)
            };
            let Some(got) = got else {
                // Refused by test_run: the model must not have moved either.
                if want != NEXT || !m.events.is_empty() {
                    bail!("test_run refused a packet the model acted on: seed {seed} step {n} {pkt:02x?}");
                }
                cov.refused += 1;
                continue;
            };
            let ctx = || {
                format!(
                    "seed {seed} wait_zero={wait_zero} enforce={enforce} pass={pass} step {n} {} mark {mark:#x} packet {:02x?}",
                    if ingress { "ingress" } else { "egress" },
                    pkt
                )
            };
            if got != want {
                bail!("verdict kernel {got:#x} model {want:#x}: {}", ctx());
            }
            let ev = k.drain();
            let want_ev = std::mem::take(&mut m.events);
            cov.dropped += u64::from(got == SHOT);
            for e in &ev {
                match e.kind {
                    EV_EARLY if e.conn.flags & F_PIPECONNECT != 0 => {
                        cov.early_events += 1;
                        cov.pipeconnect += 1;
                    }
                    EV_EARLY => cov.early_events += 1,
                    EV_VERDICT => cov.verdict_events += 1,
                    _ => cov.closed_events += 1,
                }
            }
            if ev != want_ev {
                bail!(
                    "events differ\nkernel {ev:?}\nmodel  {want_ev:?}\nkernel entries {:?}\nmodel entries  {:?}\n{}",
                    k.conns()?,
                    m.conns,
                    ctx()
                );
            }
            let conns = k.conns()?;
            if conns != m.conns {
                bail!(
                    "CONNS differ\nkernel {conns:?}\nmodel  {:?}\n{}",
                    m.conns,
                    ctx()
                );
            }
            let hs = k.handshakes()?;
            if hs != m.hs {
                bail!(
                    "HANDSHAKES differ\nkernel {hs:?}\nmodel  {:?}\n{}",
                    m.hs,
                    ctx()
                );
            }
            // The filter counts exactly the entries of both maps (nothing is
            // evicted here): a count too low would hide a tracked connection.
            let mut want = vec![0u32; TRACKED_BUCKETS as usize];
            for key in conns.keys().chain(hs.keys()) {
                want[key.bucket() as usize] += 1;
            }
            if k.filter()? != want {
                bail!("TRACKED counts differ from the maps' entries\n{}", ctx());
            }
            cov.compared += 1;
        }
    }
    Ok(cov)
}
