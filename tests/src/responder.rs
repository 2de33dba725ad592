//! A minimal SMTP server for the lab's server namespace that records every
//! byte it receives, by client port.

use crate::lab::Lab;
use anyhow::{anyhow, Context, Result};
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// What the responder saw on one connection.
#[derive(Clone, Debug)]
pub struct Session {
    pub received: Vec<u8>,
    /// The client's side ended (EOF, reset or error) and the socket was closed.
    pub closed: bool,
    pub accepted_at: Instant,
    pub closed_at: Option<Instant>,
    /// How the socket ended: "eof", or the error of the read/write that failed.
    pub end: String,
    /// The socket's TCP_INFO once the client's first bytes were read (after
    /// the greeting went out, so one round trip has been timed).
    pub info: Option<TcpState>,
}

/// What TCP_INFO says about a socket's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpState {
    pub rto_us: u32,
    pub rtt_us: u32,
    /// TCPI_OPT_* bits: timestamps 1, SACK 2, window scaling 4.
    pub options: u8,
    /// Send and receive window scale, as negotiated.
    pub wscale: (u8, u8),
    pub snd_cwnd: u32,
}

impl TcpState {
    pub fn of(fd: std::os::fd::BorrowedFd<'_>) -> Option<TcpState> {
        use nix::libc;
        use std::os::fd::AsRawFd;
        // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
        let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a valid socket, a buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut ti).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(TcpState {
            rto_us: ti.tcpi_rto,
            rtt_us: ti.tcpi_rtt,
            options: ti.tcpi_options,
            wscale: (ti.tcpi_snd_rcv_wscale & 0x0f, ti.tcpi_snd_rcv_wscale >> 4),
            snd_cwnd: ti.tcpi_snd_cwnd,
        })
    }
}

/// How the responder listens and accepts.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub port: u16,
    pub greet_delay: Duration,
    /// The listen backlog (the accept queue's size).
    pub backlog: i32,
    /// A slow MTA: this long between two accepts.
    pub accept_pause: Duration,
    /// Accept TCP Fast Open (data in the SYN) on the listener.
    pub fastopen: bool,
    /// TCP_DEFER_ACCEPT seconds (0: off).
    pub defer_accept: i32,
}

impl Listen {
    pub fn new(port: u16) -> Self {
        Listen {
            port,
            greet_delay: Duration::ZERO,
            backlog: 128,
            accept_pause: Duration::ZERO,
            fastopen: false,
            defer_accept: 0,
        }
    }
}

/// A greet_delay meaning "never greet".
pub const NEVER: Duration = Duration::MAX;

/// A minimal SMTP server: greets (optionally late), answers EHLO/HELO/QUIT and
/// records every byte it receives, keyed by the client's port.
pub struct Responder {
    pub port: u16,
    sessions: Arc<Mutex<HashMap<u16, Session>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<Result<Result<()>>>>,
}

impl Responder {
    /// Listens on all addresses of the server namespace.
    pub fn start(lab: &Lab, port: u16, greet_delay: Duration) -> Result<Self> {
        Self::start_with(
            lab,
            Listen {
                greet_delay,
                ..Listen::new(port)
            },
        )
    }

    /// Listens as `how` says. accept() is called as soon as a connection is
    /// ready (poll), so accept times are the kernel's, not a polling period's.
    pub fn start_with(lab: &Lab, how: Listen) -> Result<Self> {
        let sessions: Arc<Mutex<HashMap<u16, Session>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s2, st2) = (sessions.clone(), stop.clone());
        let port = how.port;
        let accept = lab.in_server(move || -> Result<()> {
            let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.set_only_v6(false)?;
            sock.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
                .context("responder bind")?;
            if how.fastopen {
                set_int(&sock, nix::libc::TCP_FASTOPEN, 16).context("TCP_FASTOPEN")?;
            }
            if how.defer_accept > 0 {
                set_int(&sock, nix::libc::TCP_DEFER_ACCEPT, how.defer_accept)
                    .context("TCP_DEFER_ACCEPT")?;
            }
            sock.listen(how.backlog)?;
            let l: TcpListener = sock.into();
            l.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !st2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let s3 = s2.clone();
                        let delay = how.greet_delay;
                        thread::spawn(move || serve(c, peer, delay, s3));
                        if !how.accept_pause.is_zero() {
                            thread::sleep(how.accept_pause);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        use std::os::fd::AsFd;
                        let mut fds = [nix::poll::PollFd::new(
                            l.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        // Bounded, so the stop flag is seen.
                        let _ = nix::poll::poll(&mut fds, 50u16);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("responder did not start"))?;
        Ok(Responder {
            port,
            sessions,
            stop,
            accept: Some(accept),
        })
    }

    /// Connections the server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    pub fn session(&self, client_port: u16) -> Option<Session> {
        self.sessions.lock().ok()?.get(&client_port).cloned()
    }

    /// Waits (bounded) until the session of `client_port` is closed.
    pub fn wait_closed(&self, client_port: u16, timeout: Duration) -> Option<Session> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.session(client_port) {
                if s.closed {
                    return Some(s);
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// An int TCP option on a socket.
fn set_int(
    sock: &socket2::Socket,
    opt: nix::libc::c_int,
    v: nix::libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        nix::libc::setsockopt(
            sock.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn serve(
    mut c: TcpStream,
    peer: SocketAddr,
    greet_delay: Duration,
    sessions: Arc<Mutex<HashMap<u16, Session>>>,
) {
    let port = peer.port();
    let accepted_at = Instant::now();
    // The agent's own questions (its PIPECONNECT probe, over loopback in the
    // server namespace) are served but not recorded: their ports are the
    // server namespace's, and may equal a lab client's.
    let local = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_canonical().is_loopback(),
        v4 => v4.is_loopback(),
    };
    // A second handle for TCP_INFO, so the recorder does not borrow `c`.
    let probe = c.try_clone().ok();
    let record = |data: &[u8], end: Option<String>| {
        if local {
            return;
        }
        if let Ok(mut m) = sessions.lock() {
            let s = m.entry(port).or_insert_with(|| Session {
                received: Vec::new(),
                closed: false,
                accepted_at,
                closed_at: None,
                end: String::new(),
                info: None,
            });
            if s.info.is_none() && !data.is_empty() {
                use std::os::fd::AsFd;
                s.info = probe.as_ref().and_then(|p| TcpState::of(p.as_fd()));
            }
            s.received.extend_from_slice(data);
            if let Some(e) = end {
                s.closed = true;
                s.closed_at = Some(Instant::now());
                s.end = e;
            }
        }
    };
    record(b"", None);
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    if greet_delay != NEVER {
        if !greet_delay.is_zero() {
            thread::sleep(greet_delay);
        }
        // The greeting is written at once after accept: any delay is earlytalker's.
        if let Err(e) = c.write_all(b"220 lab.example ESMTP responder\r\n") {
            record(b"", Some(format!("write: {e}")));
            return;
        }
    }
    let mut line = Vec::new();
    let mut buf = [0u8; 16384];
    let end = loop {
        let n = match c.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Err(e) => break format!("read: {e}"),
            Ok(n) => n,
        };
        record(&buf[..n], None);
        for &b in &buf[..n] {
            line.push(b);
            if b != b'\n' && line.len() < 1000 {
                continue;
            }
            let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
            let reply: Option<&[u8]> = match verb.as_deref() {
                Some(b"EHLO") | Some(b"HELO") => Some(b"250 lab.example\r\n"),
                Some(b"QUIT") => Some(b"221 bye\r\n"),
                _ => None,
            };
            if let Some(r) = reply {
                let _ = c.write_all(r);
            }
            line.clear();
        }
    };
    record(b"", Some(end));
}
