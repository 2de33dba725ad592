//! Fleet-shared state (`--shared-cache`): two relays, each an agent guarding
//! its own lab, share one real redis-server (Debian's package). A pass on one
//! is honoured on the other within 1 s; an early talk anywhere costs the pass
//! everywhere and counts towards every relay's penalty box; Redis going away
//! leaves both judging on local state, and they converge when it returns.
//!
//! The two labs' clients have the same address (10.99.0.2), as one client
//! reaching two MX hosts of a fleet does.

use earlytalker_tests::{redis::Redis, *};
use serde_json::Value;
use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

const WAIT: Duration = Duration::from_secs(2);
const WAIT_ARG: &str = "2";
const GREET: Duration = Duration::from_millis(200);

/// A relay: a lab, its responder on port 25, and its agent on the shared cache.
struct Relay {
    agent: Agent,
    _resp: Responder,
    lab: Lab,
}

impl Relay {
    fn start(url: &str, extra: &[&str]) -> Relay {
        let lab = Lab::new().unwrap();
        // Greeting 200 ms after accept: a pass-cached bot's bytes, sent at
        // once, always come first (it is judged), and a known client is still
        // greeted well within a quarter of the wait.
        let resp = Responder::start(&lab, 25, GREET).unwrap();
        let args = [
            &["-a", "deny", "-w", WAIT_ARG, "--pass-ttl", "1h"][..],
            &["--shared-cache", url],
            extra,
        ]
        .concat();
        let agent = Agent::start(&lab, &args).unwrap();
        Relay {
            agent,
            _resp: resp,
            lab,
        }
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::new(self.lab.server_addr(false), 25)
    }

    /// A polite client's session, and whether it was held (greeted no sooner
    /// than the wait after its connect() call) or not (greeted within a
    /// quarter of it).
    fn polite(&self) -> (Seen, bool) {
        let s = self.lab.client(self.server(), Manner::Polite);
        let held = s.since_connect_call >= WAIT;
        assert!(
            held || s.greeting_after < WAIT / 4,
            "neither held nor let through: {s:?}"
        );
        (s, held)
    }

    fn status(&self) -> Value {
        status_json(&self.lab).unwrap()
    }

    fn status_until(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        status_until(&self.lab, limit, pred)
    }
}

/// Waits (bounded) until the lab agent's `status` satisfies `pred`; the last status.
fn status_until(lab: &Lab, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + limit;
    loop {
        let s = status_json(lab).unwrap();
        if pred(&s) || Instant::now() > end {
            return s;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `key` is in Redis within `limit` (polled).
fn key_appears(redis: &Redis, key: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if redis.cli(&["EXISTS", key]).unwrap().trim() == "1" {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn connected(s: &Value) -> bool {
    s["shared_cache"]["state"] == "up"
}

#[test]
fn f1_a_pass_on_one_relay_holds_nowhere_else_and_an_early_talk_anywhere_counts_everywhere() {
    require_root();
    let redis = Redis::on_socket().unwrap();
    let url = redis.url();
    let mut mx1 = Relay::start(&url, &["--penalty", "2/10m:1h", "--penalty-action", "drop"]);
    let mut mx2 = Relay::start(&url, &[]);
    for mx in [&mx1, &mx2] {
        let s = mx.status_until(Duration::from_secs(5), connected);
        assert!(connected(&s), "{}", s["shared_cache"]);
    }

    // Held once on MX1 …
    let (s, held) = mx1.polite();
    assert!(held, "a new client was not held on MX1: {s:?}");
    mx1.agent
        .verdict_for(s.local_port, Duration::from_secs(5))
        .unwrap();
    let passed_at = Instant::now();
    let key = format!("earlytalker:pass:{CLIENT_V4}");
    let ttl: i64 = redis.cli(&["PTTL", &key]).unwrap().trim().parse().unwrap();
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "the pass's expiry in Redis: {ttl} ms"
    );
    // … and 1 s later not held on MX2.
    thread::sleep(Duration::from_secs(1).saturating_sub(passed_at.elapsed()));
    let (s, held) = mx2.polite();
    assert!(
        !held,
        "MX2 held a client that passed on MX1 1 s before: {s:?}"
    );
    let v = mx2
        .agent
        .verdict_for(s.local_port, Duration::from_secs(5))
        .unwrap();
    assert_eq!(v["event"], "pass", "{v}");

    // The same address talks early on MX2: MX2 denies it, and MX1 hears of it.
    let b = mx2.lab.bot(mx2.server(), b"EHLO bot\r\n", false);
    assert!(
        b.received.starts_with(reply_line("deny").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&b.received)
    );
    let s1 = mx1.status_until(Duration::from_secs(5), |s| {
        counter(s, "shared_cache_received") >= 1
    });
    assert!(counter(&s1, "shared_cache_received") >= 1, "{s1}");
    // MX1's status names the early talker MX2 reported, and MX2.
    let talks = s1["shared_cache"]["recent_talks"].as_array().unwrap();
    assert_eq!(talks.len(), 1, "{s1}");
    assert_eq!(talks[0]["addr"], CLIENT_V4, "{s1}");
    assert_eq!(
        talks[0]["relay"],
        mx2.status()["shared_cache"]["relay"],
        "{s1}"
    );
    assert_eq!(
        redis.cli(&["EXISTS", &key]).unwrap().trim(),
        "0",
        "the early talker kept its pass in Redis"
    );
    // It lost its pass on MX1 too: held again there.
    let (s, held) = mx1.polite();
    assert!(
        held,
        "MX1 kept the pass of a client that talked early on MX2: {s:?}"
    );

    // A second early talk on MX2 puts it in MX1's penalty box (2 in 10 min):
    // MX1 drops its SYNs, though it never talked early on MX1.
    let b = mx2.lab.bot(mx2.server(), b"EHLO bot\r\n", false);
    assert!(b.received.starts_with(reply_line("deny").as_bytes()));
    let p = mx1
        .agent
        .wait_for(Duration::from_secs(5), |v| v["event"] == "penalty")
        .unwrap();
    assert_eq!(p["client"], CLIENT_V4, "{p}");
    let server = mx1.server();
    let r = join(mx1.lab.in_client(move || {
        std::net::TcpStream::connect_timeout(&server, Duration::from_millis(1500))
    }))
    .unwrap();
    assert!(r.is_err(), "MX1 let a client boxed by the fleet connect");
    assert!(mx1.agent.events("early_talker").is_empty());

    let s1 = mx1.status();
    assert!(counter(&s1, "shared_cache_published") >= 2, "{s1}");
    assert_eq!(counter(&s1, "shared_cache_outages"), 0, "{s1}");
    assert_eq!(counter(&s1, "shared_cache_ignored"), 0, "{s1}");
}

#[test]
fn f2_redis_down_both_relays_judge_locally_and_converge_when_it_returns() {
    require_root();
    let mut redis = Redis::on_socket().unwrap();
    let url = redis.url();
    let mut mx1 = Relay::start(&url, &[]);
    let mut mx2 = Relay::start(&url, &[]);
    for mx in [&mx1, &mx2] {
        assert!(connected(
            &mx.status_until(Duration::from_secs(5), connected)
        ));
    }
    redis.kill();
    let down = |s: &Value| s["shared_cache"]["state"] == "down";
    for mx in [&mx1, &mx2] {
        // The PING every 5 s (or the dead subscription) notices.
        let s = mx.status_until(Duration::from_secs(10), down);
        assert!(down(&s), "{}", s["shared_cache"]);
    }

    // Both keep judging: a bot denied, a polite client held and let through.
    for mx in [&mut mx1, &mut mx2] {
        let b = mx.lab.bot(mx.server(), b"EHLO bot\r\n", false);
        assert!(b.received.starts_with(reply_line("deny").as_bytes()));
    }
    let (s, held) = mx1.polite();
    assert!(held, "{s:?}");
    assert!(s.greeting.starts_with("220"), "{s:?}");
    // Several reconnection attempts fail meanwhile (backoff 0.25, 0.5, 1, 2 s …).
    thread::sleep(Duration::from_secs(3));

    redis.restart().unwrap();
    let up = |s: &Value| connected(s) && counter(s, "shared_cache_outages") == 1;
    for mx in [&mx1, &mx2] {
        // Backoff is at most 10 s.
        let s = mx.status_until(Duration::from_secs(15), up);
        assert!(up(&s), "{}", s["shared_cache"]);
    }
    // MX1's pass made during the outage reached Redis, and MX2 from it.
    let key = format!("earlytalker:pass:{CLIENT_V4}");
    assert!(key_appears(&redis, &key, Duration::from_secs(3)));
    thread::sleep(Duration::from_secs(1));
    let (s, held) = mx2.polite();
    assert!(
        !held,
        "MX2 did not learn the pass MX1 made while Redis was down: {s:?}"
    );

    for mx in [&mut mx1, &mut mx2] {
        mx.agent.stop().unwrap();
        let err = mx.agent.stderr();
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("shared cache")).collect();
        assert_eq!(
            lines.iter().filter(|l| l.contains(" lost: ")).count(),
            1,
            "one line per outage: {lines:#?}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.contains(" back after ")).count(),
            1,
            "one line per recovery: {lines:#?}"
        );
        // Connected, lost, back: nothing per failed attempt.
        assert_eq!(lines.len(), 3, "{lines:#?}");
    }
}

#[test]
fn f4_a_hung_redis_is_an_outage_and_the_event_loop_never_waits_for_it() {
    require_root();
    let redis = Redis::on_socket().unwrap();
    let mut mx = Relay::start(&redis.url(), &[]);
    assert!(connected(
        &mx.status_until(Duration::from_secs(5), connected)
    ));
    redis.freeze(true);
    // News to publish while it hangs: a pass, and an early talk.
    let (s, held) = mx.polite();
    assert!(held, "{s:?}");
    let b = mx.lab.bot(mx.server(), b"EHLO bot\r\n", false);
    assert!(b.received.starts_with(reply_line("deny").as_bytes()));
    // The verdict line comes from the event loop: it is not stuck behind Redis.
    let t = Instant::now();
    let v = mx
        .agent
        .verdict_for(b.local_port, Duration::from_secs(5))
        .unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A PING every 5 s, answered within 2 s, or it is an outage.
    let down = |s: &Value| s["shared_cache"]["state"] == "down";
    let s = mx.status_until(Duration::from_secs(10), down);
    assert!(down(&s), "{}", s["shared_cache"]);
    redis.freeze(false);
    let s = mx.status_until(Duration::from_secs(15), connected);
    assert!(connected(&s), "{}", s["shared_cache"]);
    assert_eq!(counter(&s, "shared_cache_outages"), 1, "{s}");
}

#[test]
fn f3_password_over_tcp_is_never_shown_and_garbage_is_ignored_with_a_line() {
    require_root();
    const SECRET: &str = "fleet-s3cret";
    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, 25, Duration::ZERO).unwrap();
    let redis = Redis::in_namespace(&lab.server_ns, 6390, SECRET).unwrap();
    let url = redis.url();
    assert!(url.contains(SECRET));
    let mut agent = Agent::start(
        &lab,
        &[
            "-a",
            "deny",
            "-w",
            WAIT_ARG,
            "--pass-ttl",
            "1h",
            "--shared-cache",
            &url,
            "--metrics-listen",
            "127.0.0.1:9465",
        ],
    )
    .unwrap();
    let status = status_until(&lab, Duration::from_secs(5), connected);
    assert!(connected(&status), "{}", status["shared_cache"]);
    assert_eq!(
        status["shared_cache"]["url"], "redis://:****@127.0.0.1:6390/0",
        "{status}"
    );

    // Garbage: a value under a pass key, and a message on the pass channel.
    redis
        .cli(&["SET", "earlytalker:pass:192.0.2.9", "not json"])
        .unwrap();
    redis
        .cli(&["PUBLISH", "earlytalker:pass", "{\"addr\":\"nonsense\"}"])
        .unwrap();
    status_until(&lab, Duration::from_secs(5), |s| {
        counter(s, "shared_cache_ignored") >= 1
    });
    // Still judging: a new client held, then passed and published.
    let server = SocketAddr::new(lab.server_addr(false), 25);
    let s = lab.client(server, Manner::Polite);
    assert!(s.since_connect_call >= WAIT, "{s:?}");
    agent
        .verdict_for(s.local_port, Duration::from_secs(5))
        .unwrap();
    let key = format!("earlytalker:pass:{CLIENT_V4}");
    assert!(key_appears(&redis, &key, Duration::from_secs(3)));

    let metrics = join(lab.in_server(|| {
        let out = std::process::Command::new("curl")
            .args(["-sf", "http://127.0.0.1:9465/metrics"])
            .output()?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
    }))
    .unwrap()
    .unwrap();
    assert!(
        metrics.contains("earlytalker_shared_cache_up 1"),
        "{metrics}"
    );
    let status = status_json(&lab).unwrap();
    assert!(counter(&status, "shared_cache_ignored") >= 1, "{status}");
    agent.stop().unwrap();
    let err = agent.stderr();
    assert!(
        err.contains("ignoring an unreadable value"),
        "no line for the garbage: {err}"
    );
    let out: String = agent.seen.iter().map(|v| v.to_string()).collect();
    for (what, text) in [
        ("stderr", err.as_str()),
        ("stdout", out.as_str()),
        ("status", &status.to_string()),
        ("metrics", metrics.as_str()),
    ] {
        assert!(!text.contains(SECRET), "the password is in {what}: {text}");
    }
}

#[test]
fn f5_over_tls_with_the_ca_the_operator_trusts() {
    require_root();
    let lab = Lab::new().unwrap();
    let _resp = Responder::start(&lab, 25, Duration::ZERO).unwrap();
    let redis = Redis::in_namespace_tls(&lab.server_ns, 6391, "tls-s3cret").unwrap();
    assert!(redis.url().starts_with("rediss://"));
    // rustls reads the system's CA store, which SSL_CERT_FILE replaces.
    let trust = format!("SSL_CERT_FILE={}", redis.ca().display());
    let mut agent = Agent::start_under(
        &lab,
        &["env", &trust],
        &[
            "-w",
            WAIT_ARG,
            "--pass-ttl",
            "1h",
            "--shared-cache",
            &redis.url(),
        ],
    )
    .unwrap();
    let status = status_until(&lab, Duration::from_secs(5), connected);
    assert!(connected(&status), "{}", status["shared_cache"]);
    let server = SocketAddr::new(lab.server_addr(false), 25);
    let s = lab.client(server, Manner::Polite);
    agent
        .verdict_for(s.local_port, Duration::from_secs(5))
        .unwrap();
    let key = format!("earlytalker:pass:{CLIENT_V4}");
    assert!(key_appears(&redis, &key, Duration::from_secs(3)));
    agent.stop().unwrap();

    // Without that CA the certificate is refused: an outage, not a crash.
    let agent = Agent::start(&lab, &["-w", WAIT_ARG, "--shared-cache", &redis.url()]).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !agent.stderr().contains("unreachable") && Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
    }
    let err = agent.stderr();
    assert!(err.contains("unreachable"), "{err}");
    assert!(!err.contains("tls-s3cret"), "{err}");
    let status = status_until(&lab, Duration::from_secs(3), |s| {
        s["shared_cache"]["state"] == "down"
    });
    assert_eq!(status["shared_cache"]["state"], "down", "{status}");
    eprintln!("refused: {}", status["shared_cache"]["last_error"]);
}
