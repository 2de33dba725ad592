//! What an operator relies on: allowlist, pass cache (and its survival across a
//! restart), configuration reload with connections in flight, metrics, status.
//! Real kernel, real TCP in namespaces, the real agent. Needs root.

use earlytalker_tests::*;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

const PORT: u16 = 25;

fn server(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.server_addr(false), PORT)
}

#[test]
fn o1_allowlisted_bot_passes_untouched() {
    let (lab, resp, mut agent) = Rig::builder(&[
        "-a",
        "deny",
        "-w",
        "2",
        "--allow",
        &format!("{CLIENT_V4}/32"),
        "--allow",
        "fd00:99::/64",
    ])
    .start()
    .into_parts();
    for v6 in [false, true] {
        let s = SocketAddr::new(lab.server_addr(v6), PORT);
        let bytes = b"EHLO allowed-bot\r\n".to_vec();
        let seen = lab.client(s, Manner::Bot(bytes.clone()));
        // Not held, not flagged, not refused: the real greeting at once, and its
        // bytes delivered.
        assert!(
            seen.greeting.starts_with("220 lab.example"),
            "{}",
            seen.greeting
        );
        assert!(
            seen.greeting_after < Duration::from_millis(300),
            "{:?}",
            seen.greeting_after
        );
        let got = resp
            .wait_closed(seen.local_port, Duration::from_secs(5))
            .unwrap();
        assert!(got.received.starts_with(&bytes));
    }
    agent.stop().unwrap();
    assert!(agent.events("early_talker").is_empty(), "{:?}", agent.seen);
    let st = &agent.events("stopped")[0];
    assert_eq!(st["allowlist_hits"], 2, "{st}");
    assert_eq!(st["connections_tracked"], 0, "{st}");
}

#[test]
fn o2_pass_cache_holds_a_polite_client_once_and_survives_restart() {
    require_root();
    let lab = Lab::new().unwrap();
    // The responder greets 300 ms late, so that a bot without a hold still talks
    // first (the pass cache skips the hold, not the detection).
    let _resp = Responder::start(&lab, PORT, Duration::from_millis(300)).unwrap();
    let args = ["-a", "log", "-w", "1", "--pass-ttl", "1h"];
    let mut agent = Agent::start(&lab, &args).unwrap();
    let first = lab.client(server(&lab), Manner::Polite);
    assert!(
        first.since_connect_call >= Duration::from_millis(1000),
        "{:?}",
        first.since_connect_call
    );
    let second = lab.client(server(&lab), Manner::Polite);
    assert!(
        second.greeting_after < Duration::from_millis(800),
        "held again despite the pass cache: {:?}",
        second.greeting_after
    );
    agent.stop().unwrap();
    assert_eq!(agent.events("stopped")[0]["pass_cache_hits"], 1);

    // A restart keeps the pass (saved in the state directory).
    let mut agent = Agent::start(&lab, &args).unwrap();
    let third = lab.client(server(&lab), Manner::Polite);
    assert!(
        third.greeting_after < Duration::from_millis(800),
        "{:?}",
        third.greeting_after
    );
    // Talking early loses the pass: the next polite connection is held again.
    let s = server(&lab);
    let b = lab.client(s, Manner::Bot(b"EHLO x\r\n".to_vec()));
    assert_eq!(
        agent
            .verdict_for(b.local_port, Duration::from_secs(5))
            .unwrap()["event"],
        "early_talker"
    );
    let fourth = lab.client(server(&lab), Manner::Polite);
    assert!(
        fourth.since_connect_call >= Duration::from_millis(1000),
        "{:?}",
        fourth.since_connect_call
    );
    agent.stop().unwrap();
    assert!(lab.state_dir().join("pass-cache.json").exists());
}

#[test]
fn o3_reload_changes_the_action_live() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    std::fs::create_dir_all(lab.dir()).unwrap();
    let conf = lab.dir().join("earlytalker.toml");
    std::fs::write(&conf, "action = \"log\"\nwait = 2.0\n").unwrap();
    let mut agent = Agent::start(&lab, &["-c", conf.to_str().unwrap()]).unwrap();
    assert_eq!(agent.events("started")[0]["action"], "log");

    // A polite connection in flight, its greeting held, across the reload.
    let s = server(&lab);
    let in_flight = lab.in_client(move || session(s, &Manner::Polite));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&conf, "action = \"deny\"\nwait = 1.0\n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let r = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "reloaded")
        .unwrap();
    assert_eq!(
        (r["action"].as_str(), r["wait"].as_f64()),
        (Some("deny"), Some(1.0))
    );
    let seen = join(in_flight).unwrap().unwrap();
    assert!(
        seen.greeting.starts_with("220 lab.example"),
        "in-flight client lost: {seen:?}"
    );
    assert!(
        seen.greeting_after >= Duration::from_millis(1900),
        "{:?}",
        seen.greeting_after
    );
    assert_eq!(
        agent
            .verdict_for(seen.local_port, Duration::from_secs(5))
            .unwrap()["event"],
        "pass"
    );

    // The new action applies to the next bot.
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    assert_eq!(String::from_utf8_lossy(&b.received), reply_line("deny"));
    assert!(resp
        .session(b.local_port)
        .is_none_or(|s| s.received.is_empty()));

    // An invalid file is refused whole; the old configuration stays.
    std::fs::write(&conf, "action = \"log\"\nwait = -5.0\n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let r = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "reload_refused")
        .unwrap();
    assert!(r["error"].as_str().unwrap().contains("wait"), "{r}");
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    assert_eq!(String::from_utf8_lossy(&b.received), reply_line("deny"));
    agent.stop().unwrap();
    assert_eq!(agent.events("stopped")[0]["action_deny"], 2);
}

fn scrape(lab: &Lab, addr: &'static str) -> String {
    join(lab.in_server(move || -> anyhow::Result<String> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    }))
    .unwrap()
    .unwrap()
}

#[test]
fn o4_metrics_and_status_show_what_happened() {
    let (lab, _resp, mut agent) = Rig::builder(&[
        "-a",
        "deny",
        "-w",
        "1",
        "--metrics-listen",
        "127.0.0.1:9125",
        "--allow",
        "192.0.2.0/24",
    ])
    .start()
    .into_parts();
    let p = lab.client(server(&lab), Manner::Polite);
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    agent
        .verdict_for(p.local_port, Duration::from_secs(5))
        .unwrap();
    agent
        .verdict_for(b.local_port, Duration::from_secs(5))
        .unwrap();
    // The snapshot refreshes every 0.5 s, the map walk every 5 s.
    std::thread::sleep(Duration::from_millis(5200));

    let m = scrape(&lab, "127.0.0.1:9125");
    assert!(
        m.starts_with("HTTP/1.1 200") || m.starts_with("HTTP/1.0 200"),
        "{m}"
    );
    for line in [
        "earlytalker_early_talkers_total{action=\"deny\"} 1",
        "earlytalker_early_talkers_total{action=\"log\"} 0",
        "earlytalker_passes_total 1",
        "earlytalker_connections_tracked_total 2",
        "earlytalker_events_lost_total 0",
        "earlytalker_map_entries{map=\"allowlist\"} 1",
        "earlytalker_greetings_held 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }

    let v = status_json(&lab).unwrap();
    assert_eq!(v["counters"]["early_talkers"], 1, "{v:#}");
    assert_eq!(v["counters"]["passes"], 1);
    assert_eq!(v["config"]["action"], "deny");
    assert_eq!(v["config"]["allow"][0], "192.0.2.0/24");
    let recent = v["recent_verdicts"].as_array().unwrap();
    let bot_port = format!(":{}", b.local_port);
    assert!(
        recent
            .iter()
            .any(|r| r["event"] == "early_talker"
                && r["client"].as_str().unwrap().ends_with(&bot_port)),
        "{recent:?}"
    );
    let text = Command::new(agent_bin())
        .args(["status", "--control-socket"])
        .arg(lab.control_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("action deny") && text.contains(&bot_port),
        "{text}"
    );

    // No agent: a clear error and exit 2.
    agent.stop().unwrap();
    let out = Command::new(agent_bin())
        .args(["status", "--control-socket"])
        .arg(lab.control_socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}

#[test]
fn o5_a_second_agent_cannot_take_over_the_sockets() {
    require_root();
    let lab = Lab::new().unwrap();
    let mut first = Agent::start(&lab, &["-a", "log"]).unwrap();
    let (code, _, err) = run_agent_once(&lab, &["-i", &lab.server_if, "-a", "log"]).unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use"), "{err}");
    // The first agent still answers, and its programs are the only ones attached.
    assert_eq!(lab.tcx_programs().unwrap(), 2);
    first.stop().unwrap();
    assert_eq!(lab.tcx_programs().unwrap(), 0);
}

/// Stops the agent: a clean exit, every teardown step succeeded, nothing left
/// attached.
fn stop_cleanly(lab: &Lab, agent: &mut Agent) {
    let st = agent.stop().unwrap();
    assert!(st.success(), "{}", agent.stderr());
    assert!(
        agent.events("teardown_failed").is_empty(),
        "{:?}",
        agent.seen
    );
    assert_eq!(lab.tcx_programs().unwrap(), 0);
}

fn proc_status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn o6_least_privilege_after_attach() {
    require_root();
    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    std::fs::create_dir_all(lab.dir()).unwrap();
    let policy = lab.dir().join("policy.sock");
    let conf = lab.dir().join("earlytalker.toml");
    std::fs::write(&conf, "action = \"deny\"\nwait = 1.0\n").unwrap();
    let mut agent = Agent::start(
        &lab,
        &[
            "-c",
            conf.to_str().unwrap(),
            "--policy-socket",
            policy.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:9125",
        ],
    )
    .unwrap();
    let pid = agent.pid();
    // Only CAP_NET_ADMIN (bit 12) is left, in every set that matters, for
    // every thread (the metrics thread was started after the drop).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        for (field, want) in [
            ("CapEff", "0000000000001000"),
            ("CapPrm", "0000000000001000"),
            ("CapBnd", "0000000000001000"),
            ("CapInh", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("NoNewPrivs", "1"),
        ] {
            let got = s
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .unwrap()
                .trim();
            assert_eq!(got, want, "thread {tid} {field}");
        }
    }
    assert_eq!(proc_status_field(pid, "CapEff"), "0000000000001000");
    // Sockets are not world-writable.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&policy), 0o660);
    assert_eq!(mode(&lab.control_socket()), 0o600);
    // Still fully working without the rest: enforcement (raw reply + SOCK_DESTROY)...
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    assert_eq!(String::from_utf8_lossy(&b.received), reply_line("deny"));
    // ...reload (map updates through held fds), metrics and the pass cache save.
    std::fs::write(&conf, "action = \"denysoft\"\nwait = 0.5\n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "reloaded")
        .unwrap();
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    assert_eq!(String::from_utf8_lossy(&b.received), reply_line("denysoft"));
    // The snapshot behind /metrics refreshes every 0.5 s: poll, bounded.
    let want = "earlytalker_early_talkers_total{action=\"denysoft\"} 1";
    let end = std::time::Instant::now() + Duration::from_secs(3);
    let mut m = scrape(&lab, "127.0.0.1:9125");
    while !m.contains(want) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        m = scrape(&lab, "127.0.0.1:9125");
    }
    assert!(m.contains(want), "{m}");
    stop_cleanly(&lab, &mut agent);
}

/// The shipped systemd unit: `systemd-analyze` accepts it, and the agent works
/// with exactly the capabilities its CapabilityBoundingSet grants (under
/// `setpriv`, which bounds a root process the way systemd does, with
/// NoNewPrivileges). systemd itself is not PID 1 here, so its other sandboxing
/// (the system-call filter, ProtectSystem…) is checked only as configuration.
#[test]
fn o7_systemd_unit_verifies_and_its_capabilities_suffice() {
    require_root();
    let unit_src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../earlytalker/dist/earlytalker.service");
    let unit = std::fs::read_to_string(&unit_src).unwrap();
    let lab = Lab::new().unwrap();
    std::fs::create_dir_all(lab.dir()).unwrap();
    // The same unit, run from where the agent was built rather than installed.
    let copy = lab.dir().join("earlytalker.service");
    let bin = agent_bin();
    std::fs::write(
        &copy,
        unit.replace("/usr/local/sbin/earlytalker", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let level = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(
        level.contains(" OK") || level.contains(" SAFE"),
        "the unit's sandboxing weakened: {level}"
    );

    // setpriv's syntax for the unit's bounding set: -all,+bpf,+net_admin,…
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    let bounding = std::iter::once("-all".to_string())
        .chain(
            caps.split_whitespace()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let _resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    // Where Postfix wants it: a directory of the MTA's user, mode 0700, as
    // /var/spool/postfix/private is; handed to the MTA's group.
    let private = lab.dir().join("private");
    std::fs::create_dir_all(&private).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&private, Some(nobody.uid), None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let policy = private.join("earlytalker");
    let mut agent = Agent::start_under(
        &lab,
        &[
            "setpriv",
            "--bounding-set",
            &bounding,
            "--no-new-privs",
            "--",
        ],
        &[
            "-a",
            "deny",
            "-w",
            "1",
            "--policy-socket",
            policy.to_str().unwrap(),
            "--socket-group",
            "nogroup",
        ],
    )
    .unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&policy).unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(meta.gid(), nogroup.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // After attach only CAP_NET_ADMIN is usable; the bounding set stays the
    // unit's (shrinking it takes CAP_SETPCAP, which the unit does not grant).
    let pid = agent.pid();
    assert_eq!(proc_status_field(pid, "CapEff"), "0000000000001000");
    assert_eq!(proc_status_field(pid, "CapPrm"), "0000000000001000");
    assert_eq!(proc_status_field(pid, "NoNewPrivs"), "1");
    // Enforcement needs the most: the raw reply and SOCK_DESTROY.
    let b = lab.bot(server(&lab), b"EHLO bot\r\n", false);
    assert_eq!(String::from_utf8_lossy(&b.received), reply_line("deny"));
    let s = server(&lab);
    let polite = lab.client(s, Manner::Polite);
    assert!(polite.greeting.starts_with("220"), "{polite:?}");
    assert!(polite.greeting_after >= Duration::from_millis(900));
    stop_cleanly(&lab, &mut agent);
}

#[test]
fn o8_reload_names_a_restart_only_change_and_status_shows_the_value_in_force() {
    require_root();
    let lab = Lab::new().unwrap();
    std::fs::create_dir_all(lab.dir()).unwrap();
    let conf = lab.dir().join("earlytalker.toml");
    std::fs::write(&conf, "action = \"log\"\nevent_buffer = 65536\n").unwrap();
    let mut agent = Agent::start(&lab, &["-c", conf.to_str().unwrap()]).unwrap();
    assert_eq!(status_json(&lab).unwrap()["config"]["event_buffer"], 65536);

    // A live setting and a restart-only one change together.
    std::fs::write(&conf, "action = \"deny\"\nevent_buffer = 131072\n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let r = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "reloaded")
        .unwrap();
    assert_eq!(r["action"], "deny", "{r}");
    assert_eq!(
        r["restart_needed"],
        serde_json::json!(["event_buffer"]),
        "{r}"
    );
    // The ring buffer keeps the size it was created with, and says so.
    assert_eq!(r["event_buffer"], 65536, "{r}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v = status_json(&lab).unwrap();
        if v["config"]["action"] == "deny" || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["config"]["action"], "deny", "{v:#}");
    assert_eq!(v["config"]["event_buffer"], 65536, "{v:#}");
    let err = agent.stderr();
    assert!(
        err.lines()
            .any(|l| l.contains("reload") && l.contains("event_buffer")),
        "no warning naming event_buffer:\n{err}"
    );
    stop_cleanly(&lab, &mut agent);
}
