//! The kernel's tables over time: the filter in front of them (an exact "not
//! tracked" answer that spares the hash look-ups) stays exact, counts that LRU
//! evictions left too high are repaired, and entries of connections long gone
//! are swept. Real kernel programs, real TCP between namespaces.

use earlytalker_tests::*;
use serde_json::Value;
use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

const PORT: u16 = 25;

/// Polls `status --json` until `done` holds (bounded), and returns it.
fn status_until(lab: &Lab, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + within;
    loop {
        let s = status_json(lab).unwrap();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < end, "not reached within {within:?}: {s:#}");
        thread::sleep(Duration::from_millis(200));
    }
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn filter_exact(s: &Value) -> bool {
    let f = &s["tracked_filter"];
    f["counted"] == f["entries"]
}

#[test]
fn t1_evictions_are_repaired_and_tracking_stays_right() {
    let (lab, resp, mut agent) = Rig::builder(&[
        "-a",
        "log",
        "-w",
        "1",
        "--max-connections",
        "64",
        "--sweep-every",
        "1s",
    ])
    .start()
    .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    // 200 handshakes that never complete against a half-open table of 64: the
    // LRU map evicts, and each eviction leaves its bucket's count one too
    // high. (The server gives up on them soon, and the table is quiet.)
    let lost = never_completing(&lab);
    let clients = join(lab.in_client(move || {
        let hs: Vec<_> = (0..200)
            .map(|_| {
                thread::spawn(move || TcpStream::connect_timeout(&server, Duration::from_secs(5)))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<std::io::Result<Vec<TcpStream>>>()
    }))
    .unwrap()
    .unwrap();
    let s = status_until(&lab, Duration::from_secs(15), |s| {
        filter_exact(s) && counter(s, "filter_counts_repaired") > 0
    });
    eprintln!(
        "after 200 half-open handshakes on a table of 64: {} counts repaired, filter {}",
        counter(&s, "filter_counts_repaired"),
        s["tracked_filter"]
    );
    drop(lost);
    drop(clients);
    // The repaired filter still shows the kernel every tracked connection: a
    // bot is caught and a polite client passes, each on its own verdict.
    let bot = lab.client(server, Manner::Bot(b"EHLO bot\r\n".to_vec()));
    let v = agent
        .verdict_for(bot.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    let polite = lab.client(server, Manner::Polite);
    let v = agent
        .verdict_for(polite.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(v["event"], "pass", "{v}");
    assert!(resp.session(polite.local_port).is_some());
    agent.stop().unwrap();
}

#[test]
fn t2_entries_of_connections_long_gone_are_swept() {
    let (lab, _resp, mut agent) = Rig::builder(&[
        "-a",
        "deny",
        "-w",
        "1",
        "--sweep-every",
        "1s",
        "--stale-after",
        "2s",
    ])
    .start()
    .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    // A denied bot's entry stays, to drop its retransmissions.
    let run = lab.bot(server, b"EHLO bot\r\n", false);
    assert!(
        run.received.starts_with(reply_line("deny").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&run.received)
    );
    // A client whose handshake never completes (its own ACKs are lost): the
    // server's SYN-ACK is remembered and never answered.
    let _lost = never_completing(&lab);
    let r = join(
        lab.in_client(move || TcpStream::connect_timeout(&server, Duration::from_millis(1500))),
    )
    .unwrap();
    // The client counts itself connected; the server never heard its ACK.
    let _client = r.unwrap();
    let s = status_until(&lab, Duration::from_secs(20), |s| {
        counter(s, "stale_entries_swept") >= 2 && s["tracked_filter"]["entries"] == 0
    });
    assert!(filter_exact(&s), "{s:#}");
    assert_eq!(s["tracked_filter"]["buckets_in_use"], 0, "{s:#}");
    agent.stop().unwrap();
}

/// Handshakes that never complete: the client's ACKs to port 25 are dropped in
/// its own namespace while the guard lives, and the server retransmits its
/// SYN-ACK once (set after the agent read the retry budget), then gives up.
fn never_completing(lab: &Lab) -> NftTable {
    let path = "/proc/sys/net/ipv4/tcp_synack_retries";
    join(lab.in_server(move || std::fs::write(path, "1")))
        .unwrap()
        .unwrap();
    lab.nft(
        false,
        "et_acks",
        "table inet et_acks { chain output { type filter hook output priority 0; \
         tcp dport 25 tcp flags & ack == ack drop; }; }",
    )
}

/// One polite client: how long after its connect() returned the greeting came.
fn greeted_after(lab: &Lab, server: SocketAddr) -> Duration {
    let seen = lab.client(server, Manner::Polite);
    assert!(seen.greeting.starts_with("220 "), "{:?}", seen.greeting);
    seen.greeting_after
}

#[test]
fn t3_the_wait_shortens_under_stress_and_comes_back() {
    let (lab, _resp, mut agent) = Rig::builder(&[
        "-a",
        "log",
        "-w",
        "3",
        "--wait-under-stress",
        "0.5",
        "--stress-threshold",
        "0.5",
        "--max-connections",
        "64",
    ])
    .start()
    .into_parts();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    // 40 held at once fill the tables to 40/64, past the threshold.
    let crowd = lab.in_client(move || {
        let hs: Vec<_> = (0..40)
            .map(|_| thread::spawn(move || session(server, &Manner::Polite)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<anyhow::Result<Vec<Seen>>>()
    });
    let on = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "stress")
        .unwrap();
    assert_eq!(on["on"], true, "{on}");
    assert_eq!(on["wait"], 0.5, "{on}");
    // A newcomer now waits the stress wait.
    let stressed = greeted_after(&lab, server);
    eprintln!("under stress: greeted {stressed:?} after connecting (wait 0.5 s)");
    assert!(
        stressed >= Duration::from_millis(450) && stressed < Duration::from_millis(1500),
        "{stressed:?}"
    );
    for s in join(crowd).unwrap().unwrap() {
        assert!(s.greeting.starts_with("220 "), "{:?}", s.greeting);
    }
    // The crowd served, the tables drain: stress ends, logged once.
    let off = agent
        .wait_for(Duration::from_secs(5), |v| {
            v["event"] == "stress" && v["on"] == false
        })
        .unwrap();
    assert_eq!(off["wait"], 3.0, "{off}");
    let calm = greeted_after(&lab, server);
    eprintln!("after: greeted {calm:?} after connecting (wait 3 s)");
    assert!(calm >= Duration::from_millis(2950), "{calm:?}");
    let s = status_json(&lab).unwrap();
    assert_eq!(s["stress"], false, "{s:#}");
    agent.stop().unwrap();
    assert_eq!(agent.events("stress").len(), 2, "one line each way");
}
