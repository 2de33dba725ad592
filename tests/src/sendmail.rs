//! A private Sendmail 8.17 (Debian's sendmail-bin, -base and -cf, unpacked under
//! target/mta by `cargo xtask test`) in the lab's server namespace, relaying
//! lab.example to the sink. Its sendmail.cf is built with m4 from the package's
//! own cf tree. Sendmail needs its host name to resolve (else it sleeps a
//! minute at start) and logs only to syslog: it gets a UTS namespace named
//! mx.lab.example, and a private /dev whose /dev/log is the test's own syslog
//! receiver.

use crate::{
    lab::Lab,
    mta::{children_of, private_copy, stop_group, wait_listening, PrivateFiles, Side, Sink, SINK},
};
use anyhow::{bail, Context, Result};
use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

pub struct Sendmail {
    pub dir: PathBuf,
    daemon: Child,
    pub sink: Sink,
    syslog: Syslog,
}

impl Sendmail {
    /// `mc` is added to the m4 configuration (e.g. an INPUT_MAIL_FILTER).
    pub fn start(lab: &Lab, mc: &str) -> Result<Self> {
        let (root, bin) = private_copy("sendmail", "usr/libexec/sendmail/sendmail")?;
        let dir = PathBuf::from(format!("/tmp/et-sendmail-{}", lab.server_ns));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["queue", "olddev"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // Sendmail refuses a queue others can read.
        crate::lab::run("chmod", &["700", &dir.join("queue").display().to_string()])?;
        let sink = Sink::start(lab, &dir.join("sink"))?;
        let syslog = Syslog::start(&dir.join("devlog"))?;
        let d = dir.display();
        let (sink_ip, sink_port) = SINK.split_once(':').expect("ip:port");
        std::fs::write(dir.join("service.switch"), "hosts files\naliases files\n")?;
        let mc_text = format!(
            "divert(0)dnl
OSTYPE(`linux')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0')dnl
define(`QUEUE_DIR', `{d}/queue')dnl
define(`confPID_FILE', `{d}/sendmail.pid')dnl
define(`STATUS_FILE', `{d}/statistics')dnl
define(`ALIAS_FILE', `')dnl
define(`HELP_FILE', `')dnl
define(`confCW_FILE', `')dnl
define(`confLOG_LEVEL', `9')dnl
define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl
define(`confDELIVERY_MODE', `interactive')dnl
define(`SMART_HOST', `[{sink_ip}]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
RELAY_DOMAIN(`lab.example')dnl
DAEMON_OPTIONS(`Port=smtp, Name=MTA')dnl
{mc}
MAILER(`smtp')dnl
"
        );
        std::fs::write(dir.join("lab.mc"), mc_text)?;
        let cf_dir = root.join("usr/share/sendmail/cf");
        let out = Command::new("m4")
            .arg(format!("-D_CF_DIR_={}/", cf_dir.display()))
            .arg(cf_dir.join("m4/cf.m4"))
            .arg(dir.join("lab.mc"))
            .output()
            .context("running m4 (cargo xtask test installs it)")?;
        if !out.status.success() {
            bail!("m4: {}", String::from_utf8_lossy(&out.stderr));
        }
        let cf = dir.join("sendmail.cf");
        std::fs::write(&cf, out.stdout)?;

        let mut files = PrivateFiles::new(&dir.join("etc"), &[])?;
        files.private_dev(&dir.join("olddev"), &dir.join("devlog"));
        let (bin_s, cf_s) = (bin.display().to_string(), cf.display().to_string());
        let daemon = files
            .command(&lab.server_ns, true, &[&bin_s, "-C", &cf_s, "-bD"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sendmail")?;
        let sm = Sendmail {
            dir,
            daemon,
            sink,
            syslog,
        };
        wait_listening(lab, Side::Server, Duration::from_secs(20), || sm.log())?;
        Ok(sm)
    }

    /// What it sent to syslog.
    pub fn log(&self) -> String {
        self.syslog.text()
    }

    /// The daemon's children: one per connection (its command line is rewritten
    /// to a status, so children are counted rather than matched).
    pub fn processes(&self) -> usize {
        children_of(self.daemon.id())
    }
}

impl Drop for Sendmail {
    fn drop(&mut self) {
        stop_group(&mut self.daemon);
        if std::env::var_os("EARLYTALKER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A syslog receiver on a unix datagram socket: every message, one per line.
struct Syslog {
    text: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Syslog {
    fn start(path: &std::path::Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).context("binding the syslog socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let text: Arc<Mutex<String>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (text.clone(), stop.clone());
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if let Ok(mut t) = t.lock() {
                        t.push_str(&String::from_utf8_lossy(&buf[..n]));
                        t.push('\n');
                    }
                }
            }
        });
        Ok(Syslog {
            text,
            stop,
            reader: Some(reader),
        })
    }

    fn text(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
