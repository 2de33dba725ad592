//! TCP segments the agent writes itself, through raw sockets (IPPROTO_RAW: the
//! IP header is ours):
//!
//! * to a denied client, the reply line and a FIN where the greeting would have
//!   started (server ISN + 1), or a RST when a held client hung up;
//! * to the server, from the client: the ACK that completes a held handshake at
//!   the release time, and the RST that drops a held request socket.
//!
//! Segments to the server go to its own address, so the kernel routes them
//! through `lo`: the TC programs never see them. Segments to the client carry
//! REPLY_MARK, which the egress program lets through.

use crate::{
    actions::reply_line,
    config::Action,
    events::{client_of, server_of},
};
use anyhow::{anyhow, bail, Context, Result};
use earlytalker_common::{Conn, ConnFlags, ConnKey, REPLY_MARK};
use etherparse::{PacketBuilder, PacketBuilderStep, TcpHeader, TcpOptionElement};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::net::{IpAddr, SocketAddr};

/// A raw socket per address family.
pub struct Raw {
    v4: Socket,
    v6: Socket,
}

impl Raw {
    pub fn new() -> Result<Self> {
        let raw = |d: Domain| -> Result<Socket> {
            let s = Socket::new(d, Type::RAW, Some(Protocol::from(nix::libc::IPPROTO_RAW)))
                .context("opening a raw socket (needs CAP_NET_RAW)")?;
            s.set_mark(REPLY_MARK)
                .context("SO_MARK on the raw socket")?;
            Ok(s)
        };
        Ok(Raw {
            v4: raw(Domain::IPV4)?,
            v6: raw(Domain::IPV6)?,
        })
    }

    /// Sends one IP packet to `to`.
    pub fn send(&self, pkt: &[u8], to: IpAddr) -> Result<()> {
        let sock = match to {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        };
        let n = sock
            .send_to(pkt, &SockAddr::from(SocketAddr::new(to, 0)))
            .context("raw send")?;
        if n != pkt.len() {
            bail!("sent short ({n} of {} bytes)", pkt.len());
        }
        Ok(())
    }
}

fn ip(from: SocketAddr, to: SocketAddr) -> Result<PacketBuilderStep<etherparse::IpHeaders>> {
    Ok(match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => bail!("mixed address families"),
    })
}

/// A TCP segment from the server to the client of `key`.
fn to_client(key: &ConnKey, seq: u32, window: u16) -> Result<PacketBuilderStep<TcpHeader>> {
    let (client, server) = (client_of(key), server_of(key));
    Ok(ip(server, client)?.tcp(server.port(), client.port(), seq, window))
}

/// A TCP segment from the client of `key` to the server.
fn to_server(key: &ConnKey, seq: u32, window: u16) -> Result<PacketBuilderStep<TcpHeader>> {
    let (client, server) = (client_of(key), server_of(key));
    Ok(ip(client, server)?.tcp(client.port(), server.port(), seq, window))
}

fn finish(b: PacketBuilderStep<TcpHeader>, payload: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload)
        .map_err(|e| anyhow!("building a segment: {e}"))?;
    Ok(out)
}

/// The reply to a denied client: IP + TCP(ACK, PSH, FIN) + one SMTP reply line,
/// starting where the greeting would have and acknowledging all its bytes.
pub fn reply(key: &ConnKey, conn: &Conn, action: Action) -> Result<Vec<u8>> {
    let b = to_client(key, conn.server_isn.wrapping_add(1), 64240)?
        .ack(conn.client_end)
        .psh()
        .fin();
    finish(b, reply_line(action).as_bytes())
}

/// A RST to a held client that hung up (the server never accepted it).
pub fn client_reset(key: &ConnKey, conn: &Conn) -> Result<Vec<u8>> {
    finish(
        to_client(key, conn.server_isn.wrapping_add(1), 0)?.rst(),
        &[],
    )
}

/// A RST from the client to the server's request socket: in its window (the
/// client's ISN + 1, no data taken), so the kernel drops the request.
pub fn server_reset(key: &ConnKey, conn: &Conn) -> Result<Vec<u8>> {
    finish(to_server(key, conn.client_base, 0)?.rst(), &[])
}

/// The client's SYN again, for a request socket that has sent only one SYN-ACK:
/// the kernel answers a retransmitted SYN with a retransmitted SYN-ACK, and a
/// request with a retransmitted SYN-ACK is not timed (Karn), so the accepted
/// socket's first RTT sample is not the hold. No options: none are checked.
pub fn syn_again(key: &ConnKey, conn: &Conn) -> Result<Vec<u8>> {
    let b = to_server(key, conn.client_base.wrapping_sub(1), conn.client_win)?.syn();
    finish(b, &[])
}

/// The client's handshake-completing ACK, as it would have sent it at the
/// release time; `now_ns` is CLOCK_MONOTONIC, as the kernel's times are.
///
/// Timestamps decide the accepted socket's RTT:
/// * a request socket: no timestamp option. With one SYN-ACK the kernel would
///   time the handshake itself (the sample is the hold: see `syn_again`); after
///   a retransmitted SYN-ACK it takes no sample without an echo, and an echo of
///   the first SYN-ACK would be a sample as long as the hold (an RTO of seconds);
/// * a SYN cookie: the echo carries the options the server agreed to in its six
///   low bits, so it must be kept; it is moved forward by whole 64 ms steps of
///   the time since the handshake, never past the server's clock, so the RTT
///   sample stays under 64 ms.
///
/// `payload`: a balancer's PROXY header (the client's first bytes, at
/// client_base), or nothing.
pub fn release_ack(key: &ConnKey, conn: &Conn, now_ns: u64, payload: &[u8]) -> Result<Vec<u8>> {
    let b = to_server(key, conn.client_base, conn.client_win)?.ack(conn.server_isn.wrapping_add(1));
    let b = if conn.has(ConnFlags::COOKIE) && conn.has(ConnFlags::CLIENT_TS) {
        let held_ms = now_ns.saturating_sub(conn.established_ns) / 1_000_000;
        let echo = conn.synack_ts.wrapping_add((held_ms & !63) as u32);
        b.options(&[
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::Timestamp(conn.client_ts, echo),
        ])
        .map_err(|e| anyhow!("timestamp option: {e}"))?
    } else {
        b
    };
    finish(b, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::tests::{conn, key4};
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn tcp(pkt: &[u8]) -> (etherparse::TcpHeader, Vec<u8>, bool) {
        let p = SlicedPacket::from_ip(pkt).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        // The checksum verifies over the pseudo-header.
        let ok = match p.net {
            Some(NetSlice::Ipv4(ip)) => {
                t.to_header()
                    .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                    .unwrap()
                    == t.checksum()
            }
            Some(NetSlice::Ipv6(ip)) => {
                t.to_header()
                    .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                    .unwrap()
                    == t.checksum()
            }
            _ => false,
        };
        (t.to_header(), t.payload().to_vec(), ok)
    }

    #[test]
    fn reply_starts_where_the_greeting_would_have() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let mut c = conn(b"EHLO bot\r\n");
        c.server_isn = u32::MAX; // the reply's seq wraps to 0
        let (h, payload, ok) = tcp(&reply(&k, &c, Action::Deny).unwrap());
        assert!(ok);
        assert_eq!((h.source_port, h.destination_port), (25, 40000));
        assert_eq!(h.sequence_number, 0);
        assert_eq!(h.acknowledgment_number, c.client_end);
        assert!(h.fin && h.ack && h.psh && !h.syn && !h.rst);
        assert_eq!(payload, reply_line(Action::Deny).as_bytes());
    }

    #[test]
    fn release_ack_completes_the_handshake_as_the_client() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let mut c = conn(b"");
        c.client_base = 1000;
        c.server_isn = 5000;
        c.client_win = 502;
        c.synack_ts = 0x1234_5678;
        c.client_ts = 77;
        c.flags |= ConnFlags::CLIENT_TS.bits();
        c.established_ns = 1_000_000_000;
        // A request socket: no timestamp.
        let (h, payload, ok) = tcp(&release_ack(&k, &c, 2_000_000_000, &[]).unwrap());
        assert!(ok && payload.is_empty());
        assert_eq!((h.source_port, h.destination_port), (40000, 25));
        assert_eq!((h.sequence_number, h.acknowledgment_number), (1000, 5001));
        assert_eq!(h.window_size, 502);
        assert!(h.ack && !h.syn && !h.fin && !h.rst);
        assert!(h.options_iterator().next().is_none());
        // A cookie: the echo keeps the cookie's low six bits and moves on by
        // whole 64 ms steps of the 1,000 ms held (960 ms).
        c.flags |= ConnFlags::COOKIE.bits();
        let (h, _, ok) = tcp(&release_ack(&k, &c, 2_000_000_000, &[]).unwrap());
        assert!(ok);
        let ts: Vec<_> = h.options_iterator().filter_map(Result::ok).collect();
        assert!(ts.contains(&TcpOptionElement::Timestamp(77, 0x1234_5678 + 960)));
        assert_eq!((0x1234_5678u32 + 960) % 64, 0x1234_5678 % 64);
    }

    #[test]
    fn a_release_carries_a_balancers_header_from_the_first_byte() {
        let (k, c) = (key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25), conn(b""));
        let header = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n";
        let (h, payload, ok) = tcp(&release_ack(&k, &c, 2_000_000_000, header).unwrap());
        assert!(ok);
        assert_eq!(payload, header);
        assert_eq!(h.sequence_number, c.client_base);
        assert_eq!(h.acknowledgment_number, c.server_isn.wrapping_add(1));
    }

    #[test]
    fn syn_again_repeats_the_clients_syn() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let mut c = conn(b"");
        c.client_base = 0; // the client's ISN was u32::MAX
        let (h, payload, ok) = tcp(&syn_again(&k, &c).unwrap());
        assert!(ok && payload.is_empty());
        assert!(h.syn && !h.ack && !h.rst && !h.fin);
        assert_eq!(h.sequence_number, u32::MAX);
    }

    #[test]
    fn resets_are_in_window() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let mut c = conn(b"EHLO\r\n");
        c.client_base = 1000;
        c.server_isn = 5000;
        let (h, _, ok) = tcp(&server_reset(&k, &c).unwrap());
        assert!(ok && h.rst && !h.ack);
        assert_eq!((h.source_port, h.sequence_number), (40000, 1000));
        let (h, _, ok) = tcp(&client_reset(&k, &c).unwrap());
        assert!(ok && h.rst);
        assert_eq!((h.source_port, h.sequence_number), (25, 5001));
    }
}
