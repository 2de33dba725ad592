//! A private Exim 4 (Debian's exim4-daemon-light, unpacked under target/mta by
//! `cargo xtask test`) in the lab's server namespace, relaying lab.example to
//! the sink. It runs as root with `-C`, its helpers as Debian-exim, a user that
//! exists only in its private passwd.

use crate::{
    lab::Lab,
    mta::{children_of, private_copy, stop_group, wait_listening, PrivateFiles, Side, Sink, SINK},
};
use anyhow::{bail, Context, Result};
use std::{path::PathBuf, process::Child, time::Duration};

/// Debian-exim's uid in the private passwd (unused on Debian hosts); its group
/// is the host's `mail`, so that the agent's sockets can be handed to it with
/// `--socket-group mail`.
const EXIM_ID: u32 = 64_990;
pub const EXIM_GROUP: &str = "mail";
const MAIL_GID: u32 = 8;

pub struct Exim {
    pub dir: PathBuf,
    daemon: Child,
    /// The server's sink; a client-side Exim relays to the server instead.
    pub sink: Option<Sink>,
}

impl Exim {
    /// A server behind the agent. `rcpt_acl` goes first in the RCPT ACL (may be
    /// empty); `main` is added to the main section (`GREET_DELAY = 1s`
    /// there delays the greeting).
    pub fn start(lab: &Lab, rcpt_acl: &str, main: &str) -> Result<Self> {
        Self::start_on(lab, Side::Server, rcpt_acl, main, "")
    }

    /// A sending Exim in the client namespace: it accepts on its loopback and
    /// relays lab.example to the server through its smtp transport, to which
    /// `transport` is added (e.g. `hosts_pipe_connect = *`).
    pub fn client(lab: &Lab, main: &str, transport: &str) -> Result<Self> {
        Self::start_on(lab, Side::Client, "", main, transport)
    }

    fn start_on(
        lab: &Lab,
        side: Side,
        rcpt_acl: &str,
        main: &str,
        transport: &str,
    ) -> Result<Self> {
        let (_, bin) = private_copy("exim", "usr/sbin/exim4")?;
        let dir = side.dir("exim", lab);
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["spool", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // A sender must not share the server's name.
        let (sink, next_hop, interfaces, hostname) = match side {
            Side::Server => (
                Some(Sink::start(lab, &dir.join("sink"))?),
                SINK.replace(':', "::"),
                "<; 0.0.0.0 ; ::0",
                "mx.lab.example",
            ),
            Side::Client => (
                None,
                format!("{}::25", crate::SERVER_V4),
                "127.0.0.1",
                "out.client.example",
            ),
        };
        let (d, b) = (dir.display(), bin.display());
        let conf = dir.join("exim.conf");
        std::fs::write(
            &conf,
            format!(
                "primary_hostname = {hostname}
exim_path = {b}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
log_selector = +incoming_port +smtp_connection
daemon_smtp_ports = 25
local_interfaces = {interfaces}
domainlist relay_to_domains = lab.example
acl_smtp_connect = acl_check_connect
acl_smtp_rcpt = acl_check_rcpt
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
{main}
# How long the greeting waits after accept (`main` may set it first).
.ifndef GREET_DELAY
GREET_DELAY = 0s
.endif

begin acl
acl_check_connect:
  accept delay = GREET_DELAY

acl_check_rcpt:
{rcpt_acl}
  accept domains = +relay_to_domains
  deny

begin routers
sink:
  driver = manualroute
  domains = lab.example
  transport = to_sink
  route_list = * {next_hop}
  self = send

begin transports
to_sink:
  driver = smtp
  allow_localhost
{transport}

begin retry
* * F,1m,10s
"
            ),
        )?;
        let files = PrivateFiles::new(&dir.join("etc"), &[("Debian-exim", EXIM_ID, MAIL_GID)])?;
        for d in ["spool", "log"] {
            crate::lab::run(
                "chown",
                &[
                    &format!("{EXIM_ID}:{MAIL_GID}"),
                    &dir.join(d).display().to_string(),
                ],
            )?;
        }
        let conf_s = conf.display().to_string();
        let bin_s = bin.display().to_string();
        let daemon = files
            .command(side.ns(lab), false, &[&bin_s, "-C", &conf_s, "-bdf"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting exim")?;
        let exim = Exim { dir, daemon, sink };
        wait_listening(lab, side, Duration::from_secs(20), || exim.log())?;
        Ok(exim)
    }

    /// Main, reject and panic logs.
    pub fn log(&self) -> String {
        ["mainlog", "rejectlog", "paniclog"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join("log").join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The children the daemon forked: one per connection (and delivery).
    pub fn processes(&self) -> usize {
        children_of(self.daemon.id())
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        stop_group(&mut self.daemon);
        if std::env::var_os("EARLYTALKER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The RCPT ACL lines the README gives for Exim, with the policy socket at `socket`.
pub fn readme_acl(socket: &std::path::Path) -> Result<String> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let from = readme
        .find("**Exim**, from the RCPT ACL")
        .context("README: no Exim snippet")?;
    let block = readme[from..]
        .split("```")
        .nth(1)
        .context("README: the Exim snippet has no code block")?;
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("  ") && !l.trim_start().starts_with('#'))
        .collect();
    if lines.is_empty() {
        bail!("README: the Exim snippet is empty");
    }
    Ok(lines.join("\n").replace(
        "/run/earlytalker/policy.sock",
        &socket.display().to_string(),
    ))
}
