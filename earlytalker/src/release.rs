//! The release of held connections, on a thread of its own so that its timing
//! never waits behind logging, policy queries or map walks.
//!
//! A held connection is a request socket (or a SYN cookie) the MTA cannot accept:
//! the kernel withholds the client's handshake-completing ACK. At the release
//! time this thread sends that ACK itself, forged from the client and routed to
//! the server's own address, and the MTA accepts and greets within a millisecond.
//!
//! * Fresh state: the kernel's entry is read just before each send (and each
//!   re-send), so a client that talked, hung up or was denied is never connected.
//! * Paced by the MTA's accept queue: a release is sent only while the listener's
//!   queue of connections waiting for accept() is under half its size (read with
//!   sock_diag), so a burst never overflows it (a SYN cookie whose ACK is dropped
//!   there has nothing to retransmit it), and a slow greeting (an MTA resolving
//!   the client's name) holds nobody else back.
//! * Checked: a release the MTA has not greeted within CHECK_AFTER is looked up
//!   with sock_diag; if the handshake is still not complete, it is sent again
//!   with back-off, up to TRIES times.
//! * Fail open: on stop, every connection still held is released at once (the
//!   programs are detached first). If the agent dies, the programs go with it,
//!   and a request socket completes with the client's answer to the next SYN-ACK
//!   retransmission.

use crate::{
    counts::{AgentStat, Counts},
    diag::{Diag, Server},
    events::{client_of, server_of},
    forge::{self, Raw},
};
use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use earlytalker_common::{Conn, ConnFlags, ConnKey};
use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender},
    thread::JoinHandle,
    time::Duration,
};

/// Releases fill a listener's accept queue to at most 1/QUEUE_SHARE of its size
/// (half: the MTA's other clients, not held, need room too).
const QUEUE_SHARE: u32 = 2;
/// Releases sent without asking when the listener cannot be looked up.
const BLIND_ROOM: u32 = 50;
/// First look at a release the MTA has not greeted; doubled for each re-send.
const CHECK_AFTER_NS: u64 = 20_000_000;
/// Sends of one release, at most.
const TRIES: u32 = 5;
/// An accepted connection is watched this long for its greeting at most (the
/// MTA may be resolving the client's name); after that it is the MTA's.
const ACCEPTED_MAX_NS: u64 = 2_000_000_000;
/// The longest sleep when nothing is due (stop requests still wake it at once).
const IDLE: Duration = Duration::from_secs(1);
/// How soon a full accept queue is looked at again.
const QUEUE_POLL_NS: u64 = 250_000;

pub fn monotonic_ns() -> u64 {
    // Same clock as bpf_ktime_get_ns.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

enum Msg {
    Hold(ConnKey, u64),
    /// A balancer's PROXY header: the release carries it to the MTA.
    Header(ConnKey, Vec<u8>),
    Stop,
}

/// PROXY headers kept for releases at most; beyond, releases go without
/// (the balancer's retransmission brings the header, later).
const HEADERS_MAX: usize = 65_536;

/// What the thread needs, opened while the agent still has its privileges.
pub struct Parts {
    pub conns: HashMap<MapData, ConnKey, Conn>,
    pub raw: Raw,
    pub diag: Diag,
    pub counts: Counts,
}

pub struct Releaser {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    /// The thread is gone (logged once).
    dead: std::cell::Cell<bool>,
}

impl Releaser {
    pub fn start(parts: Parts) -> Result<Self> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("release".into())
            .spawn(move || Worker::new(parts).run(&rx))
            .context("starting the release thread")?;
        Ok(Releaser {
            tx,
            thread: Some(thread),
            dead: std::cell::Cell::new(false),
        })
    }

    /// A connection the kernel holds until `at_ns` (CLOCK_MONOTONIC).
    pub fn hold(&self, key: ConnKey, at_ns: u64) {
        if self.tx.send(Msg::Hold(key, at_ns)).is_err() && !self.dead.replace(true) {
            // Held clients then wait for their own answer to the server's next
            // SYN-ACK retransmission (at most 1, 2, 4… s late): said once.
            log::error!("the release thread has stopped; held clients are released late");
        }
    }

    /// The PROXY header that `key`'s balancer sent while held: the release
    /// ACK carries it, so the MTA reads it at once rather than at the
    /// balancer's next retransmission.
    pub fn header(&self, key: ConnKey, header: Vec<u8>) {
        let _ = self.tx.send(Msg::Header(key, header));
    }

    /// Releases every connection still held, now. Call after detaching the
    /// programs, so that the clients' own segments flow too.
    pub fn stop(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(PartialEq, Eq)]
struct Due {
    at: u64,
    key: ConnKey,
}

impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        let k = |d: &Due| {
            (
                d.at,
                d.key.client_addr,
                d.key.client_port,
                d.key.server_addr,
                d.key.server_port,
            )
        };
        k(self).cmp(&k(o))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// A release sent and not yet greeted.
struct Flight {
    key: ConnKey,
    first_ns: u64,
    tries: u32,
    check_ns: u64,
}

struct Worker {
    p: Parts,
    due: BinaryHeap<Reverse<Due>>,
    flight: Vec<Flight>,
    /// Set when the next due release waits for room in an accept queue.
    queue_full: bool,
    /// Errors are logged once each (a broken raw socket would fail every send).
    logged: std::collections::HashSet<String>,
    /// PROXY headers of held connections, until their release is done.
    headers: std::collections::HashMap<ConnKey, Vec<u8>>,
}

/// What the kernel's entry says about a release.
enum State {
    /// Still held and undecided: release it.
    Held(Conn),
    /// Greeted, ended, denied, or its data already completed the handshake.
    Done,
}

impl Worker {
    fn new(p: Parts) -> Self {
        Worker {
            p,
            due: BinaryHeap::new(),
            flight: Vec::new(),
            queue_full: false,
            logged: Default::default(),
            headers: Default::default(),
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            let now = monotonic_ns();
            self.check(now);
            self.release_due(now);
            let wait = self.next_wake().map_or(IDLE, |at| {
                Duration::from_nanos(at.saturating_sub(monotonic_ns())).min(IDLE)
            });
            let mut msg = rx.recv_timeout(wait);
            // Everything queued, without sleeping again.
            loop {
                match msg {
                    Ok(Msg::Hold(key, at)) => self.due.push(Reverse(Due { at, key })),
                    Ok(Msg::Header(key, h)) => {
                        if self.headers.len() < HEADERS_MAX {
                            self.headers.insert(key, h);
                        }
                    }
                    Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        self.release_all();
                        return;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
                msg = rx.try_recv().map_err(|e| match e {
                    std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                });
            }
        }
    }

    fn next_wake(&self) -> Option<u64> {
        let release = if self.queue_full {
            // Look again soon whether the MTA has accepted some.
            self.due
                .peek()
                .map(|d| d.0.at.max(monotonic_ns() + QUEUE_POLL_NS))
        } else {
            self.due.peek().map(|d| d.0.at)
        };
        let check = self.flight.iter().map(|f| f.check_ns).min();
        match (release, check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn state(&self, key: &ConnKey) -> State {
        match self.p.conns.get(key, 0) {
            Ok(c) if c.before_accept() && !c.has(ConnFlags::DENY | ConnFlags::REPORTED) => {
                State::Held(c)
            }
            _ => State::Done,
        }
    }

    fn release_due(&mut self, now: u64) {
        self.queue_full = false;
        // Room in each listener's accept queue, looked up once per round.
        let mut room: std::collections::HashMap<std::net::SocketAddr, u32> = Default::default();
        loop {
            let key = match self.due.peek() {
                Some(d) if d.0.at <= now => d.0.key,
                _ => return,
            };
            let server = server_of(&key);
            let left = match room.get(&server) {
                Some(n) => *n,
                None => {
                    let n = self.room(server);
                    room.insert(server, n);
                    n
                }
            };
            if left == 0 {
                // In deadline order: the rest waits for this listener too.
                self.queue_full = true;
                return;
            }
            self.due.pop();
            let state = self.state(&key);
            if matches!(state, State::Done) && !self.headers.is_empty() {
                self.headers.remove(&key);
            }
            if let State::Held(c) = state {
                if self.send(&key, &c, now) {
                    self.p.counts.add(AgentStat::Released);
                    room.insert(server, left - 1);
                    self.flight.push(Flight {
                        key,
                        first_ns: now,
                        tries: 1,
                        check_ns: now + CHECK_AFTER_NS,
                    });
                }
            }
        }
    }

    /// How many more releases `server`'s listener can take now.
    fn room(&mut self, server: std::net::SocketAddr) -> u32 {
        match self.p.diag.accept_queue(server) {
            Ok(Some((queued, size))) => (size / QUEUE_SHARE).max(1).saturating_sub(queued),
            // Nothing listens: the release completes nothing, but costs nothing.
            Ok(None) => BLIND_ROOM,
            Err(e) => {
                self.once(format!("reading the accept queue of {server}: {e:#}"));
                BLIND_ROOM
            }
        }
    }

    /// Releases the MTA has not greeted yet: still a request socket (or an
    /// uncompleted cookie) means the ACK was lost (an accept queue full, say):
    /// sent again from fresh state.
    fn check(&mut self, now: u64) {
        let mut i = 0;
        while i < self.flight.len() {
            let f = &self.flight[i];
            if now < f.check_ns {
                i += 1;
                continue;
            }
            let key = f.key;
            let keep = match self.state(&key) {
                State::Done => false,
                State::Held(c) => self.recheck(i, &key, &c, now),
            };
            if keep {
                i += 1;
            } else {
                if !self.headers.is_empty() {
                    self.headers.remove(&key);
                }
                self.flight.swap_remove(i);
            }
        }
    }

    /// One overdue release; true to keep watching it.
    fn recheck(&mut self, i: usize, key: &ConnKey, c: &Conn, now: u64) -> bool {
        let (first, tries) = (self.flight[i].first_ns, self.flight[i].tries);
        match self.p.diag.server(client_of(key), server_of(key)) {
            Ok(Server::Socket(_)) => {
                // Accepted (or in the accept queue): the MTA is slow to greet.
                self.flight[i].check_ns = now + CHECK_AFTER_NS * 4;
                now.saturating_sub(first) < ACCEPTED_MAX_NS
            }
            Ok(Server::Nothing) if !c.has(ConnFlags::COOKIE) => {
                // The request socket is gone (expired or reset): nothing to complete.
                self.give_up(key, "the server dropped its request socket");
                false
            }
            Ok(_) if tries >= TRIES => {
                self.give_up(key, "the handshake did not complete");
                false
            }
            Ok(_) => {
                if self.send(key, c, now) {
                    self.p.counts.add(AgentStat::ReleaseRetries);
                }
                let f = &mut self.flight[i];
                f.tries += 1;
                f.check_ns = now + (CHECK_AFTER_NS << f.tries.min(6));
                true
            }
            Err(e) => {
                self.once(format!("checking a release: {e:#}"));
                false
            }
        }
    }

    fn give_up(&mut self, key: &ConnKey, why: &str) {
        self.p.counts.add(AgentStat::ReleasesAbandoned);
        log::warn!(
            "release of {} to {} abandoned: {why}; the client's next ACK completes it",
            client_of(key),
            server_of(key)
        );
    }

    fn send(&mut self, key: &ConnKey, c: &Conn, now: u64) -> bool {
        let to = server_of(key).ip();
        if c.synacks <= 1 && !c.has(ConnFlags::COOKIE) {
            // Before the ACK, on the same path, so the kernel takes it first.
            if let Err(e) = forge::syn_again(key, c).and_then(|p| self.p.raw.send(&p, to)) {
                self.once(format!("sending a SYN before a release: {e:#}"));
            }
        }
        let header = self.headers.get(key).map_or(&[][..], Vec::as_slice);
        match forge::release_ack(key, c, now, header).and_then(|p| self.p.raw.send(&p, to)) {
            Ok(()) => true,
            Err(e) => {
                self.once(format!("sending a release: {e:#}"));
                false
            }
        }
    }

    fn once(&mut self, msg: String) {
        if self.logged.len() < 16 && self.logged.insert(msg.clone()) {
            log::error!("{msg} (logged once)");
        }
    }

    /// Stop: everything still held goes now, pacing aside.
    fn release_all(&mut self) {
        let now = monotonic_ns();
        let mut n = 0;
        while let Some(Reverse(d)) = self.due.pop() {
            if let State::Held(c) = self.state(&d.key) {
                if self.send(&d.key, &c, now) {
                    self.p.counts.add(AgentStat::Released);
                    n += 1;
                }
            }
        }
        if n > 0 {
            log::info!("released {n} held connection(s) on the way out");
        }
    }
}
