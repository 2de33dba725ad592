//! A private `redis-server` (Debian's package) for the fleet tests: on a Unix
//! socket every lab's agent reaches across network namespaces, or on TCP
//! loopback inside one namespace. No persistence; killed on drop.

use anyhow::{bail, Context, Result};
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub struct Redis {
    child: Option<Child>,
    dir: PathBuf,
    /// The network namespace it runs in (TCP), or None (a Unix socket).
    ns: Option<String>,
    port: u16,
    password: Option<String>,
    /// TLS only (`--tls-port`), with a CA and a certificate for 127.0.0.1
    /// made for the occasion.
    tls: bool,
}

impl Redis {
    /// On a Unix socket in a fresh directory.
    pub fn on_socket() -> Result<Self> {
        Self::start(None, 0, None, false)
    }

    /// On 127.0.0.1:`port` inside network namespace `ns`, with a password.
    pub fn in_namespace(ns: &str, port: u16, password: &str) -> Result<Self> {
        Self::start(
            Some(ns.to_string()),
            port,
            Some(password.to_string()),
            false,
        )
    }

    /// `in_namespace`, over TLS only; `ca()` is the CA to trust.
    pub fn in_namespace_tls(ns: &str, port: u16, password: &str) -> Result<Self> {
        Self::start(Some(ns.to_string()), port, Some(password.to_string()), true)
    }

    fn start(ns: Option<String>, port: u16, password: Option<String>, tls: bool) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("et-redis-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir)?;
        let mut r = Redis {
            child: None,
            dir,
            ns,
            port,
            password,
            tls,
        };
        if tls {
            r.make_certificates()?;
        }
        r.restart()?;
        Ok(r)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The URL an agent is given.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match (&self.ns, &self.password) {
            (None, _) => format!("unix://{}", self.socket().display()),
            (Some(_), Some(p)) => format!("{scheme}://:{p}@127.0.0.1:{}/0", self.port),
            (Some(_), None) => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// A CA, and a server certificate for IP 127.0.0.1 that it signed.
    fn make_certificates(&self) -> Result<()> {
        let d = &self.dir;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .current_dir(d)
                .args(args)
                .output()
                .context("running openssl")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=earlytalker test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ])
    }

    /// Starts it (again, on the same socket or port, empty), and waits
    /// (bounded) until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-server"]);
                c
            }
            None => Command::new("redis-server"),
        };
        if self.tls {
            cmd.args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.ca())
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.arg("--port").arg(self.port.to_string());
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.args(["--daemonize", "no", "--dir"]).arg(&self.dir);
        if self.ns.is_none() {
            let _ = std::fs::remove_file(self.socket());
            cmd.arg("--unixsocket")
                .arg(self.socket())
                .args(["--unixsocketperm", "700"]);
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (Debian package redis-server)")?;
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG") {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("redis-server did not answer within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: an outage without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (true) or SIGCONT (false): a server that hangs, connections open.
    pub fn freeze(&self, on: bool) {
        if let Some(c) = &self.child {
            let sig = if on {
                nix::sys::signal::Signal::SIGSTOP
            } else {
                nix::sys::signal::Signal::SIGCONT
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// One redis-cli command; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-cli", "-h", "127.0.0.1", "-p"])
                    .arg(self.port.to_string());
                c
            }
            None => {
                let mut c = Command::new("redis-cli");
                c.arg("-s").arg(self.socket());
                c
            }
        };
        if let Some(p) = &self.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        if self.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.ca());
        }
        let out = cmd.args(args).output().context("running redis-cli")?;
        if !out.status.success() {
            bail!("redis-cli: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}
