//! sock_diag: what the server's TCP stack holds for one connection (an exact
//! lookup), and SOCK_DESTROY of an accepted socket. Used by enforcement (tear
//! down the MTA's socket) and by the releaser (did the release complete the
//! handshake?).

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NlSocket, SocketAddr as NlAddr};
use std::net::{IpAddr, SocketAddr};

/// TCP states in the kernel's numbering, as sock_diag reports them.
pub const TCP_ESTABLISHED: u8 = 1;
/// A request socket (the handshake's last ACK not yet taken).
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_LISTEN: u8 = 10;

/// What the server side holds for a client's 4-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// Nothing but the listener (a SYN cookie not yet completed, or gone).
    Nothing,
    /// A request socket: the handshake is not complete.
    Request,
    /// A full socket, in this TCP state: accepted, or waiting in the accept queue.
    Socket(u8),
}

/// A socket sock_diag answered with.
struct Found {
    id: SocketId,
    state: u8,
    recv_queue: u32,
    send_queue: u32,
}

pub struct Diag {
    sock: NlSocket,
    seq: u32,
}

impl Diag {
    pub fn new() -> Result<Self> {
        let mut sock = NlSocket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        sock.bind_auto()?;
        sock.connect(&NlAddr::new(0, 0))?;
        Ok(Diag { sock, seq: 0 })
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

    /// The server's state for this connection. An exact lookup that finds no
    /// connection answers with the listener, which counts as Nothing.
    pub fn server(&mut self, client: SocketAddr, server: SocketAddr) -> Result<Server> {
        Ok(match self.find(client, server)? {
            None => Server::Nothing,
            Some((_, TCP_SYN_RECV)) => Server::Request,
            Some((_, state)) => Server::Socket(state),
        })
    }

    /// The connection's socket (not the listener), if any.
    fn find(&mut self, client: SocketAddr, server: SocketAddr) -> Result<Option<(SocketId, u8)>> {
        let found = self
            .exchange(false, request(&socket_id(client, server)))
            .context("looking up the server's socket")?;
        Ok(found
            .filter(|f| f.state != TCP_LISTEN && f.id.destination_port == client.port())
            .map(|f| (f.id, f.state)))
    }

    /// The accept queue of the listener that serves `server`: (connections
    /// waiting for accept(), its size), or None if nothing listens there. An
    /// exact lookup for a peer that cannot exist (the unspecified address, port
    /// 0) finds no connection and answers with the listener.
    pub fn accept_queue(&mut self, server: SocketAddr) -> Result<Option<(u32, u32)>> {
        let nobody = SocketAddr::new(
            match server {
                SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            },
            0,
        );
        let found = self
            .exchange(false, request(&socket_id(nobody, server)))
            .context("looking up the listener")?;
        // For a listener, sock_diag reports the accept queue as rqueue and its
        // size (the listen backlog, capped by somaxconn) as wqueue.
        Ok(found
            .filter(|f| f.state == TCP_LISTEN)
            .map(|f| (f.recv_queue, f.send_queue)))
    }

    /// SOCK_DESTROY of the MTA's socket, identified by cookie so that nothing
    /// else (never the listener) is hit. Ok(false) if there is no such socket.
    pub fn destroy(&mut self, client: SocketAddr, server: SocketAddr) -> Result<bool> {
        let Some((found, state)) = self.find(client, server)? else {
            return Ok(false);
        };
        if state == TCP_SYN_RECV {
            // A request socket: the caller resets it with a forged RST instead.
            return Ok(false);
        }
        let mut id = socket_id(client, server);
        id.cookie = found.cookie;
        self.exchange(true, request(&id)).context("SOCK_DESTROY")?;
        Ok(true)
    }

    /// Sends one sock_diag request and reads the answer: for a query, the socket
    /// found; for a destroy, the ack.
    fn exchange(&mut self, destroy: bool, req: InetRequest) -> Result<Option<Found>> {
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
        self.sock.send(&buf, 0).context("netlink send")?;
        let mut rbuf = vec![0u8; 8192];
        // Bounded: answers carrying another sequence number are stale; skip a few.
        for _ in 0..8 {
            let n = self
                .sock
                .recv(&mut &mut rbuf[..], 0)
                .context("netlink recv")?;
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rbuf[..n])
                .map_err(|e| anyhow!("netlink answer: {e}"))?;
            if msg.header.sequence_number != self.seq {
                continue;
            }
            return match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(Found {
                    id: r.header.socket_id.clone(),
                    state: r.header.state,
                    recv_queue: r.header.recv_queue,
                    send_queue: r.header.send_queue,
                })),
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

/// The server's socket as sock_diag names it: source = local (server) side.
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
