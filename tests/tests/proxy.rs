//! PROXY protocol (`--proxy-protocol 25`): a real HAProxy (Debian's package)
//! in the client namespace balances onto a private Postfix that expects its
//! header (`smtpd_upstream_proxy_protocol = haproxy`). The header is the
//! balancer talking, not early talk; the client it names is the one held,
//! logged, cached and handed to the policy service.

use earlytalker_tests::{haproxy::Haproxy, *};
use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

const BOT: &str = "10.99.0.3";
const POLITE: &str = "10.99.0.4";
const POLICY: &str = "127.0.0.1:10040";

struct Rig {
    agent: Agent,
    postfix: Postfix,
    haproxy: Haproxy,
    lab: Lab,
}

fn rig(agent_args: &[&str], restrictions: &str) -> Rig {
    require_root();
    let lab = Lab::new().unwrap();
    lab.add_client_address(BOT).unwrap();
    lab.add_client_address(POLITE).unwrap();
    let args = [&["--proxy-protocol", "25"][..], agent_args].concat();
    let agent = Agent::start(&lab, &args).unwrap();
    let postfix = Postfix::start_proxied(&lab, restrictions).unwrap();
    let haproxy = Haproxy::start(&lab).unwrap();
    Rig {
        agent,
        postfix,
        haproxy,
        lab,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The agent's next `event` line, which must name a client at `addr`.
fn line_naming(r: &mut Rig, event: &str, addr: &str) -> serde_json::Value {
    let v = r
        .agent
        .wait_for(Duration::from_secs(10), |v| v["event"] == event)
        .unwrap();
    assert!(
        v["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{addr}:")),
        "not named {addr}: {v}"
    );
    v
}

/// Connects from `src` through `via` and reads the greeting: how long after
/// connect() returned it came, and the client's port.
fn greeting_via(lab: &Lab, src: &str, via: SocketAddr) -> (Duration, u16, String) {
    let src = ip(src);
    join(lab.in_client(move || -> anyhow::Result<_> {
        let c = connect_from(Some(src), via)?;
        let t = Instant::now();
        let port = c.local_addr()?.port();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line)?;
        Ok((t.elapsed(), port, line))
    }))
    .unwrap()
    .unwrap()
}

#[test]
fn x1_behind_haproxy_the_named_client_is_held_cached_and_a_bot_denied_unseen() {
    let mut r = rig(&["-a", "deny", "-w", "2", "--pass-ttl", "1h"], "");
    // A polite client through the v1 balancer: held, then delivered.
    let polite_v1 = ["--local-interface", POLITE, "--port", "2525"];
    let t = Instant::now();
    let (ok, transcript) = swaks_via(&r.lab, haproxy::BALANCER, "polite@lab.example", &polite_v1);
    assert!(ok, "swaks failed:\n{transcript}\n{}", r.postfix.log());
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    let v = line_naming(&mut r, "pass", POLITE);
    // On time: the release carried the header HAProxy sent while held. (Left
    // to HAProxy's retransmissions, at 0.2, 0.6, 1.4 and 3.0 s, it would come
    // after 3 s.)
    let g = v["greeting_after_ms"].as_f64().unwrap();
    assert!((2000.0..2500.0).contains(&g), "greeting after {g} ms: {v}");
    let d = r.postfix.wait_delivered(1, Duration::from_secs(20));
    assert_eq!(d.len(), 1, "{}", r.postfix.log());
    // Postfix read the header the release carried: it knows the real client.
    assert!(
        r.postfix.log().contains(&format!("[{POLITE}]")),
        "{}",
        r.postfix.log()
    );

    // Through the v2 balancer, that client is now known: not held.
    let (after, _, greeting) = greeting_via(&r.lab, POLITE, r.haproxy.v2());
    assert!(greeting.starts_with("220"), "{greeting:?}");
    assert!(after < Duration::from_millis(500), "held again: {after:?}");

    // A bot through the v2 balancer: denied, named by its own address, and
    // Postfix never hears of it.
    let bot = ip(BOT);
    let via = r.haproxy.v2();
    let b = join(
        r.lab
            .in_client(move || bot_from(Some(bot), via, b"EHLO bot.example\r\n", false)),
    )
    .unwrap()
    .unwrap();
    assert!(
        b.received.starts_with(reply_line("deny").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&b.received)
    );
    let v = line_naming(&mut r, "early_talker", BOT);
    assert_eq!(v["bytes"], 18, "the header counted as early talk: {v}");
    assert_eq!(v["payload"], "EHLO bot.example\\r\\n", "{v}");
    std::thread::sleep(Duration::from_millis(500));
    let log = r.postfix.log();
    // Postfix logs every connection with the header's client: none from it.
    assert!(!log.contains(BOT), "Postfix saw the bot:\n{log}");

    // Straight to the MTA with no header: dropped, as Postfix would, and said.
    let server = SocketAddr::new(r.lab.server_addr(false), 25);
    let b = r.lab.bot(server, b"EHLO direct.example\r\n", false);
    assert!(
        b.received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&b.received)
    );
    line_naming(&mut r, "bad_proxy_header", haproxy::BALANCER);
    let s = status_json(&r.lab).unwrap();
    assert!(s["counters"]["proxy_headers"].as_u64().unwrap() >= 3, "{s}");
}

#[test]
fn x2_defer_reject_behind_haproxy_matches_the_real_client_at_the_policy_service() {
    let restrictions = format!("check_policy_service inet:{POLICY},");
    let mut r = rig(
        &[
            "-a",
            "deny",
            "--defer-reject",
            "-w",
            "1",
            "--policy-listen",
            POLICY,
        ],
        &restrictions,
    );
    let bot = ip(BOT);
    let via = r.haproxy.v1();
    let (port, replies) = join(r.lab.in_client(move || {
        smtp_transaction_from(
            Some(bot),
            via,
            true,
            "bot@client.example",
            "victim@lab.example",
        )
    }))
    .unwrap()
    .unwrap();
    // Greeted as usual, refused at RCPT with our text.
    assert_eq!(replies[0].0, 220, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last.0 / 100, 5, "{replies:?}\n{}", r.postfix.log());
    assert!(last.1.contains(REPLY_TEXT), "{replies:?}");
    let v = line_naming(&mut r, "early_talker", BOT);
    assert_eq!(v["action"], "defer", "{v}");
    // The header's port is the bot's own, as HAProxy saw it.
    assert_eq!(v["client"], format!("{BOT}:{port}"), "{v}");
    let log = r.postfix.log();
    assert!(
        log.lines().any(|l| l.contains("reject: RCPT")
            && l.contains(&format!("[{BOT}]"))
            && l.contains(REPLY_TEXT)),
        "no reject of the real client in the Postfix log:\n{log}"
    );
    // A polite client through the same balancer is delivered.
    let polite = ["--local-interface", POLITE, "--port", "2525"];
    let (ok, transcript) = swaks_via(&r.lab, haproxy::BALANCER, "polite@lab.example", &polite);
    assert!(ok, "swaks failed:\n{transcript}\n{}", r.postfix.log());
    assert_eq!(
        r.postfix.wait_delivered(1, Duration::from_secs(20)).len(),
        1
    );

    // The agent's own PIPECONNECT question (asked again at a reload) sends a
    // header too, or Postfix would never answer it.
    r.agent.signal(nix::sys::signal::Signal::SIGHUP);
    let end = Instant::now() + Duration::from_secs(10);
    let mut s = status_json(&r.lab).unwrap();
    while s["config"]["pipeconnect_advertised"] != false && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        s = status_json(&r.lab).unwrap();
    }
    assert_eq!(
        s["config"]["pipeconnect_advertised"], false,
        "{}",
        s["config"]
    );
}
