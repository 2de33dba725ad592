//! Enforcement (deny, denysoft, defer-reject) against an unmodified server, in
//! network namespaces, with the real agent. Needs root.

use earlytalker_tests::*;
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

const PORT: u16 = 25;

/// The bot got exactly one reply line with `code`, then the connection closed;
/// the responder got nothing and its socket was torn down within wait + 1 s.
fn assert_rejected(
    lab: &Lab,
    resp: &Responder,
    agent: &mut Agent,
    run: &BotRun,
    code: &str,
    wait: f64,
    taken: &str,
) {
    let text = String::from_utf8_lossy(&run.received);
    assert_eq!(
        text,
        format!("{code} {REPLY_TEXT}\r\n"),
        "bot received {text:?} ({})",
        run.end
    );
    assert!(run.end == "eof" || run.end == "reset", "{}", run.end);
    assert!(
        run.elapsed.as_secs_f64() <= wait + 0.1,
        "reply after {:?}, later than the hold",
        run.elapsed
    );
    let v = agent
        .verdict_for(run.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    assert_eq!(v["action"], taken);
    assert_eq!(v["end"], "denied");
    // The MTA side: held before accept, a denied bot is never accepted.
    if wait > 0.0 {
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            resp.session(run.local_port).is_none(),
            "the MTA accepted a bot denied while held"
        );
        return;
    }
    // Not held (wait 0): zero bytes, socket gone in time. A connection destroyed
    // while still in the accept queue may never be seen by the responder at all.
    if let Some(s) = resp.wait_closed(run.local_port, Duration::from_secs(3)) {
        assert!(
            s.received.is_empty(),
            "responder got {:?}",
            String::from_utf8_lossy(&s.received)
        );
        let lived = s.closed_at.unwrap() - s.accepted_at;
        assert!(
            lived.as_secs_f64() <= wait + 1.0,
            "MTA socket lived {lived:?} ({})",
            s.end
        );
    } else {
        assert!(
            resp.session(run.local_port).is_none(),
            "responder socket still open: {:?}",
            resp.session(run.local_port)
        );
    }
    assert!(
        agent.events("teardown_failed").is_empty(),
        "{:?}",
        agent.seen
    );
    let _ = lab;
}

fn deny_case(v6: bool, action: &str, code: &str) {
    let (lab, resp, mut agent) = Rig::builder(&["-a", action, "-w", "1"])
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(v6), PORT);
    let run = lab.bot(server, b"EHLO bot\r\n", false);
    assert_rejected(&lab, &resp, &mut agent, &run, code, 1.0, action);
    // A polite client right after is untouched.
    let seen = lab.client(server, Manner::Polite);
    assert!(seen.greeting.starts_with("220 lab.example"));
    assert!(seen.since_connect_call >= Duration::from_secs(1));
}

#[test]
fn e01_deny_v4() {
    deny_case(false, "deny", "554 5.7.1");
}

#[test]
fn e02_denysoft_v4() {
    deny_case(false, "denysoft", "421 4.7.1");
}

#[test]
fn e03_deny_v6() {
    deny_case(true, "deny", "554 5.7.1");
}

#[test]
fn e04_denysoft_v6() {
    deny_case(true, "denysoft", "421 4.7.1");
}

#[test]
fn e05_pipelining_bot_delivers_nothing() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "deny", "-w", "2"])
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let mut msg =
        b"EHLO bot\r\nMAIL FROM:<s@spam.example>\r\nRCPT TO:<v@lab.example>\r\nDATA\r\n".to_vec();
    msg.extend(pattern(20_000, 3).iter().map(|b| b'a' + b % 26));
    msg.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
    // Sent at once and followed by FIN: the kernel must drop all of it, and the
    // bot's retransmissions, and the FIN.
    let run = lab.bot(server, &msg, true);
    assert_rejected(&lab, &resp, &mut agent, &run, "554 5.7.1", 2.0, "deny");
    // Give retransmissions time to arrive; still nothing.
    std::thread::sleep(Duration::from_millis(1500));
    if let Some(s) = resp.session(run.local_port) {
        assert!(s.received.is_empty());
    }
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert!(stopped["enforced_segments_dropped"].as_u64().unwrap() >= 1);
    assert_eq!(stopped["action_deny"], 1);
}

#[test]
fn e06_defer_reject_keeps_the_verdict_for_the_mta() {
    for (action, answer) in [("deny", "REJECT"), ("denysoft", "DEFER")] {
        let policy: SocketAddr = "127.0.0.1:10040".parse().unwrap();
        let (lab, resp, mut agent) = Rig::builder(&[
            "-a",
            action,
            "--defer-reject",
            "-w",
            "1",
            "--policy-listen",
            "127.0.0.1:10040",
        ])
        .start()
        .into_parts();
        let server = SocketAddr::new(lab.server_addr(false), PORT);
        let bytes = b"EHLO bot\r\nMAIL FROM:<s@spam.example>\r\n".to_vec();
        let seen = lab.client(server, Manner::Bot(bytes.clone()));
        // The real greeting: the bot's bytes completed the handshake, so the
        // MTA accepted it, read them and greeted, as without earlytalker.
        assert!(
            seen.greeting.starts_with("220 lab.example"),
            "{}",
            seen.greeting
        );
        assert!(seen.greeting_after < Duration::from_secs(1));
        let v = agent
            .verdict_for(seen.local_port, Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            (v["event"].as_str(), v["action"].as_str()),
            (Some("early_talker"), Some("defer"))
        );
        // The bot's bytes reached the MTA unchanged.
        let s = resp
            .wait_closed(seen.local_port, Duration::from_secs(5))
            .unwrap();
        assert!(
            s.received.starts_with(&bytes),
            "{:?}",
            String::from_utf8_lossy(&s.received)
        );

        let polite = lab.client(server, Manner::Polite);
        // Ask as Postfix would, from the server's namespace (loopback).
        let (bport, pport) = (seen.local_port.to_string(), polite.local_port.to_string());
        let answers = join(
            lab.in_server(move || -> anyhow::Result<(String, String, String)> {
                let q = |port: &str, state: &str| {
                    policy_query(
                        policy,
                        &[
                            ("request", "smtpd_access_policy"),
                            ("protocol_state", state),
                            ("client_address", CLIENT_V4),
                            ("client_port", port),
                            ("sender", "s@spam.example"),
                            ("recipient", "v@lab.example"),
                        ],
                    )
                };
                Ok((q(&bport, "RCPT")?, q(&bport, "MAIL")?, q(&pport, "RCPT")?))
            }),
        )
        .unwrap()
        .unwrap();
        assert_eq!(answers.0, format!("{answer} {REPLY_TEXT}"));
        assert_eq!(answers.1, format!("{answer} {REPLY_TEXT}"));
        assert_eq!(answers.2, "DUNNO");
        agent
            .wait_for(Duration::from_secs(5), |v| {
                v["event"] == "policy" && v["state"] == "RCPT"
            })
            .unwrap();
        agent.stop().unwrap();
        assert_eq!(agent.events("stopped")[0]["action_defer"], 1);
    }
}

#[test]
fn e07_two_hundred_concurrent_under_deny() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "deny", "-w", "1"])
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let handles: Vec<_> = (0..200)
        .map(|i| {
            lab.in_client(move || -> anyhow::Result<(bool, u16, Vec<u8>, String)> {
                if i % 2 == 0 {
                    let r = bot_read_all(server, b"EHLO bot\r\nMAIL FROM:<a@b>\r\n", false)?;
                    Ok((true, r.local_port, r.received, r.end))
                } else {
                    let s = session(server, &Manner::Polite)?;
                    Ok((false, s.local_port, s.greeting.into_bytes(), String::new()))
                }
            })
        })
        .collect();
    let mut kinds = HashMap::new();
    for h in handles {
        let (is_bot, port, got, end) = join(h).unwrap().unwrap();
        if is_bot {
            assert_eq!(
                String::from_utf8_lossy(&got),
                reply_line("deny"),
                "bot {port} ({end})"
            );
        } else {
            assert_eq!(
                String::from_utf8_lossy(&got),
                "220 lab.example ESMTP responder\r\n"
            );
        }
        kinds.insert(port, is_bot);
    }
    assert_eq!(kinds.len(), 200);
    // Polite sessions completed byte-exact at the responder; bots delivered nothing.
    let end = Instant::now() + Duration::from_secs(10);
    for (port, is_bot) in &kinds {
        let left = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match (is_bot, resp.wait_closed(*port, left)) {
            (true, Some(s)) => assert!(s.received.is_empty(), "bot {port} delivered bytes"),
            (true, None) => assert!(resp.session(*port).is_none()),
            (false, Some(s)) => assert_eq!(s.received, b"EHLO client.example\r\nQUIT\r\n"),
            (false, None) => panic!("polite session {port} not finished"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && agent.events("early_talker").len() + agent.events("pass").len() < 200
    {
        agent.drain_for(Duration::from_millis(200));
    }
    agent.stop().unwrap();
    assert_eq!(agent.events("early_talker").len(), 100);
    assert_eq!(agent.events("pass").len(), 100);
    assert!(agent.events("teardown_failed").is_empty());
}

#[test]
fn e08_server_that_never_greets() {
    // The reply does not depend on the MTA's greeting: the bot gets it at once,
    // and the MTA never even accepts the connection.
    let (lab, resp, mut agent) = Rig::builder(&["-a", "deny", "-w", "1"])
        .greet(NEVER)
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let run = lab.bot(server, b"EHLO bot\r\n", false);
    assert_rejected(&lab, &resp, &mut agent, &run, "554 5.7.1", 1.0, "deny");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(resp.session(run.local_port).is_none(), "accepted");
}

#[test]
fn e09_log_mode_is_unchanged_byte_exact() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "log", "-w", "0.5"])
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let data = b"EHLO bot\r\nMAIL FROM:<a@b>\r\n".to_vec();
    let seen = lab.client(server, Manner::Bot(data.clone()));
    assert!(seen.greeting.starts_with("220 lab.example"));
    let s = resp
        .wait_closed(seen.local_port, Duration::from_secs(5))
        .unwrap();
    let mut expected = data;
    expected.extend_from_slice(b"EHLO client.example\r\nQUIT\r\n");
    assert_eq!(s.received, expected);
    assert_eq!(
        agent
            .verdict_for(seen.local_port, Duration::from_secs(5))
            .unwrap()["action"],
        "log"
    );
}

/// One step of a teardown fails: the reply cannot leave (here policy routing
/// prohibits the agent's marked packets, as a careless firewall might). The
/// failure is logged and counted, and the other step still runs: the MTA's
/// socket is destroyed and gets nothing, and the client gets nothing either.
#[test]
fn e10_a_failed_reply_is_reported_and_the_mta_still_torn_down() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "deny", "-w", "1"])
        .start()
        .into_parts();
    let mark = format!("{:#x}", earlytalker_tests::fuzz::REPLY_MARK);
    for args in [
        vec!["rule", "add", "fwmark", &mark, "lookup", "4242"],
        vec!["route", "add", "prohibit", "0.0.0.0/0", "table", "4242"],
    ] {
        let st = std::process::Command::new("ip")
            .args(["-n", &lab.server_ns])
            .args(&args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let (port, received) = join(lab.in_client(move || -> std::io::Result<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        c.write_all(b"EHLO bot\r\n")?;
        // Past the hold: neither our reply nor the MTA's greeting comes.
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut got = vec![0u8; 512];
        let n = c.read(&mut got).unwrap_or(0);
        got.truncate(n);
        Ok((c.local_addr()?.port(), got))
    }))
    .unwrap()
    .unwrap();
    assert!(
        received.is_empty(),
        "client got {:?}",
        String::from_utf8_lossy(&received)
    );
    let failed = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "teardown_failed")
        .unwrap();
    assert_eq!(failed["step"], "reply", "{failed}");
    assert!(!failed["error"].as_str().unwrap_or("").is_empty());
    let v = agent.verdict_for(port, Duration::from_secs(5)).unwrap();
    assert_eq!(v["end"], "denied", "{v}");
    // The destroy step ran regardless.
    if let Some(s) = resp.wait_closed(port, Duration::from_secs(3)) {
        assert!(s.received.is_empty(), "{:?}", s.received);
    } else {
        assert!(resp.session(port).is_none(), "{:?}", resp.session(port));
    }
    agent.stop().unwrap();
    let stopped = agent.events("stopped");
    assert_eq!(stopped[0]["teardown_failures"], 1, "{:?}", stopped);
}

/// defer-reject: the kernel reports when an early talker's connection ends, and
/// the verdict outlives it by the close grace (1 s here, 30 s by default), not
/// by the hour kept for closes never seen.
#[test]
fn e11_defer_reject_verdict_ends_with_its_connection() {
    let policy: SocketAddr = "127.0.0.1:10040".parse().unwrap();
    let grace = Duration::from_secs(1);
    let (lab, _resp, mut agent) = Rig::builder(&[
        "-a",
        "deny",
        "--defer-reject",
        "-w",
        "1",
        "--policy-listen",
        "127.0.0.1:10040",
        "--close-grace",
        "1s",
    ])
    .start()
    .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    // Talks at once, then half-closes; reads the greeting and the EHLO reply
    // until the MTA closes in turn.
    let run = lab.bot(server, b"EHLO bot\r\n", true);
    let closed_at = Instant::now();
    assert!(run.received.starts_with(b"220 lab.example"), "{run:?}");
    assert_eq!(run.end, "eof");
    let v = agent
        .verdict_for(run.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        (v["event"].as_str(), v["action"].as_str()),
        (Some("early_talker"), Some("defer"))
    );

    let port = run.local_port.to_string();
    let ask = move || {
        policy_query(
            policy,
            &[
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("client_address", CLIENT_V4),
                ("client_port", &port),
                ("sender", "s@spam.example"),
                ("recipient", "v@lab.example"),
            ],
        )
    };
    // Asked at once, then every 50 ms for at most 10 s, until it answers DUNNO.
    let answers = join(
        lab.in_server(move || -> anyhow::Result<Vec<(Duration, String)>> {
            let mut seen = Vec::new();
            for _ in 0..200 {
                let a = ask()?;
                seen.push((closed_at.elapsed(), a.clone()));
                if a == "DUNNO" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(seen)
        }),
    )
    .unwrap()
    .unwrap();
    assert_eq!(answers[0].1, format!("REJECT {REPLY_TEXT}"), "{answers:?}");
    let (at, last) = answers.last().unwrap();
    assert_eq!(
        last, "DUNNO",
        "still refused 10 s after the close: {answers:?}"
    );
    // Never before the grace has run from the close (the bot sees the MTA's FIN
    // microseconds after the kernel reports it: 20 ms covers that skew)...
    assert!(
        *at + Duration::from_millis(20) >= grace,
        "DUNNO {at:?} after the close: {answers:?}"
    );
    // ...and soon after it: the close record arrives within one 50 ms poll.
    assert!(*at < grace + Duration::from_secs(2), "{answers:?}");
    agent.stop().unwrap();
    let err = agent.stderr();
    assert!(
        !err.contains("malformed") && !err.contains("ignoring a kernel record"),
        "{err}"
    );
    assert_eq!(agent.events("stopped")[0]["kernel_records_rejected"], 0);
}
