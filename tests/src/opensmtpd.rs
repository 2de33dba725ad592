//! A private OpenSMTPD 6.8 (Debian's opensmtpd, unpacked under target/mta by
//! `cargo xtask test`) in the lab's server namespace, relaying lab.example to
//! the sink, in the foreground with its log on stderr. Its compiled-in paths
//! (/var/spool/smtpd, /var/lib/opensmtpd/empty, /usr/libexec/opensmtpd,
//! /run/smtpd.sock) and
//! users (opensmtpd, opensmtpq) exist only in its private mount namespace.

use crate::{
    lab::Lab,
    mta::{private_copy, stop_group, wait_listening, PrivateFiles, Side, Sink, SINK},
};
use anyhow::{Context, Result};
use std::{path::PathBuf, process::Child, process::Stdio, time::Duration};

/// Ids of its users in the private passwd (unused on Debian hosts).
const SMTPD_ID: u32 = 64_991;
const SMTPQ_ID: u32 = 64_992;

pub struct Opensmtpd {
    pub dir: PathBuf,
    daemon: Child,
    pub sink: Sink,
}

impl Opensmtpd {
    /// `filter` is a smtpd.conf `filter` line's name and command (proc-exec),
    /// attached to the listener; None for none.
    pub fn start(lab: &Lab, filter: Option<&str>) -> Result<Self> {
        let (root, bin) = private_copy("opensmtpd", "usr/sbin/smtpd")?;
        let dir = PathBuf::from(format!("/tmp/et-opensmtpd-{}", lab.server_ns));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["spool/smtpd", "lib/opensmtpd/empty", "run"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // smtpd insists on these modes.
        crate::lab::run(
            "chmod",
            &["711", &dir.join("spool/smtpd").display().to_string()],
        )?;
        let sink = Sink::start(lab, &dir.join("sink"))?;
        let (filter_decl, filter_use) = match filter {
            Some(cmd) => (
                format!("filter \"earlytalker\" proc-exec \"{cmd}\"\n"),
                " filter \"earlytalker\"",
            ),
            None => (String::new(), ""),
        };
        let conf = dir.join("smtpd.conf");
        std::fs::write(
            &conf,
            format!(
                "{filter_decl}listen on 0.0.0.0 port 25{filter_use}
action \"sink\" relay host smtp://{SINK}
match from any for domain \"lab.example\" action \"sink\"
"
            ),
        )?;
        let mut files = PrivateFiles::new(
            &dir.join("etc"),
            &[
                ("opensmtpd", SMTPD_ID, SMTPD_ID),
                ("opensmtpq", SMTPQ_ID, SMTPQ_ID),
            ],
        )?;
        files.bind(dir.join("spool"), "/var/spool");
        files.bind(dir.join("lib"), "/var/lib");
        files.bind(root.join("usr/libexec"), "/usr/libexec");
        // Its control socket is /run/smtpd.sock: one per instance.
        files.bind(dir.join("run"), "/run");
        let log = std::fs::File::create(dir.join("smtpd.log"))?;
        let (bin_s, conf_s) = (bin.display().to_string(), conf.display().to_string());
        let daemon = files
            .command(&lab.server_ns, false, &[&bin_s, "-d", "-f", &conf_s])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting smtpd")?;
        let s = Opensmtpd { dir, daemon, sink };
        wait_listening(lab, Side::Server, Duration::from_secs(20), || s.log())?;
        Ok(s)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("smtpd.log")).unwrap_or_default()
    }
}

impl Drop for Opensmtpd {
    fn drop(&mut self) {
        stop_group(&mut self.daemon);
        if std::env::var_os("EARLYTALKER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
