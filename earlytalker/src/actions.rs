//! Enforcement against a denied early talker (deny, denysoft):
//!
//! 1. the client gets one SMTP reply line and a FIN in place of the greeting: a TCP
//!    segment built here and sent through a raw socket, starting at the server's
//!    ISN + 1 (where the held greeting would have started) and acknowledging all the
//!    client's bytes; it carries REPLY_MARK so the egress program lets it pass;
//! 2. the MTA's socket is torn down with sock_diag SOCK_DESTROY, freeing its process
//!    (its next read fails with ECONNABORTED).
//!
//! The kernel programs already drop everything else on the connection, both ways.

use crate::config::Action;
use crate::events::{client_of, server_of};
use anyhow::{anyhow, bail, Context, Result};
use earlytalker_common::{Conn, ConnKey, REPLY_MARK};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NlSocket, SocketAddr as NlAddr};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::net::{IpAddr, SocketAddr};

/// qpsmtpd's text, with RFC 3463 enhanced status codes.
pub const REPLY_TEXT: &str = "Connecting host started transmitting before SMTP greeting";

pub fn reply_line(action: Action) -> String {
    let code = match action {
        Action::Deny => "554 5.7.1",
        _ => "421 4.7.1",
    };
    format!("{code} {REPLY_TEXT}\r\n")
}

/// TCP_LISTEN in the kernel's state numbering.
const TCP_LISTEN: u8 = 10;

pub struct Enforcer {
    raw4: Socket,
    raw6: Socket,
    diag: NlSocket,
    seq: u32,
}

/// What went wrong in one step of a teardown (the others still ran).
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply_error: Option<String>,
    pub destroy_error: Option<String>,
}

impl Enforcer {
    pub fn new() -> Result<Self> {
        let raw = |d: Domain| -> Result<Socket> {
            // IPPROTO_RAW: we write the IP header ourselves (IP_HDRINCL implied).
            let s = Socket::new(d, Type::RAW, Some(Protocol::from(nix::libc::IPPROTO_RAW)))
                .context("opening a raw socket for replies (needs CAP_NET_RAW)")?;
            s.set_mark(REPLY_MARK)
                .context("SO_MARK on the reply socket")?;
            Ok(s)
        };
        let mut diag = NlSocket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        diag.bind_auto()?;
        diag.connect(&NlAddr::new(0, 0))?;
        Ok(Enforcer {
            raw4: raw(Domain::IPV4)?,
            raw6: raw(Domain::IPV6)?,
            diag,
            seq: 0,
        })
    }

    /// Whether this kernel can destroy sockets (CONFIG_INET_DIAG_DESTROY): a
    /// destroy of a socket that cannot exist (port 0 both ends) answers ENOENT
    /// when supported and EOPNOTSUPP when not.
    pub fn probe_destroy(&mut self) -> Result<()> {
        let unspec: SocketAddr = "0.0.0.0:0".parse().expect("literal");
        match self.exchange(true, request(&socket_id(unspec, unspec))) {
            Ok(_) => Ok(()),
            Err(e) => match e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) {
                Some(2) => Ok(()),
                Some(95) => bail!("this kernel cannot tear down sockets (SOCK_DESTROY needs CONFIG_INET_DIAG_DESTROY); use --action log or --defer-reject"),
                _ => Err(e).context("probing SOCK_DESTROY"),
            },
        }
    }

    /// Replies to the client and tears down the MTA's socket.
    pub fn deny(&mut self, key: &ConnKey, conn: &Conn, action: Action) -> Outcome {
        let client = client_of(key);
        let server = server_of(key);
        Outcome {
            reply_error: self
                .reply(client, server, conn, action)
                .err()
                .map(|e| format!("{e:#}")),
            destroy_error: self.destroy(client, server).err().map(|e| format!("{e:#}")),
        }
    }

    fn reply(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        conn: &Conn,
        action: Action,
    ) -> Result<()> {
        let pkt = reply_packet(client, server, conn, action)?;
        let sock = match client {
            SocketAddr::V4(_) => &self.raw4,
            SocketAddr::V6(_) => &self.raw6,
        };
        let to = SockAddr::from(SocketAddr::new(client.ip(), 0));
        let n = sock.send_to(&pkt, &to).context("sending the reply")?;
        if n != pkt.len() {
            bail!("reply sent short ({n} of {} bytes)", pkt.len());
        }
        Ok(())
    }

    /// SOCK_DESTROY of the MTA's socket, identified by cookie: an exact lookup
    /// that misses the connection falls back to the listening socket, which must
    /// never be hit, so the socket is first queried and checked.
    fn destroy(&mut self, client: SocketAddr, server: SocketAddr) -> Result<()> {
        let mut id = socket_id(client, server);
        let found = self
            .exchange(false, request(&id))
            .context("looking up the MTA's socket")?
            .ok_or_else(|| anyhow!("the MTA's socket is already gone"))?;
        if found.1 == TCP_LISTEN || found.0.destination_port != client.port() {
            bail!(
                "lookup returned another socket (state {}), not destroying it",
                found.1
            );
        }
        id.cookie = found.0.cookie;
        self.exchange(true, request(&id)).context("SOCK_DESTROY")?;
        Ok(())
    }

    /// Sends one sock_diag request and reads the answer: for a query, the socket
    /// found (its id and state); for a destroy, the ack.
    fn exchange(&mut self, destroy: bool, req: InetRequest) -> Result<Option<(SocketId, u8)>> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | if destroy { NLM_F_ACK } else { 0 };
        hdr.sequence_number = self.seq;
        let buf = if destroy {
            serialize(NetlinkMessage::new(
                hdr,
                NetlinkPayload::from(SockDiagDestroy::new(SockDiagMessage::InetRequest(req))),
            ))
        } else {
            serialize(NetlinkMessage::new(
                hdr,
                NetlinkPayload::from(SockDiagMessage::InetRequest(req)),
            ))
        };
        self.diag.send(&buf, 0).context("netlink send")?;
        let mut rbuf = vec![0u8; 8192];
        // Bounded: answers carrying another sequence number are stale; skip a few.
        for _ in 0..8 {
            let n = self
                .diag
                .recv(&mut &mut rbuf[..], 0)
                .context("netlink recv")?;
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rbuf[..n])
                .map_err(|e| anyhow!("netlink answer: {e}"))?;
            if msg.header.sequence_number != self.seq {
                continue;
            }
            return match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    Ok(Some((r.header.socket_id.clone(), r.header.state)))
                }
                NetlinkPayload::Error(e) => match e.code {
                    None => Ok(None),
                    // ENOENT: no such socket.
                    Some(c) if c.get() == -2 && !destroy => Ok(None),
                    Some(c) => Err(std::io::Error::from_raw_os_error(-c.get()).into()),
                },
                other => Err(anyhow!("unexpected netlink answer {other:?}")),
            };
        }
        bail!("no netlink answer to request {}", self.seq)
    }
}

fn serialize<T: NetlinkSerializable + std::fmt::Debug>(mut msg: NetlinkMessage<T>) -> Vec<u8> {
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The MTA's socket as sock_diag names it: source = local (server) side.
fn socket_id(client: SocketAddr, server: SocketAddr) -> SocketId {
    SocketId {
        source_port: server.port(),
        destination_port: client.port(),
        source_address: server.ip(),
        destination_address: client.ip(),
        interface_id: 0,
        // INET_DIAG_NOCOOKIE until the real cookie is known.
        cookie: [0xff; 8],
    }
}

fn request(id: &SocketId) -> InetRequest {
    InetRequest {
        family: match id.source_address {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        },
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: id.clone(),
    }
}

/// The reply segment: IP + TCP(ACK, PSH, FIN) + one SMTP reply line.
pub fn reply_packet(
    client: SocketAddr,
    server: SocketAddr,
    conn: &Conn,
    action: Action,
) -> Result<Vec<u8>> {
    let payload = reply_line(action);
    let seq = conn.server_isn.wrapping_add(1);
    let builder = match (server.ip(), client.ip()) {
        (IpAddr::V4(s), IpAddr::V4(c)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), c.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(c)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), c.octets(), 64)
        }
        _ => bail!("mixed address families"),
    };
    let b = builder
        .tcp(server.port(), client.port(), seq, 64240)
        .ack(conn.client_end)
        .psh()
        .fin();
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload.as_bytes())
        .map_err(|e| anyhow!("building the reply: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::tests::{conn, key4};

    #[test]
    fn reply_lines_follow_rfc5321() {
        assert_eq!(
            reply_line(Action::Deny),
            "554 5.7.1 Connecting host started transmitting before SMTP greeting\r\n"
        );
        assert!(reply_line(Action::Denysoft).starts_with("421 4.7.1 Connecting host"));
        // RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with CRLF.
        assert!(reply_line(Action::Deny).len() <= 512);
    }

    #[test]
    fn reply_packet_is_valid_tcp() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let mut c = conn(b"EHLO bot\r\n");
        c.server_isn = u32::MAX; // the reply's seq wraps to 0
        let pkt = reply_packet(client_of(&k), server_of(&k), &c, Action::Deny).unwrap();
        let p = etherparse::SlicedPacket::from_ip(&pkt).unwrap();
        let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
            panic!("not TCP")
        };
        assert_eq!((tcp.source_port(), tcp.destination_port()), (25, 40000));
        assert_eq!(tcp.sequence_number(), 0);
        assert_eq!(tcp.acknowledgment_number(), c.client_end);
        assert!(tcp.fin() && tcp.ack() && tcp.psh() && !tcp.syn() && !tcp.rst());
        assert_eq!(tcp.payload(), reply_line(Action::Deny).as_bytes());
        // The checksum verifies over the pseudo-header.
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4")
        };
        let sum = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
            .unwrap();
        assert_eq!(sum, tcp.checksum());
    }
}
