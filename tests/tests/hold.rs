//! The hold before accept: held clients are request sockets (or SYN cookies) the
//! MTA cannot accept until the release, which comes on time; released sockets
//! are healthy; more clients than the listen backlog are all served; the agent's
//! end releases everyone. Real kernel programs, real TCP between namespaces.

use earlytalker_tests::*;
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

const PORT: u16 = 25;
/// Greeting lateness allowed in tests on a shared 2-core machine (the bench
/// measures the real figures).
const MARGIN: Duration = Duration::from_millis(50);

/// One polite client: when it called connect() and when that returned (its
/// ACK, which starts the hold, left in between), when the greeting arrived.
#[derive(Clone, Debug)]
struct Held {
    port: u16,
    connecting: Instant,
    connected: Instant,
    greeted: Option<Instant>,
    greeting: String,
}

/// `n` polite clients at once (alternating IPv4/IPv6 if `both`), each reading
/// its greeting (bounded by `patience`), then EHLO and QUIT.
fn polite_clients(lab: &Lab, n: usize, both: bool, patience: Duration) -> Vec<Held> {
    let servers = [
        SocketAddr::new(lab.server_addr(false), PORT),
        SocketAddr::new(lab.server_addr(true), PORT),
    ];
    join(lab.in_client(move || {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let server = servers[if both { i % 2 } else { 0 }];
                thread::spawn(move || polite(server, patience))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect::<anyhow::Result<Vec<Held>>>()
    }))
    .unwrap()
    .unwrap()
}

fn polite(server: SocketAddr, patience: Duration) -> anyhow::Result<Held> {
    let connecting = Instant::now();
    let c = TcpStream::connect_timeout(&server, Duration::from_secs(10))?;
    let connected = Instant::now();
    c.set_read_timeout(Some(patience))?;
    let port = c.local_addr()?.port();
    let mut r = BufReader::new(c.try_clone()?);
    let mut greeting = String::new();
    let greeted = match r.read_line(&mut greeting) {
        Ok(n) if n > 0 => Some(Instant::now()),
        _ => None,
    };
    if greeted.is_some() {
        let mut w = c;
        let _ = w.write_all(b"EHLO client.example\r\nQUIT\r\n");
        let mut l = String::new();
        let _ = r.read_line(&mut l);
    }
    Ok(Held {
        port,
        connecting,
        connected,
        greeted,
        greeting,
    })
}

/// A TcpExt counter of the server namespace (/proc/net/netstat).
fn tcp_ext(lab: &Lab, name: &'static str) -> u64 {
    lab.server_counter("netstat", "TcpExt", name)
}

fn sysctl(lab: &Lab, server: bool, key: &'static str, value: &'static str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let f = move || -> anyhow::Result<()> { Ok(std::fs::write(&path, value)?) };
    let h = if server {
        lab.in_server(f)
    } else {
        lab.in_client(f)
    };
    join(h).unwrap().unwrap();
}

/// Every client greeted, none accepted before `wait`, each greeting within
/// `wait` … `wait + margin` of its handshake. The handshake ends between the
/// client's connect() call and its return: "never early" is checked against the
/// call, lateness against the return (a busy machine may run the client late).
fn assert_on_time(resp: &Responder, got: &[Held], wait: Duration, margin: Duration) -> Vec<f64> {
    let mut late = Vec::new();
    for h in got {
        let greeted = h
            .greeted
            .unwrap_or_else(|| panic!("client {} never greeted", h.port));
        assert!(h.greeting.starts_with("220 "), "{:?}", h.greeting);
        let s = resp.session(h.port).expect("accepted");
        assert!(
            s.accepted_at >= h.connecting + wait,
            "client {} accepted {:?} after it called connect(), before the {wait:?} wait",
            h.port,
            s.accepted_at.saturating_duration_since(h.connecting)
        );
        assert!(
            greeted >= h.connecting + wait,
            "client {} greeted early",
            h.port
        );
        let after = greeted.saturating_duration_since(h.connected);
        assert!(
            after <= wait + margin,
            "client {}: greeting after {after:?} for a {wait:?} wait",
            h.port
        );
        late.push((after.as_secs_f64() - wait.as_secs_f64()) * 1e3);
    }
    late.sort_by(f64::total_cmp);
    late
}

#[test]
fn h01_accept_never_before_wait_and_greeting_on_time() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    for wait in [0.05, 0.5, 1.0, 3.0] {
        let w = wait.to_string();
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", &w]).unwrap();
        let d = Duration::from_secs_f64(wait);
        let got = polite_clients(&lab, 8, true, d + Duration::from_secs(5));
        let late = assert_on_time(&resp, &got, d, MARGIN);
        eprintln!(
            "wait {wait}: lateness min {:.2} median {:.2} max {:.2} ms (8 clients, IPv4 and IPv6)",
            late[0],
            late[late.len() / 2],
            late[late.len() - 1]
        );
        agent.stop().unwrap();
        let stopped = &agent.events("stopped")[0];
        assert_eq!(stopped["held_before_accept"], 8, "{stopped}");
        assert_eq!(stopped["releases"], 8, "{stopped}");
        assert_eq!(stopped["passes"], 8, "{stopped}");
    }
}

#[test]
fn h02_more_held_than_the_backlog_all_greeted_no_overflow() {
    require_root();
    // A fast MTA, then a slow one (2 ms between accepts: 300 take 0.6 s).
    for pause in [Duration::ZERO, Duration::from_millis(2)] {
        let lab = Lab::new().unwrap();
        let resp = Responder::start_with(
            &lab,
            Listen {
                backlog: 100,
                accept_pause: pause,
                ..Listen::new(PORT)
            },
        )
        .unwrap();
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", "2"]).unwrap();
        let (over0, cookies0) = (
            tcp_ext(&lab, "ListenOverflows"),
            tcp_ext(&lab, "SyncookiesSent"),
        );
        let got = polite_clients(&lab, 300, false, Duration::from_secs(20));
        // Paced releases: the slow MTA's clients wait their turn, bounded.
        let late = assert_on_time(&resp, &got, Duration::from_secs(2), Duration::from_secs(5));
        let (over, cookies) = (
            tcp_ext(&lab, "ListenOverflows") - over0,
            tcp_ext(&lab, "SyncookiesSent") - cookies0,
        );
        eprintln!(
            "300 held on listen(100), accept pause {pause:?}: {cookies} SYN cookies, {over} listen overflows, lateness median {:.1} max {:.1} ms",
            late[150], late[299]
        );
        assert_eq!(over, 0, "the accept queue overflowed");
        assert!(cookies > 0, "the backlog never overflowed into SYN cookies");
        agent.stop().unwrap();
        let stopped = &agent.events("stopped")[0];
        assert_eq!(stopped["held_before_accept"], 300, "{stopped}");
        assert_eq!(stopped["releases_abandoned"], 0, "{stopped}");
    }
}

#[test]
fn h03_denied_bot_is_never_accepted_logged_one_is_let_in() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "deny", "-w", "1"])
        .start()
        .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let resets0 = tcp_ext(&lab, "EmbryonicRsts");
    for _ in 0..3 {
        let run = lab.bot(server, b"EHLO bot\r\n", false);
        assert!(
            run.received.starts_with(reply_line("deny").as_bytes()),
            "{:?}",
            String::from_utf8_lossy(&run.received)
        );
        assert!(
            run.elapsed < Duration::from_millis(500),
            "{:?}",
            run.elapsed
        );
        thread::sleep(Duration::from_millis(100));
        assert!(
            resp.session(run.local_port).is_none(),
            "the MTA accepted a denied bot"
        );
    }
    // Each request socket was reset, not left to time out.
    assert_eq!(tcp_ext(&lab, "EmbryonicRsts") - resets0, 3);
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert_eq!(stopped["action_deny"], 3, "{stopped}");
    assert_eq!(stopped["teardown_failures"], 0, "{stopped}");
    assert_eq!(stopped["releases"], 0, "{stopped}");

    // Logged: the bytes complete the handshake at once and reach the MTA, which
    // reads them before it greets, as without earlytalker.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "1"]).unwrap();
    let data = b"EHLO bot\r\nMAIL FROM:<a@b.example>\r\n".to_vec();
    let t0 = Instant::now();
    let seen = lab.client(server, Manner::Bot(data.clone()));
    let s = resp
        .wait_closed(seen.local_port, Duration::from_secs(5))
        .unwrap();
    assert!(s.received.starts_with(&data), "bytes altered");
    assert!(s.accepted_at - t0 < Duration::from_millis(500));
    let v = agent
        .verdict_for(seen.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
}

#[test]
fn h04_released_sockets_are_as_healthy_as_unheld_ones() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    // The baseline: no agent.
    let base = polite_clients(&lab, 1, false, Duration::from_secs(5));
    let unheld = resp
        .wait_closed(base[0].port, Duration::from_secs(5))
        .unwrap();
    let unheld = unheld.info.expect("tcp_info");
    // Request sockets (a 0.5 s hold: no SYN-ACK retransmitted yet; 5 s: two),
    // then a SYN cookie (tcp_syncookies = 2).
    for (cookies, wait) in [("1", 0.5), ("1", 5.0), ("2", 5.0)] {
        sysctl(&lab, true, "net.ipv4.tcp_syncookies", cookies);
        let w = wait.to_string();
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", &w]).unwrap();
        let d = Duration::from_secs_f64(wait);
        let got = polite_clients(&lab, 1, false, d + Duration::from_secs(5));
        assert_on_time(&resp, &got, d, MARGIN);
        let s = resp
            .wait_closed(got[0].port, Duration::from_secs(5))
            .unwrap();
        let held = s.info.expect("tcp_info");
        eprintln!("tcp_syncookies={cookies}, {wait} s hold: unheld {unheld:?}, released {held:?}");
        // No RTT sample from the hold: RTO as for an unheld connection.
        assert!(
            held.rto_us < 1_000_000,
            "RTO {} µs after a {wait} s hold",
            held.rto_us
        );
        assert_eq!(held.options, unheld.options, "TCP options lost");
        assert_eq!(held.wscale, unheld.wscale, "window scaling lost");
        // After two retransmitted SYN-ACKs the kernel restarts the congestion
        // window at 1 (RFC 5681), as for any client whose SYN-ACK was lost
        // twice; before that, and for a cookie, it is the initial window.
        if wait < 3.0 || cookies == "2" {
            assert!(held.snd_cwnd >= unheld.snd_cwnd, "cwnd reduced");
        }
        agent.stop().unwrap();
        assert_eq!(agent.events("stopped")[0]["releases"], 1);
    }
}

#[test]
fn h05_a_thirty_second_hold() {
    let (lab, resp, mut agent) = Rig::builder(&["-a", "log", "-w", "30"])
        .start()
        .into_parts();
    let wait = Duration::from_secs(30);
    let got = polite_clients(&lab, 2, true, wait + Duration::from_secs(5));
    let late = assert_on_time(&resp, &got, wait, MARGIN);
    eprintln!("30 s hold: lateness {late:?} ms");
    agent.stop().unwrap();
    assert_eq!(agent.events("stopped")[0]["release_retries"], 0);
}

#[test]
fn h06_agent_end_releases_held_clients() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let patience = Duration::from_secs(10);
    // SIGTERM 1 s into a 3 s hold: everyone greeted at once.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "3"]).unwrap();
    let (got, sent) = thread::scope(|sc| {
        let h = sc.spawn(|| polite_clients(&lab, 4, true, patience));
        thread::sleep(Duration::from_secs(1));
        let sent = Instant::now();
        agent.signal(nix::sys::signal::Signal::SIGTERM);
        (h.join().unwrap(), sent)
    });
    let _ = agent.stop();
    for h in &got {
        let g = h.greeted.expect("greeted after SIGTERM");
        assert!(
            g < sent + Duration::from_millis(500),
            "greeted {:?} after SIGTERM",
            g - sent
        );
        assert!(resp.session(h.port).is_some());
    }
    assert_eq!(lab.tcx_programs().unwrap(), 0);

    // SIGKILL 1.5 s into a 3 s hold: the programs vanish with the agent and each
    // client's answer to the server's next SYN-ACK (3 s after its SYN)
    // completes the handshake.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "3"]).unwrap();
    let got = thread::scope(|sc| {
        let h = sc.spawn(|| polite_clients(&lab, 4, true, patience));
        thread::sleep(Duration::from_millis(1500));
        agent.kill().unwrap();
        h.join().unwrap()
    });
    for h in &got {
        let after = h.greeted.expect("greeted after SIGKILL") - h.connecting;
        eprintln!("after SIGKILL: greeted {after:?} after the handshake");
        assert!(
            after > Duration::from_millis(1500) && after < Duration::from_millis(3500),
            "greeted {after:?} after the handshake"
        );
    }
}

/// smtpd processes of a private Postfix instance.
fn smtpd_count(postfix: &Postfix) -> usize {
    let Ok(pid) = std::fs::read_to_string(postfix.dir.join("queue/pid/master.pid")) else {
        return 0;
    };
    let Ok(master) = pid.trim().parse::<u32>() else {
        return 0;
    };
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            head.ends_with("(smtpd")
                && rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
                    == Some(master)
        })
        .count()
}

#[test]
fn h07_postfix_starts_no_smtpd_for_held_clients() {
    require_root();
    let lab = Lab::new().unwrap();
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "3"]).unwrap();
    let postfix = Postfix::start(&lab, "", "").unwrap();
    // The start-up probe's smtpd (it lingers, idle) first.
    assert!(eventually(Duration::from_secs(5), || smtpd_count(&postfix) >= 1));
    let before = smtpd_count(&postfix);
    let (got, during) = thread::scope(|sc| {
        let h = sc.spawn(|| polite_clients(&lab, 50, false, Duration::from_secs(20)));
        thread::sleep(Duration::from_millis(2000));
        let during = smtpd_count(&postfix);
        (h.join().unwrap(), during)
    });
    let after = smtpd_count(&postfix);
    eprintln!(
        "smtpd processes: {before} before, {during} while 50 clients were held, {after} after"
    );
    assert_eq!(during, before, "Postfix started smtpd for held clients");
    assert!(after > before, "the clients were never served");
    let mut late = Vec::new();
    for h in &got {
        let g = h.greeted.expect("greeted by Postfix");
        assert!(h.greeting.starts_with("220 "), "{:?}", h.greeting);
        assert!(g >= h.connecting + Duration::from_secs(3), "greeted early");
        let after = g - h.connected;
        late.push((after.as_secs_f64() - 3.0) * 1e3);
    }
    late.sort_by(f64::total_cmp);
    eprintln!(
        "Postfix, 50 held: lateness min {:.1} median {:.1} max {:.1} ms",
        late[0], late[25], late[49]
    );
    agent.stop().unwrap();
    assert_eq!(agent.events("stopped")[0]["releases"], 50);
}

/// A TCP Fast Open client: `data` in its SYN (no cookie needed: the lab's
/// sysctls say so), then everything the server sends until EOF (bounded).
fn tfo_bot(server: SocketAddr, data: &'static [u8]) -> anyhow::Result<(u16, Vec<u8>, Duration)> {
    use std::io::Read;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let t0 = Instant::now();
    // MSG_FASTOPEN: connect and send in the SYN.
    let n = s.send_to_with_flags(data, &server.into(), nix::libc::MSG_FASTOPEN)?;
    anyhow::ensure!(n == data.len(), "short TFO send");
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let port = c.local_addr()?.port();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    Ok((port, got, t0.elapsed()))
}

#[test]
fn h08_tcp_fast_open_data_is_early_talk() {
    require_root();
    let lab = Lab::new().unwrap();
    // Data in the SYN without a cookie: the client sends it, the server takes it.
    sysctl(&lab, false, "net.ipv4.tcp_fastopen", "5");
    sysctl(&lab, true, "net.ipv4.tcp_fastopen", "514");
    let resp = Responder::start_with(
        &lab,
        Listen {
            fastopen: true,
            ..Listen::new(PORT)
        },
    )
    .unwrap();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    // Denied: the SYN is dropped, the client's plain SYN is held, and its data,
    // sent again after the handshake, is refused; the MTA never accepts it.
    let mut agent = Agent::start(&lab, &["-a", "deny", "-w", "3"]).unwrap();
    let (port, got, took) = join(lab.in_client(move || tfo_bot(server, b"EHLO tfo\r\n")))
        .unwrap()
        .unwrap();
    assert!(
        got.starts_with(reply_line("deny").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // One SYN retransmission (1 s), never the 3 s hold.
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(resp.session(port).is_none(), "the MTA accepted a TFO bot");
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert_eq!(stopped["syn_data"], 1, "{stopped}");
    assert_eq!(stopped["action_deny"], 1, "{stopped}");

    // Logged: the server takes the data with the SYN, as without earlytalker.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "3"]).unwrap();
    let (port, got, _) = join(lab.in_client(move || tfo_bot(server, b"EHLO tfo\r\nQUIT\r\n")))
        .unwrap()
        .unwrap();
    assert!(
        got.starts_with(b"220 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let s = resp.wait_closed(port, Duration::from_secs(5)).unwrap();
    assert!(s.received.starts_with(b"EHLO tfo\r\n"));
    let v = agent.verdict_for(port, Duration::from_secs(10)).unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    assert_eq!(v["bytes"], 16, "{v}");
    agent.stop().unwrap();
}

#[test]
fn h09_a_deferring_listener_is_named_and_still_served() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start_with(
        &lab,
        Listen {
            defer_accept: 1,
            ..Listen::new(PORT)
        },
    )
    .unwrap();
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0.5"]).unwrap();
    let err = agent.stderr();
    assert!(
        err.contains("TCP_DEFER_ACCEPT") && err.contains(":25 (pid "),
        "not named: {err}"
    );
    // Served, never before the wait: once the client's answer to a SYN-ACK
    // retransmission after the defer period gets through.
    let got = polite_clients(&lab, 1, false, Duration::from_secs(10));
    let h = &got[0];
    let g = h
        .greeted
        .expect("a client of a deferring listener was never served");
    assert!(g >= h.connecting + Duration::from_millis(500));
    assert!(resp.session(h.port).is_some());
    eprintln!(
        "deferring listener: greeted {:?} after the handshake",
        g - h.connected
    );
    agent.stop().unwrap();
}

/// Drops segments to port 25 arriving on the server namespace's loopback (the
/// agent's releases, and its repeated SYN) while it lives: a release lost.
/// Drops, in the server's namespace, what arrives on `lo` for port 25: the
/// agent's release ACKs (and nothing else: clients come in on the veth).
fn lose_releases(lab: &Lab) -> NftTable {
    lab.nft(
        true,
        "et_lose",
        "table inet et_lose { chain input { type filter hook input priority 0; \
         iifname \"lo\" tcp dport 25 drop; }; }",
    )
}

#[test]
fn h10_a_lost_release_is_sent_again_and_the_worst_case_is_bounded() {
    require_root();
    let lab = Lab::new().unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let wait = Duration::from_millis(500);
    // Lost for the first 150 ms after the deadline: a re-send gets through.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0.5"]).unwrap();
    let got = thread::scope(|sc| {
        let h = sc.spawn(|| polite_clients(&lab, 1, false, Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(300));
        let lose = lose_releases(&lab);
        thread::sleep(Duration::from_millis(350));
        drop(lose);
        h.join().unwrap()
    });
    let h = &got[0];
    let after = h.greeted.expect("greeted") - h.connected;
    eprintln!("release lost for ~150 ms: greeted {after:?} after the handshake");
    assert!(after >= wait + Duration::from_millis(100), "{after:?}");
    assert!(after < wait + Duration::from_millis(700), "{after:?}");
    assert!(resp.session(h.port).is_some());
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert!(
        stopped["release_retries"].as_u64().unwrap() >= 1,
        "{stopped}"
    );
    assert_eq!(stopped["releases_abandoned"], 0, "{stopped}");

    // Every try lost: the release is abandoned, and the client's own answer to
    // the server's next SYN-ACK retransmission (3 s after its SYN) completes the
    // handshake once the release's grace has passed: the worst case.
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0.5"]).unwrap();
    let lose = lose_releases(&lab);
    let got = polite_clients(&lab, 1, false, Duration::from_secs(10));
    drop(lose);
    let h = &got[0];
    let after = h.greeted.expect("greeted in the worst case") - h.connecting;
    eprintln!("every release lost: greeted {after:?} after connect()");
    assert!(
        after > Duration::from_millis(2900) && after < Duration::from_millis(3500),
        "{after:?}"
    );
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert_eq!(stopped["releases_abandoned"], 1, "{stopped}");
}
