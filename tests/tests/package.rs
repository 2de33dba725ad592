//! What a relay operator installs and runs beside the agent: the Debian package
//! (lintian-clean; installed with dpkg -i, its own binary guarding the lab, purged
//! without a trace), journal priorities, the fail2ban filter (run by Debian's
//! fail2ban-regex on lines the agent wrote) and the Grafana dashboard (every
//! metric it queries exists in a real scrape).

use earlytalker_tests::*;
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

const PORT: u16 = 25;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The .deb `cargo xtask test` built from this tree.
fn package() -> PathBuf {
    let p = std::env::var_os("EARLYTALKER_DEB").expect(
        "EARLYTALKER_DEB is unset: run the suite with `cargo xtask test`, which builds the package",
    );
    PathBuf::from(p)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().expect("spawning");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn d1_lintian_finds_no_errors_and_no_warnings() {
    require_root();
    let (_, out) = run(Command::new("lintian").arg(package()));
    let tags: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(tags.is_empty(), "lintian:\n{out}");
}

/// Purges the package when dropped, so a failed test leaves the host clean.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "earlytalker"])
            .stdout(Stdio::null())
            .status();
    }
}

#[test]
fn d2_installed_package_guards_the_lab_and_purges_clean() {
    require_root();
    // Nothing of an earlier run may linger.
    drop(Installed);
    let (ok, out) = run(Command::new("dpkg").arg("-i").arg(package()));
    assert!(ok, "dpkg -i failed:\n{out}");
    let guard = Installed;
    let (_, listed) = run(Command::new("dpkg").args(["-L", "earlytalker"]));
    let files: Vec<PathBuf> = listed
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for want in [
        "/usr/sbin/earlytalker",
        "/lib/systemd/system/earlytalker.service",
        "/etc/earlytalker/earlytalker.toml",
        "/etc/fail2ban/filter.d/earlytalker.conf",
        "/usr/share/man/man8/earlytalker.8.gz",
        "/usr/share/bash-completion/completions/earlytalker",
        "/usr/share/earlytalker/grafana-dashboard.json",
        "/usr/share/doc/earlytalker/copyright",
    ] {
        assert!(files.contains(&PathBuf::from(want)), "{want} not installed");
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/earlytalker.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/earlytalker "), "{unit}");
    assert!(unit.contains("SyslogIdentifier=earlytalker"), "{unit}");
    // Safe first install: the shipped configuration only logs.
    let conf = std::fs::read_to_string("/etc/earlytalker/earlytalker.toml").unwrap();
    assert!(
        conf.lines().any(|l| l.trim() == "action = \"log\""),
        "{conf}"
    );

    // The installed binary with the installed configuration guards the lab;
    // the operator switched enforcement on (here with the flag).
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let mut agent = Agent::start_with(
        &lab,
        &[],
        Path::new("/usr/sbin/earlytalker"),
        &[
            "--config",
            "/etc/earlytalker/earlytalker.toml",
            "-a",
            "deny",
            "--state-dir",
            "/var/lib/earlytalker",
            "--control-socket",
            "/run/earlytalker/control.sock",
            "--pass-ttl",
            "1d",
        ],
    )
    .unwrap();
    let bot = lab.bot(server, b"EHLO bot\r\n", false);
    assert!(
        bot.received.starts_with(reply_line("deny").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&bot.received)
    );
    let polite = lab.client(server, Manner::Polite);
    assert!(polite.greeting.starts_with("220 "), "{:?}", polite.greeting);
    assert!(resp.session(polite.local_port).is_some());
    assert!(resp.session(bot.local_port).is_none());
    agent.stop().unwrap();
    // The agent created its state (the saved pass cache) and runtime directory.
    assert!(Path::new("/var/lib/earlytalker").exists());
    assert!(Path::new("/run/earlytalker").exists());

    let (ok, out) = run(Command::new("dpkg").args(["--purge", "earlytalker"]));
    assert!(ok, "dpkg --purge failed:\n{out}");
    std::mem::forget(guard);
    for f in &files {
        assert!(!f.exists(), "{} survived the purge", f.display());
    }
    for d in [
        "/etc/earlytalker",
        "/var/lib/earlytalker",
        "/run/earlytalker",
        "/usr/share/doc/earlytalker",
        "/usr/share/earlytalker",
    ] {
        assert!(!Path::new(d).exists(), "{d} survived the purge");
    }
}

/// Runs the agent (text log) with stdout and stderr to a file; with `journal`,
/// JOURNAL_STREAM names that file as systemd does for the journal's stream.
/// Meanwhile: bots (IPv4 and IPv6), polite clients and one that hangs up.
/// Returns the log.
fn agent_log(journal: bool) -> String {
    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let path = lab
        .state_dir()
        .with_extension(if journal { "journal" } else { "log" });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut cmd = agent_command(&lab, &["-a", "deny", "-w", "0.5", "--log-format", "text"]);
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let mut child = cmd.spawn().unwrap();
    let v4 = SocketAddr::new(lab.server_addr(false), PORT);
    let v6 = SocketAddr::new(lab.server_addr(true), PORT);
    // Bounded wait for the start-up line.
    for _ in 0..200 {
        if std::fs::read_to_string(&path).unwrap().contains("STARTED") {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for server in [v4, v4, v6] {
        let b = lab.bot(server, b"EHLO bot\r\n", false);
        assert!(b.received.starts_with(reply_line("deny").as_bytes()));
    }
    for server in [v4, v6] {
        let s = lab.client(server, Manner::Polite);
        assert!(s.greeting.starts_with("220 "));
    }
    // Connects and hangs up during the hold.
    join(lab.in_client(move || -> anyhow::Result<()> {
        let c = TcpStream::connect_timeout(&v4, Duration::from_secs(5))?;
        thread::sleep(Duration::from_millis(100));
        drop(c);
        Ok(())
    }))
    .unwrap()
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    stop_agent(&mut child).unwrap();
    std::fs::read_to_string(&path).unwrap()
}

fn count(log: &str, word: &str) -> usize {
    log.lines().filter(|l| l.contains(word)).count()
}

/// fail2ban-regex on `lines`: (matched, missed) and the matched lines.
fn fail2ban_regex(lines: &str, tag: &str) -> (usize, usize, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("et-f2b-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("earlytalker.log");
    std::fs::write(&log, lines).unwrap();
    let filter = repo().join("earlytalker/dist/fail2ban/earlytalker.conf");
    let (ok, out) = run(Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(&log)
        .arg(&filter));
    assert!(ok, "fail2ban-regex failed:\n{out}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("Lines: "))
        .unwrap_or_else(|| panic!("no summary:\n{out}"));
    // "Lines: N lines, I ignored, M matched, X missed"
    let nums: Vec<usize> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let matched: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("|- Matched line(s):"))
        .skip(1)
        .take_while(|l| l.starts_with("|  "))
        .map(|l| l.to_string())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    (nums[2], nums[3], matched)
}

#[test]
fn d3_fail2ban_bans_every_early_talker_and_nothing_else() {
    require_root();
    let log = agent_log(false);
    let early = count(&log, " PREGREET ");
    assert_eq!(early, 3, "{log}");
    assert_eq!(count(&log, " PASS "), 2, "{log}");
    assert_eq!(count(&log, " HANGUP "), 1, "{log}");
    let (matched, _missed, lines) = fail2ban_regex(&log, "file");
    assert_eq!(matched, early, "{log}\nmatched: {lines:#?}");
    assert!(lines.iter().all(|l| l.contains(" PREGREET ")), "{lines:#?}");
    // Both families: the IPv6 bot's address is taken as a host too.
    assert!(lines.iter().any(|l| l.contains("[fd")), "{lines:#?}");

    // From the journal, fail2ban's systemd backend reads each entry as
    // "HOST IDENT[PID]: MESSAGE"; journald has stripped the priority.
    let journal = agent_log(true);
    let as_read: String = journal
        .lines()
        .filter_map(|l| l.get(3..).filter(|_| l.starts_with('<')))
        .map(|m| format!("relay earlytalker[4242]: {m}\n"))
        .collect();
    let (matched, _, lines) = fail2ban_regex(&as_read, "journal");
    assert_eq!(matched, 3, "{as_read}\nmatched: {lines:#?}");
    assert!(
        lines.iter().all(|l| l.contains(": PREGREET ")),
        "{lines:#?}"
    );
}

#[test]
fn d4_journal_lines_carry_their_priority() {
    require_root();
    let log = agent_log(true);
    let prio_of = |word: &str| -> BTreeSet<&str> {
        log.lines()
            .filter(|l| l.contains(word))
            .map(|l| l.get(..3).unwrap_or(""))
            .collect()
    };
    // Early talker = notice; routine lines = info.
    assert_eq!(prio_of("PREGREET "), BTreeSet::from(["<5>"]), "{log}");
    assert_eq!(prio_of("PASS "), BTreeSet::from(["<6>"]), "{log}");
    assert_eq!(prio_of("HANGUP "), BTreeSet::from(["<6>"]), "{log}");
    assert_eq!(prio_of("STARTED "), BTreeSet::from(["<6>"]), "{log}");
    // Every line (stderr's diagnostics too) carries one; none carries our own
    // time stamp (the journal keeps its own).
    for l in log.lines() {
        let p = l.get(..3).unwrap_or("");
        assert!(
            ["<3>", "<4>", "<5>", "<6>", "<7>"].contains(&p),
            "line without priority: {l:?}"
        );
        assert!(!l[3..].starts_with("20"), "time stamp in {l:?}");
    }
    // A terminal or file gets plain lines with a time stamp.
    let plain = agent_log(false);
    assert!(
        plain
            .lines()
            .filter(|l| l.contains("PREGREET"))
            .all(|l| l.starts_with("20")),
        "{plain}"
    );
}

#[test]
fn d5_every_metric_the_dashboard_queries_exists() {
    require_root();
    let dash =
        std::fs::read_to_string(repo().join("earlytalker/dist/grafana/earlytalker-dashboard.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for p in v["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let queried: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for want in [
        "earlytalker_early_talkers_total",
        "earlytalker_passes_total",
        "earlytalker_greetings_held",
        "earlytalker_map_entries",
        "earlytalker_events_lost_total",
        "earlytalker_teardown_failures_total",
    ] {
        assert!(queried.contains(want), "the dashboard does not show {want}");
    }

    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let mut agent = Agent::start(
        &lab,
        &[
            "-a",
            "deny",
            "-w",
            "0.5",
            "--metrics-listen",
            "127.0.0.1:9125",
        ],
    )
    .unwrap();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    lab.bot(server, b"EHLO bot\r\n", false);
    lab.client(server, Manner::Polite);
    let scrape = join(lab.in_server(|| -> anyhow::Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:9125")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }))
    .unwrap()
    .unwrap();
    agent.stop().unwrap();
    let exposed: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty() && l.starts_with("earlytalker_"))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    for name in &queried {
        assert!(
            exposed.contains(name),
            "the dashboard queries {name}, which the agent does not export:\n{scrape}"
        );
    }
}

/// Metric names in a PromQL expression: every `earlytalker_…` identifier.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("earlytalker_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}
