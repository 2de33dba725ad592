//! SMTP clients for the lab's client namespace: polite ones, bots that talk
//! at once, whole transactions, and a Postfix policy client.

use anyhow::{anyhow, bail, Context, Result};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// What a client saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub local_port: u16,
    /// From connect() returning to the greeting's first line being read.
    pub greeting_after: Duration,
    /// From the connect() call to the greeting: the handshake, which starts a
    /// hold, ends between the call and its return (a busy machine may run the
    /// client late after it), so "never early" is judged from the call.
    pub since_connect_call: Duration,
    pub greeting: String,
}

fn connect(server: SocketAddr) -> Result<TcpStream> {
    let c = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .with_context(|| format!("connect {server}"))?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// `connect`, from the source address `src` if given (one of the client's).
pub fn connect_from(src: Option<std::net::IpAddr>, server: SocketAddr) -> Result<TcpStream> {
    let Some(ip) = src else {
        return connect(server);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.connect_timeout(&server.into(), Duration::from_secs(5))
        .with_context(|| format!("connect {server} from {ip}"))?;
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.set_nodelay(true)?;
    Ok(c)
}

fn read_line(r: &mut BufReader<TcpStream>) -> Result<String> {
    let mut l = String::new();
    r.read_line(&mut l).context("reading a reply")?;
    if l.is_empty() {
        bail!("connection closed before a reply");
    }
    Ok(l)
}

/// How a client behaves before the greeting.
#[derive(Clone, Debug)]
pub enum Manner {
    /// Waits for the greeting, then EHLO/QUIT.
    Polite,
    /// Sends these bytes right after connect, then reads the greeting.
    Bot(Vec<u8>),
    /// Sends these bytes after the given pause, before the greeting.
    Midway(Duration, Vec<u8>),
}

/// One SMTP client session from the current thread's namespace.
pub fn session(server: SocketAddr, manner: &Manner) -> Result<Seen> {
    let called = Instant::now();
    let c = connect(server)?;
    let t0 = Instant::now();
    let local_port = c.local_addr()?.port();
    let mut w = c.try_clone()?;
    match manner {
        Manner::Polite => {}
        Manner::Bot(b) => w.write_all(b)?,
        Manner::Midway(d, b) => {
            thread::sleep(*d);
            w.write_all(b)?;
        }
    }
    let mut r = BufReader::new(c);
    let greeting = read_line(&mut r)?;
    let greeting_after = t0.elapsed();
    let since_connect_call = called.elapsed();
    w.write_all(b"EHLO client.example\r\n")?;
    let _ = read_line(&mut r)?;
    w.write_all(b"QUIT\r\n")?;
    let _ = read_line(&mut r);
    Ok(Seen {
        local_port,
        greeting_after,
        since_connect_call,
        greeting,
    })
}

/// Reads the greeting, then sends `data` and half-closes; returns the local port.
pub fn send_after_greeting(server: SocketAddr, data: &[u8]) -> Result<u16> {
    let c = connect(server)?;
    let port = c.local_addr()?.port();
    let mut r = BufReader::new(c.try_clone()?);
    read_line(&mut r)?;
    let mut w = c;
    w.write_all(data)?;
    w.shutdown(Shutdown::Write)?;
    // Drain until the server closes, so the data is surely delivered.
    let mut sink = Vec::new();
    let _ = r.read_to_end(&mut sink);
    Ok(port)
}

/// A bot that sends `data` at once (then half-closes if `fin`), and reads
/// everything the server sends until EOF or reset (bounded by 15 s).
#[derive(Clone, Debug)]
pub struct BotRun {
    pub local_port: u16,
    pub received: Vec<u8>,
    /// "eof", "reset" or an error description.
    pub end: String,
    pub elapsed: Duration,
}

pub fn bot_read_all(server: SocketAddr, data: &[u8], fin: bool) -> Result<BotRun> {
    bot_from(None, server, data, fin)
}

/// `bot_read_all` from the source address `from` (one of the client's).
pub fn bot_from(
    from: Option<std::net::IpAddr>,
    server: SocketAddr,
    data: &[u8],
    fin: bool,
) -> Result<BotRun> {
    let mut c = connect_from(from, server)?;
    let t0 = Instant::now();
    let local_port = c.local_addr()?.port();
    c.write_all(data)?;
    if fin {
        c.shutdown(Shutdown::Write)?;
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".into(),
            Err(e) => break format!("{e}"),
        }
    };
    Ok(BotRun {
        local_port,
        received,
        end,
        elapsed: t0.elapsed(),
    })
}

/// One Postfix policy request over TCP; returns the action line's value.
pub fn policy_query(addr: SocketAddr, attrs: &[(&str, &str)]) -> Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = String::new();
    for (k, v) in attrs {
        req.push_str(&format!("{k}={v}\n"));
    }
    req.push('\n');
    c.write_all(req.as_bytes())?;
    let mut r = BufReader::new(c);
    let line = read_line(&mut r)?;
    line.trim_end()
        .strip_prefix("action=")
        .map(str::to_string)
        .ok_or_else(|| anyhow!("odd policy answer {line:?}"))
}

/// Deterministic pseudo-random bytes (xorshift), for integrity checks.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An SMTP reply: its code and all its text lines.
fn smtp_reply(r: &mut BufReader<TcpStream>) -> Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let l = read_line(r)?;
        text.push_str(&l);
        if l.len() < 4 {
            bail!("short reply line {l:?}");
        }
        if l.as_bytes()[3] != b'-' {
            let code = l[..3].parse().with_context(|| format!("reply {l:?}"))?;
            return Ok((code, text));
        }
    }
}

/// A whole SMTP transaction. With `early`, the client sends its EHLO before the
/// greeting (a bot); otherwise it waits (polite). Returns the code of each
/// reply: greeting, EHLO, MAIL, RCPT, and DATA + end of data when RCPT passed.
pub fn smtp_transaction(
    server: SocketAddr,
    early: bool,
    from: &str,
    to: &str,
) -> Result<(u16, Vec<(u16, String)>)> {
    smtp_transaction_from(None, server, early, from, to)
}

/// `smtp_transaction` from the source address `src` (one of the client's).
pub fn smtp_transaction_from(
    src: Option<std::net::IpAddr>,
    server: SocketAddr,
    early: bool,
    from: &str,
    to: &str,
) -> Result<(u16, Vec<(u16, String)>)> {
    let c = connect_from(src, server)?;
    let port = c.local_addr()?.port();
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    let mut replies = Vec::new();
    if early {
        w.write_all(b"EHLO bot.example\r\n")?;
        replies.push(smtp_reply(&mut r)?);
    } else {
        replies.push(smtp_reply(&mut r)?);
        w.write_all(b"EHLO polite.example\r\n")?;
    }
    replies.push(smtp_reply(&mut r)?);
    for cmd in [
        format!("MAIL FROM:<{from}>\r\n"),
        format!("RCPT TO:<{to}>\r\n"),
    ] {
        w.write_all(cmd.as_bytes())?;
        let rep = smtp_reply(&mut r)?;
        let ok = rep.0 / 100 == 2;
        replies.push(rep);
        if !ok {
            let _ = w.write_all(b"QUIT\r\n");
            return Ok((port, replies));
        }
    }
    w.write_all(b"DATA\r\n")?;
    replies.push(smtp_reply(&mut r)?);
    w.write_all(format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: lab {port}\r\n\r\nhello from port {port}\r\n.\r\n").as_bytes())?;
    replies.push(smtp_reply(&mut r)?);
    w.write_all(b"QUIT\r\n")?;
    let _ = smtp_reply(&mut r);
    Ok((port, replies))
}

/// swaks (a real SMTP client) from the lab's client namespace to the server's
/// port 25: one message from polite@client.example to `to`, plus `extra` flags
/// (e.g. `--pipeline`, `--body`). Returns whether it succeeded and its transcript.
pub fn swaks(lab: &crate::Lab, to: &str, extra: &[&str]) -> (bool, String) {
    swaks_via(lab, crate::SERVER_V4, to, extra)
}

/// `swaks` to another server (e.g. a sending MTA on the client's loopback).
pub fn swaks_via(lab: &crate::Lab, server: &str, to: &str, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.client_ns, "swaks", "--server", server])
        .args(["--from", "polite@client.example", "--to", to])
        .args(["--helo", "polite.example", "--timeout", "20"])
        .args(extra)
        .output()
        .expect("swaks (cargo xtask test installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
