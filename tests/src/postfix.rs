//! A private Postfix (Debian's package, unpacked under target/mta by
//! `cargo xtask test`; none is installed on the host) in the lab's server
//! namespace, relaying to an smtp-sink that keeps every delivered message.

use crate::{
    lab::{run, Lab},
    mta::{wait_listening, Side, Sink},
};
use anyhow::{bail, Context, Result};
use std::{path::PathBuf, process::Command, time::Duration};

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
    /// The server's sink; a client-side Postfix relays to the server instead.
    pub sink: Option<Sink>,
}

impl Postfix {
    /// A server behind the agent. `restrictions` goes into
    /// smtpd_recipient_restrictions, `milters` into smtpd_milters (either may
    /// be empty).
    pub fn start(lab: &Lab, restrictions: &str, milters: &str) -> Result<Self> {
        Self::start_on(lab, Side::Server, restrictions, milters, "")
    }

    /// A server that greets `secs` seconds after accepting, with Postfix's own
    /// pregreet trick (a client restriction that sleeps, evaluated at connect).
    pub fn start_greeting_after(lab: &Lab, secs: u32) -> Result<Self> {
        let main = format!("smtpd_delay_reject = no\nsmtpd_client_restrictions = sleep {secs}\n");
        Self::start_on(lab, Side::Server, "", "", &main)
    }

    /// A server behind a PROXY protocol balancer (HAProxy's send-proxy, v1 or
    /// v2): `smtpd_upstream_proxy_protocol = haproxy`.
    pub fn start_proxied(lab: &Lab, restrictions: &str) -> Result<Self> {
        Self::start_on(
            lab,
            Side::Server,
            restrictions,
            "",
            "smtpd_upstream_proxy_protocol = haproxy\n",
        )
    }

    /// A sending Postfix in the client namespace: it accepts on its loopback
    /// and relays lab.example to the server with its smtp(8) client.
    pub fn client(lab: &Lab) -> Result<Self> {
        Self::start_on(lab, Side::Client, "", "", "")
    }

    fn start_on(
        lab: &Lab,
        side: Side,
        restrictions: &str,
        milters: &str,
        extra_main: &str,
    ) -> Result<Self> {
        let dir = side.dir("postfix", lab);
        let _ = std::fs::remove_dir_all(&dir);
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data", "sink"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let d = dir.display();
        let (root, _) = crate::mta::private_copy("postfix", "usr/sbin/postfix")?;
        let p = root.display();
        // A sender must not share the server's name, or Postfix sees a loop.
        let (interfaces, relayhost, hostname) = match side {
            Side::Server => {
                let (ip, port) = crate::mta::SINK.split_once(':').expect("ip:port");
                ("all", format!("[{ip}]:{port}"), "mx.lab.example")
            }
            Side::Client => (
                "127.0.0.1",
                format!("[{}]:25", crate::SERVER_V4),
                "out.client.example",
            ),
        };
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
myhostname = {hostname}
mydomain = lab.example
myorigin = lab.example
inet_interfaces = {interfaces}
inet_protocols = all
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = lab.example
relayhost = {relayhost}
alias_maps =
local_recipient_maps =
smtpd_peername_lookup = no
smtputf8_enable = no
biff = no
smtpd_banner = $myhostname ESMTP
smtpd_recipient_restrictions = {restrictions} permit_mynetworks, reject_unauth_destination
smtpd_milters = {milters}
{extra_main}milter_default_action = accept
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
        let sink = match side {
            Side::Server => Some(Sink::start(lab, &dir.join("sink"))?),
            Side::Client => None,
        };
        let pf = Postfix {
            dir: dir.clone(),
            conf: conf.clone(),
            ns: side.ns(lab).to_string(),
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
        wait_listening(lab, side, Duration::from_secs(20), || pf.log())?;
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
        self.sink.as_ref().map(Sink::delivered).unwrap_or_default()
    }

    /// Waits (bounded) until `n` messages were delivered.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<String> {
        match &self.sink {
            Some(s) => s.wait_delivered(n, timeout),
            None => Vec::new(),
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.postfix(&["stop"]);
        if std::env::var_os("EARLYTALKER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
