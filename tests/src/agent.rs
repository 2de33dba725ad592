//! The real agent binary, run in the lab's server namespace with JSON logs,
//! and read line by line with bounded waits.

use crate::lab::Lab;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

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
    agent_command_with(lab, wrapper, &agent_bin(), args)
}

/// `agent_command_under` for the agent binary at `bin` (an installed one, say).
pub fn agent_command_with(lab: &Lab, wrapper: &[&str], bin: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.server_ns])
        .args(wrapper)
        .arg(bin)
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
        Self::start_with(lab, wrapper, &agent_bin(), args)
    }

    /// `start_under`, for the agent binary at `bin`.
    pub fn start_with(lab: &Lab, wrapper: &[&str], bin: &Path, args: &[&str]) -> Result<Self> {
        let mut cmd = agent_command_with(
            lab,
            wrapper,
            bin,
            &[&["--log-format", "json"], args].concat(),
        );
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
                Some("early_talker" | "pass" | "hangup" | "pipeconnect")
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

/// `earlytalker status --json` against the lab's agent, as an operator runs it.
pub fn status_json(lab: &Lab) -> Result<serde_json::Value> {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--control-socket"])
        .arg(lab.control_socket())
        .output()
        .context("running earlytalker status")?;
    if !out.status.success() {
        bail!(
            "earlytalker status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("status --json is not JSON")
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
