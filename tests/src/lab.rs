//! The lab: a client and a server network namespace joined by a veth pair,
//! removed on drop, and threads that run inside either namespace.

use crate::clients::{bot_read_all, session, BotRun, Manner, Seen};
use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
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

pub(crate) fn run(cmd: &str, args: &[&str]) -> Result<()> {
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

    /// Gives the client's veth another IPv4 address (/24, as its first).
    pub fn add_client_address(&self, ip: &str) -> Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.client_ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &self.client_if,
            ],
        )
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

    /// A counter of the server namespace's network statistics: `file` is
    /// "snmp" or "netstat" under /proc/net, `group` the line prefix ("Tcp",
    /// "TcpExt"), `name` the column.
    pub fn server_counter(
        &self,
        file: &'static str,
        group: &'static str,
        name: &'static str,
    ) -> u64 {
        join(self.in_server(move || -> Result<u64> {
            // thread-self: this thread is the one in the server's namespace.
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
            let prefix = format!("{group}:");
            let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
            while let (Some(h), Some(v)) = (lines.next(), lines.next()) {
                for (k, x) in h.split_whitespace().zip(v.split_whitespace()) {
                    if k == name {
                        return Ok(x.parse()?);
                    }
                }
            }
            Err(anyhow!("no {group} {name} in /proc/net/{file}"))
        }))
        .and_then(|r| r)
        .expect("reading a network counter")
    }

    /// Installs nftables `rules` (a whole `table inet NAME { … }`) in the
    /// server's or the client's namespace, for as long as the guard lives.
    pub fn nft(&self, server: bool, table: &'static str, rules: &str) -> NftTable {
        let ns = if server {
            &self.server_ns
        } else {
            &self.client_ns
        };
        let st = Command::new("ip")
            .args(["netns", "exec", ns, "nft", rules])
            .status()
            .expect("nft (cargo xtask test installs nftables)");
        assert!(st.success(), "nft refused the rules");
        NftTable {
            ns: ns.clone(),
            table,
        }
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

/// nftables rules a test installed (see `Lab::nft`), removed when dropped.
pub struct NftTable {
    ns: String,
    table: &'static str,
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "delete table inet",
                self.table,
            ])
            .status();
    }
}
