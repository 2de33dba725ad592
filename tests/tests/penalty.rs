//! The penalty box at XDP (`--penalty N/WINDOW:TTL`): an address that talked
//! early N times has its next SYNs answered with a RST built in the XDP program
//! (or dropped), so the MTA never sees them; other addresses are untouched; the
//! TTL ends it; the allowlist overrides it. Real XDP on the lab's veth.

use earlytalker_tests::*;
use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

const PORT: u16 = 25;
const OTHER: &str = "10.99.0.3";

/// A connect() from the lab's client namespace (from `from` if given): the
/// connected socket (kept open by the caller: closing it while held is a
/// hang-up) or the error, and how long it took.
fn connect_from(
    lab: &Lab,
    from: Option<IpAddr>,
    server: SocketAddr,
    limit: Duration,
) -> (std::io::Result<socket2::Socket>, Duration) {
    join(lab.in_client(move || {
        let t = Instant::now();
        let s = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(ip) = from {
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        let r = s.connect_timeout(&server.into(), limit).map(|_| s);
        Ok::<_, std::io::Error>((r, t.elapsed()))
    }))
    .unwrap()
    .unwrap()
}

/// A veth delivers XDP_TX frames (the RST) only to a peer that runs NAPI, as
/// a real NIC always does: an empty XDP program on the client's end gives it one.
fn napi_on_client_veth(lab: &Lab) -> aya::Ebpf {
    let dev = lab.client_if.clone();
    join(lab.in_client(move || -> anyhow::Result<aya::Ebpf> {
        let mut ebpf = aya::Ebpf::load(kernel_object())?;
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut("et_xdp_floor")
            .ok_or_else(|| anyhow::anyhow!("et_xdp_floor"))?
            .try_into()?;
        p.load()?;
        p.attach(&dev, aya::programs::xdp::XdpMode::Driver)?;
        Ok(ebpf)
    }))
    .unwrap()
    .unwrap()
}

/// Segments the server namespace's TCP received.
fn tcp_in_segs(lab: &Lab) -> u64 {
    lab.server_counter("snmp", "Tcp", "InSegs")
}

/// A counter from `status`, once it reaches `want` (the snapshot is refreshed
/// every 500 ms; bounded wait); its value then.
fn counter(lab: &Lab, name: &str, want: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let n = status_json(lab).unwrap()["counters"][name]
            .as_u64()
            .unwrap_or(0);
        if n >= want || Instant::now() > end {
            return n;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn x1_a_repeat_early_talker_gets_a_rst_at_its_syn_until_the_ttl_ends() {
    require_root();
    let lab = Lab::new().unwrap();
    lab.add_client_address(OTHER).unwrap();
    let resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    let _peer = napi_on_client_veth(&lab);
    let mut agent =
        Agent::start(&lab, &["-a", "deny", "-w", "0.5", "--penalty", "2/1m:3s"]).unwrap();
    let started = agent.events("started")[0].clone();
    let mode = started["penalty"]["xdp_mode"]
        .as_str()
        .unwrap_or("")
        .to_string();
    eprintln!("penalty box at XDP, {mode} mode");
    assert!(mode == "native" || mode == "generic", "{started}");
    for _ in 0..2 {
        let b = lab.bot(server, b"EHLO bot\r\n", false);
        assert!(b.received.starts_with(reply_line("deny").as_bytes()));
    }
    let p = agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "penalty")
        .unwrap();
    assert_eq!(p["client"], CLIENT_V4, "{p}");
    let boxed_at = Instant::now();
    let (accepted, segs) = (resp.accepted(), tcp_in_segs(&lab));
    // The next SYN is answered at XDP: refused at once, like a closed port,
    // and the server's TCP never sees it.
    let (r, took) = connect_from(&lab, None, server, Duration::from_secs(3));
    assert_eq!(
        tcp_in_segs(&lab),
        segs,
        "the refused SYN reached the server's TCP"
    );
    let e = r.expect_err("the boxed client connected");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(counter(&lab, "penalty_box_refused", 1), 1);
    assert_eq!(
        resp.accepted(),
        accepted,
        "the MTA accepted the boxed client"
    );
    // Another address is untouched: held, then accepted as usual.
    let other: IpAddr = OTHER.parse().unwrap();
    let (r, _) = connect_from(&lab, Some(other), server, Duration::from_secs(3));
    let _open = r.expect("another address is not boxed");
    let end = Instant::now() + Duration::from_secs(3);
    while resp.accepted() == accepted && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        resp.accepted(),
        accepted + 1,
        "the other address was not served"
    );
    // When the TTL is over, the address is served again.
    let end = boxed_at + Duration::from_millis(3200);
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let s = lab.client(server, Manner::Polite);
    assert!(s.greeting.starts_with("220 "), "{:?}", s.greeting);
    assert_eq!(counter(&lab, "penalty_box_refused", 2), 1);
    agent.stop().unwrap();
    let stopped = &agent.events("stopped")[0];
    assert_eq!(stopped["penalties"], 1, "{stopped}");
}

#[test]
fn x2_drop_mode_and_the_allowlist_wins() {
    require_root();
    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, PORT, Duration::ZERO).unwrap();
    let server = SocketAddr::new(lab.server_addr(false), PORT);
    std::fs::create_dir_all(lab.dir()).unwrap();
    let conf = lab.dir().join("earlytalker.toml");
    std::fs::write(&conf, "action = \"deny\"\nwait = 0.5\n").unwrap();
    let mut agent = Agent::start(
        &lab,
        &[
            "-c",
            conf.to_str().unwrap(),
            "--penalty",
            "1/1m:1h",
            "--penalty-action",
            "drop",
        ],
    )
    .unwrap();
    lab.bot(server, b"EHLO bot\r\n", false);
    agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "penalty")
        .unwrap();
    // Dropped: no answer at all, the client's connect() times out.
    let (r, took) = connect_from(&lab, None, server, Duration::from_millis(1500));
    let e = r.expect_err("the boxed client connected");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    assert!(counter(&lab, "penalty_box_refused", 1) >= 1);
    // The operator allowlists it: the box no longer applies.
    std::fs::write(
        &conf,
        format!("action = \"deny\"\nwait = 0.5\nallow = [\"{CLIENT_V4}/32\"]\n"),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "reloaded")
        .unwrap();
    let s = lab.client(server, Manner::Polite);
    assert!(s.greeting.starts_with("220 "), "{:?}", s.greeting);
    assert!(
        s.greeting_after < Duration::from_millis(400),
        "allowlisted: not held"
    );
    agent.stop().unwrap();
}
