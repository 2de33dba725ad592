//! What every private MTA of the suite shares: the smtp-sink it relays to, a
//! private mount namespace (its own passwd, group, hosts and resolver, so the
//! host's files stay untouched and name lookups fail at once instead of timing
//! out), and bounded waits on its log and processes.

use crate::{
    lab::{join, Lab},
    postfix::postfix_tool_in,
};
use anyhow::{bail, Context, Result};
use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Which of the lab's namespaces an MTA runs in: the server's (port 25 on
/// every address, behind the agent, relaying to the sink), or the client's
/// (port 25 on its loopback only, relaying to the server: a real sending MTA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

impl Side {
    pub fn ns(self, lab: &Lab) -> &str {
        match self {
            Side::Server => &lab.server_ns,
            Side::Client => &lab.client_ns,
        }
    }

    /// A scratch directory for an MTA of this side.
    pub fn dir(self, mta: &str, lab: &Lab) -> PathBuf {
        let side = match self {
            Side::Server => "server",
            Side::Client => "client",
        };
        PathBuf::from(format!("/tmp/et-{mta}-{side}-{}", lab.server_ns))
    }
}

/// The private copy `cargo xtask test` unpacked into target/mta/`name`, and its
/// program `bin` (a path inside it); an error saying so if it is missing.
pub fn private_copy(name: &str, bin: &str) -> Result<(PathBuf, PathBuf)> {
    let root = crate::postfix::mta_root().join(name);
    let b = root.join(bin);
    if !b.exists() {
        bail!(
            "no private {name} in {} (cargo xtask test unpacks it)",
            root.display()
        );
    }
    Ok((root, b))
}

/// Where every lab MTA relays its mail: Postfix's smtp-sink on the server
/// namespace's loopback, one file per message.
pub const SINK: &str = "127.0.0.1:2525";

/// smtp-sink, dumping each message it receives into `dir`.
pub struct Sink {
    dir: PathBuf,
    child: Child,
}

impl Sink {
    pub fn start(lab: &Lab, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // smtp-sink dumps as its -u user; let it write there.
        crate::lab::run("chown", &["nobody", &dir.display().to_string()])?;
        let child = postfix_tool_in(&lab.server_ns, "smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(dir.join("msg."))
            .args([SINK, "64"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink")?;
        Ok(Sink {
            dir: dir.to_path_buf(),
            child,
        })
    }

    /// Messages received so far.
    pub fn delivered(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
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

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files an MTA sees in place of the host's, in its private mount namespace.
pub struct PrivateFiles {
    binds: Vec<(PathBuf, &'static str)>,
    /// A private /dev: (where the host's is kept, the socket to use as /dev/log).
    dev: Option<(PathBuf, PathBuf)>,
}

impl PrivateFiles {
    /// passwd and group with `users` (name, uid, gid) added to the host's, a
    /// hosts file naming the
    /// server, and a resolver pointed at the namespace's own loopback where
    /// nothing listens: every DNS query fails at once.
    pub fn new(dir: &Path, users: &[(&str, u32, u32)]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut passwd = std::fs::read_to_string("/etc/passwd")?;
        let mut group = std::fs::read_to_string("/etc/group")?;
        for (name, uid, gid) in users {
            passwd.push_str(&format!(
                "{name}:x:{uid}:{gid}::/nonexistent:/usr/sbin/nologin\n"
            ));
            // A group of the user's name too (MTAs look theirs up by name),
            // even where the gid is a host group's: names may share a gid.
            group.push_str(&format!("{name}:x:{gid}:\n"));
        }
        let files = [
            ("passwd", passwd, "/etc/passwd"),
            ("group", group, "/etc/group"),
            (
                "hosts",
                format!(
                    "127.0.0.1 localhost\n::1 localhost\n{} mx.lab.example mx\n{} mx.lab.example mx\n",
                    crate::SERVER_V4,
                    crate::SERVER_V6
                ),
                "/etc/hosts",
            ),
            (
                "resolv.conf",
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n".to_string(),
                "/etc/resolv.conf",
            ),
        ];
        let mut binds = Vec::new();
        for (name, text, target) in files {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            binds.push((p, target));
        }
        Ok(PrivateFiles { binds, dev: None })
    }

    /// Also bind `src` over `target` (a directory the MTA insists on).
    pub fn bind(&mut self, src: PathBuf, target: &'static str) {
        self.binds.push((src, target));
    }

    /// A private /dev (a tmpfs with the host's null, zero, random and urandom)
    /// whose /dev/log is `log`, for an MTA that logs only to syslog; `keep` is
    /// an empty directory where the host's /dev is bound meanwhile.
    pub fn private_dev(&mut self, keep: &Path, log: &Path) {
        self.dev = Some((keep.to_path_buf(), log.to_path_buf()));
    }

    /// `argv` in the lab's server namespace, in a private mount namespace with
    /// these files in place (and a UTS namespace named mx.lab.example when
    /// `own_hostname`). Its own process group, so that `stop` reaches the
    /// children an MTA forks per connection.
    pub fn command(&self, ns: &str, own_hostname: bool, argv: &[&str]) -> Command {
        let mut script = String::from("set -e;");
        for (src, target) in &self.binds {
            script.push_str(&format!("mount --bind '{}' '{target}';", src.display()));
        }
        if let Some((keep, log)) = &self.dev {
            let (k, l) = (keep.display(), log.display());
            script.push_str(&format!(
                "mount --bind /dev '{k}'; mount -t tmpfs tmpfs /dev;\
                 for n in null zero random urandom; do touch /dev/$n; mount --bind '{k}'/$n /dev/$n; done;\
                 touch /dev/log; mount --bind '{l}' /dev/log;"
            ));
        }
        if own_hostname {
            script.push_str("hostname mx.lab.example;");
        }
        script.push_str("exec \"$@\"");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
        ]);
        if own_hostname {
            cmd.arg("--uts");
        }
        cmd.args(["sh", "-c", &script, "sh"]).args(argv);
        cmd.process_group(0);
        cmd
    }
}

/// Stops a process group started by `PrivateFiles::command` (SIGTERM, then
/// SIGKILL after 5 s).
pub fn stop_group(child: &mut Child) {
    let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// Waits (bounded) until something accepts on port 25 of `side`'s loopback,
/// which the agent does not watch, so the MTA logs these probes as from
/// 127.0.0.1, apart from the clients under test.
pub fn wait_listening(
    lab: &Lab,
    side: Side,
    timeout: Duration,
    log: impl Fn() -> String,
) -> Result<()> {
    let end = Instant::now() + timeout;
    let addr: SocketAddr = "127.0.0.1:25".parse().expect("literal");
    loop {
        let up = join(crate::lab::spawn_in(side.ns(lab), move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        }))
        .unwrap_or(false);
        if up {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("the MTA did not start listening; log: {}", log());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Live processes whose parent is `pid`.
pub fn children_of(pid: u32) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid …; comm may hold spaces and parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
        })
        .count()
}

/// Waits (bounded) until `f` holds; true if it did.
pub fn eventually(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
