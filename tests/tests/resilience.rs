//! Floods and resource bounds: a full event ring buffer, and a SYN flood while
//! real clients keep connecting. Real kernel, real TCP, the real agent. Root.

use earlytalker_tests::*;
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

const PORT: u16 = 25;

#[test]
fn r1_full_ring_buffer_counts_and_logs_losses_and_mail_flows() {
    // 4 KiB holds about 23 records.
    let (lab, _resp, mut agent) = Rig::builder(&["-a", "log", "-w", "0", "--event-buffer", "4096"])
        .start()
        .into_parts();
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let s = SocketAddr::new(lab.server_addr(false), PORT);
    let mut done = 0;
    for _ in 0..8 {
        let hs: Vec<_> = (0..25)
            .map(|_| lab.in_client(move || session(s, &Manner::Polite)))
            .collect();
        for h in hs {
            let seen = join(h)
                .unwrap()
                .expect("mail flows while the agent is stopped");
            assert!(seen.greeting.starts_with("220 "));
            done += 1;
        }
    }
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    let lost = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "events_lost")
        .unwrap();
    assert!(lost["lost"].as_u64().unwrap() > 0, "{lost}");
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    let (passes, lost_total) = (
        stopped["passes"].as_u64().unwrap(),
        stopped["events_lost"].as_u64().unwrap(),
    );
    assert_eq!(passes, done);
    // Every verdict is either logged or counted as lost: none vanish silently.
    assert_eq!(
        agent.events("pass").len() as u64 + lost_total,
        done,
        "{stopped}"
    );
}

/// Sends `count` SYNs to the server from the client's address, from source ports
/// outside the ephemeral range (so they never collide with real clients); none
/// is ever completed. Bounded by count and by `limit`.
fn syn_flood(count: u32, limit: Duration) -> anyhow::Result<u32> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
    let (src, dst) = (
        CLIENT_V4.parse::<Ipv4Addr>()?,
        SERVER_V4.parse::<Ipv4Addr>()?,
    );
    let to = SockAddr::from(SocketAddr::new(dst.into(), 0));
    let end = Instant::now() + limit;
    let mut sent = 0;
    let mut buf = Vec::with_capacity(64);
    while sent < count && Instant::now() < end {
        let port = 1024 + (sent % 30_000) as u16;
        let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .tcp(port, PORT, sent.wrapping_mul(2_654_435_761), 64240)
            .syn();
        buf.clear();
        b.write(&mut buf, &[])?;
        if sock.send_to(&buf, &to).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

#[test]
fn r2_syn_flood_causes_no_false_verdicts_and_maps_stay_bounded() {
    let (lab, resp, mut agent) =
        Rig::builder(&["-a", "deny", "-w", "0.5", "--max-connections", "1024"])
            .start()
            .into_parts();
    let flood = lab.in_client(|| syn_flood(60_000, Duration::from_secs(30)));
    let s = SocketAddr::new(lab.server_addr(false), PORT);
    let (mut polite_ports, mut bot_ports) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let seen = lab.client(s, Manner::Polite);
        assert!(seen.greeting.starts_with("220 lab.example"), "{seen:?}");
        polite_ports.push(seen.local_port);
        let b = join(lab.in_client(move || bot_read_all(s, b"EHLO bot\r\n", false)))
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&b.received), reply_line("deny"));
        bot_ports.push(b.local_port);
    }
    let sent = join(flood).unwrap().unwrap();
    assert!(sent >= 10_000, "flood sent only {sent} SYNs");
    for p in &polite_ports {
        assert_eq!(
            agent.verdict_for(*p, Duration::from_secs(5)).unwrap()["event"],
            "pass"
        );
    }
    for p in &bot_ports {
        assert_eq!(
            agent.verdict_for(*p, Duration::from_secs(5)).unwrap()["event"],
            "early_talker"
        );
        assert!(resp.session(*p).is_none_or(|s| s.received.is_empty()));
    }
    // Bounded agent memory.
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 64 * 1024, "agent RSS {rss_kib} KiB");
    agent.drain_for(Duration::from_millis(500));
    agent.stop().unwrap();
    let st = &agent.events("stopped")[0];
    eprintln!("flood: {sent} SYNs; agent RSS {rss_kib} KiB; {st}");
    // The flood overflowed the half-open table (1024 entries, 60000 SYN-ACKs)
    // and nothing else: exactly the real clients were tracked, and every verdict
    // is one of theirs.
    assert_eq!(st["connections_tracked"], 20, "{st}");
    assert_eq!(st["conn_map_insert_failures"], 0);
    assert!(
        st["handshakes_seen"].as_u64().unwrap() >= 20 + u64::from(sent) / 2,
        "{st}"
    );
    assert_eq!(agent.events("early_talker").len(), 10);
    assert_eq!(agent.events("pass").len(), 10);
    assert!(
        agent.events("hangup").is_empty(),
        "{:?}",
        agent.events("hangup")
    );
}
