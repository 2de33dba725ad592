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
        let sessions: Arc<Mutex<HashMap<u16, Session>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s2, st2) = (sessions.clone(), stop.clone());
        let accept = lab.in_server(move || -> Result<()> {
            let l = TcpListener::bind(("::", port)).context("responder bind")?;
            l.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !st2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, peer)) => {
                        let s3 = s2.clone();
                        thread::spawn(move || serve(c, peer, greet_delay, s3));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
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

fn serve(
    mut c: TcpStream,
    peer: SocketAddr,
    greet_delay: Duration,
    sessions: Arc<Mutex<HashMap<u16, Session>>>,
) {
    let port = peer.port();
    let record = |data: &[u8], end: Option<String>| {
        if let Ok(mut m) = sessions.lock() {
            let s = m.entry(port).or_insert_with(|| Session {
                received: Vec::new(),
                closed: false,
                accepted_at: Instant::now(),
                closed_at: None,
                end: String::new(),
            });
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
