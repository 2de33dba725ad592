//! A small lab for earlytalker's privileged tests and demo: a client and a server
//! network namespace joined by a veth pair, an SMTP responder in the server
//! namespace, polite and rude clients in the client namespace, and the real agent
//! binary attached to the server's veth. Everything is torn down on drop, and
//! every wait is bounded.

pub mod fuzz;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use serde_json::Value;
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub const SERVER_V4: &str = "10.99.0.1";
pub const CLIENT_V4: &str = "10.99.0.2";
pub const SERVER_V6: &str = "fd00:99::1";
pub const CLIENT_V6: &str = "fd00:99::2";

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Fails, saying how to run it, when not root: the privileged suite loads BPF
/// programs and builds network namespaces.
pub fn require_root() {
    assert!(
        is_root(),
        "the privileged suite needs root (BPF, network namespaces); run `cargo xtask test` as root"
    );
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A client/server namespace pair joined by veth; removed on drop.
pub struct Lab {
    pub server_ns: String,
    pub client_ns: String,
    /// The server's end of the veth pair, where the agent attaches.
    pub server_if: String,
    pub client_if: String,
}

impl Lab {
    pub fn new() -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            server_ns: format!("ets{id}"),
            client_ns: format!("etc{id}"),
            server_if: format!("vs{id}"),
            client_if: format!("vc{id}"),
        };
        // Constructed first so that a failure below still cleans up.
        lab.build()?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let (s, c) = (self.server_ns.as_str(), self.client_ns.as_str());
        run("ip", &["netns", "add", s])?;
        run("ip", &["netns", "add", c])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &self.server_if,
                "netns",
                s,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_if,
                "netns",
                c,
            ],
        )?;
        for (ns, dev, v4, v6) in [
            (s, &self.server_if, SERVER_V4, SERVER_V6),
            (c, &self.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            let ip = |args: &[&str]| {
                let mut a = vec!["-n", ns];
                a.extend_from_slice(args);
                run("ip", &a)
            };
            ip(&["link", "set", "lo", "up"])?;
            ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["link", "set", dev, "up"])?;
        }
        Ok(())
    }

    pub fn server_addr(&self, v6: bool) -> IpAddr {
        if v6 { SERVER_V6 } else { SERVER_V4 }
            .parse()
            .expect("literal")
    }

    /// Runs `f` on a thread that has entered the server namespace.
    pub fn in_server<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        spawn_in(&self.server_ns, f)
    }

    /// Runs `f` on a thread that has entered the client namespace.
    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        spawn_in(&self.client_ns, f)
    }

    /// A scratch directory of this lab's, removed with it.
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/et-lab-{}", self.server_ns))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir().join("control.sock")
    }

    /// One SMTP client session from the client namespace.
    pub fn client(&self, server: SocketAddr, manner: Manner) -> Seen {
        join(self.in_client(move || session(server, &manner)))
            .and_then(|r| r)
            .expect("client session")
    }

    /// A bot from the client namespace (see `bot_read_all`).
    pub fn bot(&self, server: SocketAddr, data: &[u8], fin: bool) -> BotRun {
        let d = data.to_vec();
        join(self.in_client(move || bot_read_all(server, &d, fin)))
            .and_then(|r| r)
            .expect("bot session")
    }

    /// Number of TCX programs attached to the server's veth (ingress + egress).
    pub fn tcx_programs(&self) -> Result<usize> {
        let dev = self.server_if.clone();
        join(self.in_server(move || -> Result<usize> {
            use aya::programs::{SchedClassifier, TcAttachType};
            let mut n = 0;
            for t in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, progs) = SchedClassifier::query_tcx(&dev, t)
                    .map_err(|e| anyhow!("query_tcx {dev}: {e}"))?;
                n += progs.len();
            }
            Ok(n)
        }))?
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting the namespaces removes the veth pair with them.
        let _ = std::fs::remove_dir_all(self.dir());
        let _ = run("ip", &["netns", "del", &self.server_ns]);
        let _ = run("ip", &["netns", "del", &self.client_ns]);
    }
}

/// Spawns a thread that joins network namespace `ns` before running `f`. Network
/// namespaces are per thread, so the rest of the process is unaffected; sockets
/// keep the namespace they were created in.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let fd = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        setns(fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
        Ok(f())
    })
}

/// Joins a lab thread, turning a panic into an error.
pub fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("lab thread panicked"))?
}

// ---------------------------------------------------------------- responder

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

// ---------------------------------------------------------------- clients

/// What a client saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub local_port: u16,
    /// From connect() returning to the greeting's first line being read.
    pub greeting_after: Duration,
    pub greeting: String,
}

fn connect(server: SocketAddr) -> Result<TcpStream> {
    let c = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .with_context(|| format!("connect {server}"))?;
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
    w.write_all(b"EHLO client.example\r\n")?;
    let _ = read_line(&mut r)?;
    w.write_all(b"QUIT\r\n")?;
    let _ = read_line(&mut r);
    Ok(Seen {
        local_port,
        greeting_after,
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
    let mut c = connect(server)?;
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

// ---------------------------------------------------------------- agent

/// Path of the agent binary: $EARLYTALKER_BIN, else the workspace's release build.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EARLYTALKER_BIN") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/earlytalker")
}

/// The agent's command line in the lab's server namespace, on its veth. Each
/// lab's agent has its own state directory and control socket, and the pass
/// cache is off, unless `args` set them: the labs' clients share one address,
/// and a pass in one test must not change the next.
pub fn agent_command(lab: &Lab, args: &[&str]) -> Command {
    agent_command_under(lab, &[], args)
}

/// `agent_command` run through `wrapper` (a program that execs the rest of its
/// command line, such as `setpriv …`), so the child is still the agent.
pub fn agent_command_under(lab: &Lab, wrapper: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.server_ns])
        .args(wrapper)
        .arg(agent_bin())
        .args(["-i", &lab.server_if]);
    let has = |flag: &str| args.contains(&flag);
    if !has("--state-dir") {
        cmd.arg("--state-dir").arg(lab.state_dir());
    }
    if !has("--control-socket") {
        cmd.arg("--control-socket").arg(lab.control_socket());
    }
    if !has("--pass-ttl") {
        cmd.args(["--pass-ttl", "0"]);
    }
    cmd.args(args);
    cmd
}

/// SIGINT to an agent started by `agent_command`, then a bounded wait for its
/// exit (SIGKILL after 10 s, reported as an error).
pub fn stop_agent(child: &mut Child) -> Result<std::process::ExitStatus> {
    // `ip netns exec` execs the agent, so the child pid is the agent's.
    // It may have exited already (e.g. after SIGTERM): nothing to signal then.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("agent did not exit within 10 s of SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The real agent, run inside the server namespace with JSON logs.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent (see `agent_command`) and waits for its "started" line.
    pub fn start(lab: &Lab, args: &[&str]) -> Result<Self> {
        Self::start_under(lab, &[], args)
    }

    /// `start`, through `wrapper` (see `agent_command_under`).
    pub fn start_under(lab: &Lab, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let mut cmd =
            agent_command_under(lab, wrapper, &[&["--log-format", "json"], args].concat());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning the agent")?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, e2) = (child.stderr.take().expect("piped"), stderr.clone());
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut s) = e2.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let mut agent = Agent {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        };
        agent
            .wait_for(Duration::from_secs(20), |v| v["event"] == "started")
            .with_context(|| format!("agent did not start; stderr: {}", agent.stderr()))?;
        Ok(agent)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (bounded) for a line matching `pred`; every line read is kept in `seen`.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return Ok(v.clone());
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no matching agent line within {timeout:?}; saw {:?}",
                    self.seen
                );
            }
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("agent exited; stderr: {}", self.stderr())
                }
            }
        }
    }

    /// The verdict line about a client port, waiting for it (bounded).
    pub fn verdict_for(&mut self, client_port: u16, timeout: Duration) -> Result<Value> {
        let suffix = format!(":{client_port}");
        self.wait_for(timeout, |v| {
            matches!(
                v["event"].as_str(),
                Some("early_talker" | "pass" | "hangup")
            ) && v["client"].as_str().is_some_and(|c| c.ends_with(&suffix))
        })
    }

    /// Reads whatever lines arrive within `d`.
    pub fn drain_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => break,
            }
        }
    }

    pub fn events(&self, kind: &str) -> Vec<&Value> {
        self.seen.iter().filter(|v| v["event"] == kind).collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`ip netns exec` execs the agent: the child is the agent).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// SIGINT, then waits (bounded) for a clean exit and collects the last lines.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let st = stop_agent(&mut self.child)?;
        self.drain_for(Duration::from_millis(200));
        Ok(st)
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the agent binary once with `args` (in the lab's server namespace) and
/// returns (exit code, stdout, stderr).
pub fn run_agent_once(lab: &Lab, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns])
        .arg(agent_bin())
        .arg("--control-socket")
        .arg(lab.control_socket())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the agent")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

// ---------------------------------------------------------------- postfix

/// Where `cargo xtask test` unpacked the suite's private MTA copies.
pub fn mta_root() -> PathBuf {
    std::env::var_os("EARLYTALKER_MTA_ROOT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mta"),
        Into::into,
    )
}

/// A program of the private Postfix copy (postfix, smtp-sink, smtp-source…), with
/// its libraries found: Debian links them with RUNPATH /usr/lib/postfix, which
/// this host need not have.
pub fn postfix_tool(name: &str) -> Command {
    let root = mta_root().join("postfix");
    let mut cmd = Command::new(root.join("usr/sbin").join(name));
    cmd.env("LD_LIBRARY_PATH", root.join("usr/lib/postfix"));
    cmd
}

/// PATH and LD_LIBRARY_PATH under which the private Postfix's programs are
/// found by name (for commands built as shell lines, like the bench's).
pub fn postfix_env() -> [(&'static str, std::ffi::OsString); 2] {
    let root = mta_root().join("postfix");
    let mut path = root.join("usr/sbin").into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    [
        ("PATH", path),
        (
            "LD_LIBRARY_PATH",
            root.join("usr/lib/postfix").into_os_string(),
        ),
    ]
}

/// `postfix_tool`, run in network namespace `ns` (`ip netns exec` keeps the
/// environment).
pub fn postfix_tool_in(ns: &str, name: &str) -> Command {
    let tool = postfix_tool(name);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(tool.get_program());
    for (k, v) in tool.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd
}

/// A private Postfix instance in the lab's server namespace, run from the copy
/// `cargo xtask test` unpacked from Debian's package (no Postfix is installed on
/// the host): its own config, queue and log, existing system users (no passwd
/// change), relaying every message for lab.example to an smtp-sink that dumps
/// each delivered message to a file.
pub struct Postfix {
    pub dir: PathBuf,
    conf: PathBuf,
    ns: String,
    sink: Child,
}

impl Postfix {
    /// `restrictions` goes into smtpd_recipient_restrictions, `milters` into
    /// smtpd_milters (either may be empty).
    pub fn start(lab: &Lab, restrictions: &str, milters: &str) -> Result<Self> {
        let dir = PathBuf::from(format!("/tmp/et-postfix-{}", lab.server_ns));
        let _ = std::fs::remove_dir_all(&dir);
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data", "sink"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let d = dir.display();
        let root = mta_root().join("postfix");
        if !root.join("usr/sbin/postfix").exists() {
            bail!(
                "no private Postfix in {} (cargo xtask test unpacks it)",
                root.display()
            );
        }
        let p = root.display();
        // Users that every Debian system has: nobody owns the queue, daemon is
        // the delivery default, mail is the (unused) setgid group.
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
meta_directory = {p}/etc/postfix
command_directory = {p}/usr/sbin
daemon_directory = {p}/usr/lib/postfix/sbin
shlib_directory = {p}/usr/lib/postfix
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={p}/usr/lib/postfix
maillog_file = {d}/maillog
maillog_file_prefixes = /tmp
mail_owner = nobody
default_privs = daemon
setgid_group = mail
myhostname = mx.lab.example
mydomain = lab.example
myorigin = lab.example
inet_interfaces = all
inet_protocols = all
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = lab.example
relayhost = [127.0.0.1]:2525
alias_maps =
local_recipient_maps =
smtpd_peername_lookup = no
smtputf8_enable = no
biff = no
smtpd_banner = $myhostname ESMTP
smtpd_recipient_restrictions = {restrictions} permit_mynetworks, reject_unauth_destination
smtpd_milters = {milters}
milter_default_action = accept
"
        );
        std::fs::write(conf.join("main.cf"), main_cf)?;
        let master_cf = "\
smtp      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";
        std::fs::write(conf.join("master.cf"), master_cf)?;
        // smtp-sink dumps as its -u user; let it write there.
        run(
            "chown",
            &["nobody", &dir.join("sink").display().to_string()],
        )?;
        let sink = postfix_tool_in(&lab.server_ns, "smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(format!("{d}/sink/msg."))
            .args(["127.0.0.1:2525", "64"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink")?;
        let pf = Postfix {
            dir: dir.clone(),
            conf: conf.clone(),
            ns: lab.server_ns.clone(),
            sink,
        };
        // Postfix insists on owning its data directory (locks, caches).
        run(
            "chown",
            &["nobody", &dir.join("data").display().to_string()],
        )?;
        if let Err(e) = pf.postfix(&["start"]) {
            // Postfix reports to its log, not to a non-tty stderr.
            bail!("{e}; postfix log: {}", pf.log());
        }
        // Bounded wait for smtpd to accept connections.
        let end = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::new(lab.server_addr(false), 25);
        loop {
            let up = join(lab.in_client(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            }))
            .unwrap_or(false);
            if up {
                break;
            }
            if Instant::now() > end {
                bail!("postfix did not start listening; log: {}", pf.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(pf)
    }

    fn postfix(&self, args: &[&str]) -> Result<()> {
        let out = postfix_tool_in(&self.ns, "postfix")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .context("cannot run the private postfix")?;
        if !out.status.success() {
            bail!(
                "postfix {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Messages the sink has received so far.
    pub fn delivered(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("sink")) {
            for e in rd.flatten() {
                out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// Waits (bounded) until `n` messages were delivered.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            let d = self.delivered();
            if d.len() >= n || Instant::now() > end {
                return d;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.postfix(&["stop"]);
        let _ = self.sink.kill();
        let _ = self.sink.wait();
        if std::env::var_os("EARLYTALKER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
    let c = connect(server)?;
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
