//! The core issue's privileged suite: real kernel programs, real TCP between two
//! network namespaces, the real agent binary. Needs root.

use earlytalker_tests::*;
use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

const PORT: u16 = 25;
const VERDICT_WAIT: Duration = Duration::from_secs(10);

fn addr(lab: &Lab, v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(lab.server_addr(v6), port)
}

fn bot() -> Manner {
    Manner::Bot(b"EHLO bot\r\n".to_vec())
}

fn assert_early_bot(agent: &mut Agent, seen: &Seen, server: SocketAddr) {
    let v = agent
        .verdict_for(seen.local_port, VERDICT_WAIT)
        .expect("verdict");
    assert_eq!(v["event"], "early_talker", "{v}");
    let client = v["client"].as_str().unwrap();
    let expected_ip = match server {
        SocketAddr::V4(_) => format!("{CLIENT_V4}:{}", seen.local_port),
        SocketAddr::V6(_) => format!("[{CLIENT_V6}]:{}", seen.local_port),
    };
    assert_eq!(client, expected_ip);
    assert_eq!(v["server"], server.to_string());
    assert_eq!(v["bytes"], 10, "{v}");
    assert_eq!(v["payload"], "EHLO bot\\r\\n");
    assert_eq!(v["action"], "log");
    assert!(v["after_ms"].as_f64().unwrap() < 500.0, "{v}");
}

#[test]
fn t01_polite_client_passes() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "1"]).start().into_parts();
    let seen = lab.client(addr(&lab, false, PORT), Manner::Polite);
    assert!(seen.greeting.starts_with("220 "), "{}", seen.greeting);
    let v = agent.verdict_for(seen.local_port, VERDICT_WAIT).unwrap();
    assert_eq!(v["event"], "pass", "{v}");
    assert_eq!(v["client"], format!("{CLIENT_V4}:{}", seen.local_port));
    let g = v["greeting_after_ms"].as_f64().unwrap();
    assert!((1000.0..1750.0).contains(&g), "greeting_after_ms {g}");
    agent.stop().unwrap();
    assert_eq!(agent.events("pass").len(), 1);
    assert!(agent.events("early_talker").is_empty(), "{:?}", agent.seen);
}

#[test]
fn t02_bot_talking_at_once_is_caught() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "1"]).start().into_parts();
    let server = addr(&lab, false, PORT);
    let seen = lab.client(server, bot());
    // log mode: the bot still gets the real greeting, after the hold.
    assert!(seen.greeting.starts_with("220 lab.example"));
    assert_early_bot(&mut agent, &seen, server);
}

#[test]
fn t03_talking_in_the_middle_of_the_hold_is_caught() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "1.5"])
        .start()
        .into_parts();
    let seen = lab.client(
        addr(&lab, false, PORT),
        Manner::Midway(Duration::from_millis(600), b"HELO x\r\n".to_vec()),
    );
    let v = agent.verdict_for(seen.local_port, VERDICT_WAIT).unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    assert_eq!(v["bytes"], 8);
    let after = v["after_ms"].as_f64().unwrap();
    assert!((550.0..1400.0).contains(&after), "after_ms {after}");
}

#[test]
fn t04_talking_after_the_greeting_passes() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "0.5"])
        .start()
        .into_parts();
    let port = join(lab.in_client({
        let s = addr(&lab, false, PORT);
        move || send_after_greeting(s, b"EHLO late\r\nQUIT\r\n")
    }))
    .unwrap()
    .unwrap();
    let v = agent.verdict_for(port, VERDICT_WAIT).unwrap();
    assert_eq!(v["event"], "pass", "{v}");
}

#[test]
fn t05_wait_zero_catches_the_natural_race() {
    // No hold at all: the responder itself greets 300 ms late.
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "0"])
        .greet(Duration::from_millis(300))
        .start()
        .into_parts();
    let server = addr(&lab, false, PORT);
    let seen = lab.client(server, bot());
    assert_early_bot(&mut agent, &seen, server);
    let polite = lab.client(server, Manner::Polite);
    assert_eq!(
        agent.verdict_for(polite.local_port, VERDICT_WAIT).unwrap()["event"],
        "pass"
    );
}

#[test]
fn t06_ipv6() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "0.5"])
        .start()
        .into_parts();
    let server = addr(&lab, true, PORT);
    let seen = lab.client(server, bot());
    assert_early_bot(&mut agent, &seen, server);
    let polite = lab.client(server, Manner::Polite);
    let v = agent.verdict_for(polite.local_port, VERDICT_WAIT).unwrap();
    assert_eq!(v["event"], "pass");
    assert_eq!(v["client"], format!("[{CLIENT_V6}]:{}", polite.local_port));
    assert!(polite.since_connect_call >= Duration::from_millis(500));
}

#[test]
fn t07_unmonitored_port_is_left_alone() {
    require_root();
    let lab = Lab::new().unwrap();
    let _r = Responder::start(&lab, 2525, Duration::ZERO).unwrap();
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "3", "-p", "25"]).unwrap();
    for manner in [Manner::Polite, bot()] {
        let seen = lab.client(addr(&lab, false, 2525), manner);
        assert!(
            seen.greeting_after < Duration::from_millis(300),
            "greeting delayed {:?} on an unmonitored port",
            seen.greeting_after
        );
    }
    agent.stop().unwrap();
    let verdicts: Vec<_> = agent
        .seen
        .iter()
        .filter(|v| !matches!(v["event"].as_str(), Some("started" | "stopped")))
        .collect();
    assert!(verdicts.is_empty(), "{verdicts:?}");
    let stopped = agent.events("stopped")[0].clone();
    assert_eq!(stopped["connections_tracked"], 0);
}

#[test]
fn t08_two_hundred_concurrent_connections() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "1"]).start().into_parts();
    let server = addr(&lab, false, PORT);
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let manner = if i % 2 == 0 { bot() } else { Manner::Polite };
            let is_bot = i % 2 == 0;
            lab.in_client(move || session(server, &manner).map(|s| (is_bot, s)))
        })
        .collect();
    let mut expected = std::collections::HashMap::new();
    for h in handles {
        let (is_bot, seen) = join(h).unwrap().unwrap();
        expected.insert(seen.local_port, is_bot);
    }
    assert_eq!(expected.len(), 200);
    // Every verdict arrives; wait for the last one, bounded.
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end
        && agent.events("early_talker").len() + agent.events("pass").len() < 200
    {
        agent.drain_for(Duration::from_millis(200));
    }
    agent.stop().unwrap();
    let early = agent.events("early_talker");
    let pass = agent.events("pass");
    assert_eq!((early.len(), pass.len()), (100, 100));
    for (v, want_bot) in early
        .iter()
        .map(|v| (v, true))
        .chain(pass.iter().map(|v| (v, false)))
    {
        let port: u16 = v["client"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(expected.remove(&port), Some(want_bot), "{v}");
    }
    assert!(expected.is_empty());
}

#[test]
fn t09_hold_timing() {
    require_root();
    let lab = Lab::new().unwrap();
    let _r = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    for wait in [0.0, 0.5, 1.0, 3.0] {
        let w = wait.to_string();
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", &w]).unwrap();
        for _ in 0..3 {
            let seen = lab.client(addr(&lab, false, PORT), Manner::Polite);
            let got = seen.greeting_after.as_secs_f64();
            let from_call = seen.since_connect_call.as_secs_f64();
            assert!(
                from_call >= wait && got <= wait + 0.75,
                "wait {wait}: greeting after {got:.3} s ({from_call:.3} s after the connect() call)"
            );
            eprintln!("wait {wait}: greeting after {got:.3} s");
        }
        agent.stop().unwrap();
    }
}

#[test]
fn t10_integrity_of_delivered_bytes() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "log", "-w", "0.5"])
        .start()
        .into_parts();
    let server = addr(&lab, false, PORT);
    let data = pattern(1 << 20, 42);
    let d2 = data.clone();
    let port = join(lab.in_client(move || send_after_greeting(server, &d2)))
        .unwrap()
        .unwrap();
    let s = resp
        .wait_closed(port, Duration::from_secs(10))
        .expect("session closed");
    assert_eq!(s.received.len(), data.len());
    assert!(s.received == data, "1 MiB arrived altered");

    // An early talker's bytes, in log mode, arrive unchanged too.
    let mut early = b"EHLO bot\r\nMAIL FROM:<a@b>\r\n".to_vec();
    early.extend(pattern(3000, 7));
    let seen = lab.client(server, Manner::Bot(early.clone()));
    let s = resp
        .wait_closed(seen.local_port, Duration::from_secs(10))
        .unwrap();
    assert!(s.received.starts_with(&early), "early bytes altered");
    let v = agent.verdict_for(seen.local_port, VERDICT_WAIT).unwrap();
    assert_eq!(v["event"], "early_talker");
    assert_eq!(v["bytes"].as_u64().unwrap(), early.len() as u64);
}

#[test]
fn t11_bad_input_exits_2_with_one_line() {
    require_root();
    let lab = Lab::new().unwrap();
    let cases: &[&[&str]] = &[
        &["--nosuch-flag"],
        &["-a", "log", "--port", "0"],
        &["-a", "log", "--port", "70000"],
        &["-a", "log", "--wait", "-1"],
        &["-a", "log", "--wait", "abc"],
        &["-a", "log", "--wait", "60.5"],
        &["-a", "log", "--iface", "nosuch"],
        &["-a", "maybe"],
        // Policy answers are never offered to the network.
        &["--policy-listen", "0.0.0.0:10040"],
    ];
    for args in cases {
        let mut full: Vec<&str> = vec!["-i", &lab.server_if];
        full.extend_from_slice(args);
        if args.contains(&"--iface") {
            full.drain(..2);
        }
        let (code, out, err) = run_agent_once(&lab, &full).unwrap();
        assert_eq!(code, 2, "{args:?}: stdout {out:?} stderr {err:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.starts_with("earlytalker: error: "), "{err:?}");
        assert!(out.is_empty(), "{args:?}: {out:?}");
        assert_eq!(
            lab.tcx_programs().unwrap(),
            0,
            "{args:?} left programs attached"
        );
        eprintln!("{args:?} -> {}", err.trim());
    }
    // The limit comes from the SYN-ACK retry budget (60 s at the default 5).
    let (_, _, err) =
        run_agent_once(&lab, &["-i", &lab.server_if, "-a", "log", "--wait", "60.5"]).unwrap();
    assert!(
        err.contains("--wait 60.5 exceeds the 60.0 s") && err.contains("tcp_synack_retries = 5"),
        "{err}"
    );
    let (_, _, err) = run_agent_once(&lab, &["-a", "log", "--iface", "nosuch"]).unwrap();
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn t12_sigkill_fails_open() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "5"]).start().into_parts();
    assert_eq!(lab.tcx_programs().unwrap(), 2);
    let server = addr(&lab, false, PORT);
    let held = lab.in_client(move || session(server, &Manner::Polite));
    // Let the connection establish and its greeting be held.
    thread::sleep(Duration::from_millis(800));
    let killed_at = Instant::now();
    agent.kill().unwrap();
    let seen = join(held).unwrap().unwrap();
    let since_kill = killed_at.elapsed();
    assert!(
        since_kill <= Duration::from_secs(1),
        "greeting arrived {since_kill:?} after SIGKILL (held {:?})",
        seen.greeting_after
    );
    assert!(seen.greeting_after < Duration::from_secs(3));
    assert_eq!(
        lab.tcx_programs().unwrap(),
        0,
        "programs left attached after SIGKILL"
    );
    let fresh = lab.client(server, Manner::Polite);
    assert!(
        fresh.greeting_after < Duration::from_millis(300),
        "{:?}",
        fresh.greeting_after
    );
}

#[test]
fn t13_sigterm_detaches_cleanly() {
    let (lab, _r, mut agent) = Rig::builder(&["-a", "log", "-w", "1"]).start().into_parts();
    assert_eq!(lab.tcx_programs().unwrap(), 2);
    let pid = agent.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = agent.stop();
    // stop() re-signals; the agent may already be gone, both are fine.
    let _ = st;
    assert_eq!(agent.events("stopped").len(), 1, "{:?}", agent.seen);
    assert_eq!(lab.tcx_programs().unwrap(), 0);
}
