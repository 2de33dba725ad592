//! defer-reject through a real, unmodified Postfix (Debian's package): the policy
//! service and the milter, plus the policy protocol's robustness. Needs root and
//! swaks and a private Postfix copy (`cargo xtask test` installs swaks and
//! unpacks Postfix into target/mta; no MTA is installed on the host).

use earlytalker_tests::*;
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

const POLICY: &str = "127.0.0.1:10040";
const MILTER: &str = "127.0.0.1:10041";

struct Rig {
    lab: Lab,
    agent: Agent,
    postfix: Postfix,
}

fn rig(agent_args: &[&str], restrictions: &str, milters: &str) -> Rig {
    require_root();
    let lab = Lab::new().unwrap();
    // The agent first: Postfix's first policy/milter connection must find it.
    let agent = Agent::start(&lab, agent_args).unwrap();
    let postfix = Postfix::start(&lab, restrictions, milters).unwrap();
    Rig {
        lab,
        agent,
        postfix,
    }
}

fn server(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.server_addr(false), 25)
}

fn transaction(lab: &Lab, early: bool, to: &str) -> (u16, Vec<(u16, String)>) {
    let s = server(lab);
    let to = to.to_string();
    join(lab.in_client(move || smtp_transaction(s, early, "sender@client.example", &to)))
        .unwrap()
        .unwrap()
}

/// The bot was refused at MAIL or RCPT with `class` (5 or 4) and our text.
fn assert_refused(replies: &[(u16, String)], class: u16) {
    let last = replies.last().unwrap();
    assert_eq!(last.0 / 100, class, "replies {replies:?}");
    assert!(last.1.contains(REPLY_TEXT), "{replies:?}");
    assert!(replies.len() <= 4, "went past RCPT: {replies:?}");
}

fn policy_case(action: &str, class: u16) {
    let restrictions = format!("check_policy_service inet:{POLICY},");
    let mut r = rig(
        &[
            "-a",
            action,
            "--defer-reject",
            "-w",
            "1",
            "--policy-listen",
            POLICY,
        ],
        &restrictions,
        "",
    );
    let (ok, transcript) = swaks(&r.lab, "polite@lab.example", &[]);
    assert!(ok, "swaks failed:\n{transcript}\n{}", r.postfix.log());
    let (port, replies) = transaction(&r.lab, true, "victim@lab.example");
    assert_refused(&replies, class);
    // The bot got Postfix's real greeting (defer-reject greets as usual).
    assert_eq!(replies[0].0, 220, "{replies:?}");
    let v = r.agent.verdict_for(port, Duration::from_secs(10)).unwrap();
    assert_eq!(v["action"], "defer");
    // Exactly the polite message is delivered.
    let d = r.postfix.wait_delivered(1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let d2 = r.postfix.delivered();
    assert_eq!(d2.len(), 1, "delivered {d:?}");
    assert!(d2[0].contains("polite@lab.example"));
    // Postfix logged the reject with our text.
    let log = r.postfix.log();
    assert!(
        log.lines()
            .any(|l| l.contains("reject: RCPT") && l.contains(REPLY_TEXT)),
        "no reject in the Postfix log:\n{log}"
    );
}

#[test]
fn p1_policy_deny_rejects_with_5xx() {
    policy_case("deny", 5);
}

#[test]
fn p2_policy_denysoft_defers_with_4xx() {
    policy_case("denysoft", 4);
}

#[test]
fn p3_milter_rejects_at_mail() {
    for (action, class) in [("deny", 5), ("denysoft", 4)] {
        let milters = format!("inet:{MILTER}");
        let mut r = rig(
            &[
                "-a",
                action,
                "--defer-reject",
                "-w",
                "1",
                "--milter-listen",
                MILTER,
            ],
            "",
            &milters,
        );
        let (ok, transcript) = swaks(&r.lab, "polite@lab.example", &[]);
        assert!(ok, "swaks failed:\n{transcript}\n{}", r.postfix.log());
        let (port, replies) = transaction(&r.lab, true, "victim@lab.example");
        assert_refused(&replies, class);
        // The milter answers at MAIL already.
        assert_eq!(replies.len(), 3, "{replies:?}");
        r.agent.verdict_for(port, Duration::from_secs(10)).unwrap();
        assert_eq!(
            r.postfix.wait_delivered(1, Duration::from_secs(20)).len(),
            1
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(r.postfix.delivered().len(), 1);
        let log = r.postfix.log();
        assert!(
            log.contains("milter-reject") && log.contains(REPLY_TEXT),
            "{log}"
        );
    }
}

#[test]
fn p4_action_log_delivers_both_and_logs_the_lookup() {
    let restrictions = format!("check_policy_service inet:{POLICY},");
    let mut r = rig(
        &["-a", "log", "-w", "1", "--policy-listen", POLICY],
        &restrictions,
        "",
    );
    let (ok, transcript) = swaks(&r.lab, "polite@lab.example", &[]);
    assert!(ok, "{transcript}");
    let (port, replies) = transaction(&r.lab, true, "bot-target@lab.example");
    assert_eq!(replies.last().unwrap().0, 250, "{replies:?}");
    let d = r.postfix.wait_delivered(2, Duration::from_secs(20));
    assert_eq!(d.len(), 2, "{}", r.postfix.log());
    let lookup = r
        .agent
        .wait_for(Duration::from_secs(5), |v| {
            v["event"] == "policy"
                && v["client"]
                    .as_str()
                    .is_some_and(|c| c.ends_with(&format!(":{port}")))
        })
        .unwrap();
    assert_eq!(lookup["answer"], "DUNNO");
    assert_eq!(lookup["recipient"], "bot-target@lab.example");
}

/// Raw policy conversation helpers.
fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(bytes).unwrap();
    let mut r = BufReader::new(c);
    let mut l = String::new();
    let _ = r.read_line(&mut l);
    l
}

#[test]
fn p5_policy_protocol_robustness_and_concurrency() {
    require_root();
    let lab = Lab::new().unwrap();
    let sock = format!("/tmp/et-policy-{}.sock", lab.server_ns);
    let mut agent = Agent::start(
        &lab,
        &[
            "-a",
            "deny",
            "--defer-reject",
            "-w",
            "0.5",
            "--policy-listen",
            POLICY,
            "--policy-socket",
            &sock,
        ],
    )
    .unwrap();
    let _resp = Responder::start(&lab, 25, Duration::ZERO).unwrap();
    // One real early talker so that lookups can hit.
    let s = server(&lab);
    let bot = lab.client(s, Manner::Bot(b"EHLO bot\r\n".to_vec()));
    agent
        .verdict_for(bot.local_port, Duration::from_secs(10))
        .unwrap();
    let bport = bot.local_port.to_string();

    let answers = join(lab.in_server(move || {
        let addr: SocketAddr = POLICY.parse().unwrap();
        let mut out = Vec::new();
        let long = format!("request=smtpd_access_policy\nx={}\n\n", "a".repeat(10_000));
        let many: String = (0..300).map(|i| format!("a{i}=b\n")).collect::<String>() + "\n";
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"\x00\x01\x02 hello\n\n".to_vec()),
            ("no client_port", b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=10.99.0.2\n\n".to_vec()),
            ("bad port", format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={CLIENT_V4}\nclient_port=99999\n\n").into_bytes()),
            ("unknown attributes", format!("request=smtpd_access_policy\nprotocol_state=RCPT\nfrobnicate=1\nclient_address={CLIENT_V4}\nclient_port=1\n\n").into_bytes()),
            ("oversized line", long.into_bytes()),
            ("too many attributes", many.into_bytes()),
            ("wrong request", b"request=junk\n\n".to_vec()),
        ];
        for (name, bytes) in cases {
            out.push((name.to_string(), send_raw(addr, &bytes)));
        }
        // Half-written request, then hang up: no answer, no crash.
        {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"request=smtpd_access_policy\nprotocol_st").unwrap();
        }
        // A peer that never reads: many requests, no reads, then gone.
        {
            let mut c = TcpStream::connect(addr).unwrap();
            let req = format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={CLIENT_V4}\nclient_port=1\n\n");
            for _ in 0..2000 {
                if c.write_all(req.as_bytes()).is_err() {
                    break;
                }
            }
        }
        out
    }))
    .unwrap();
    for (name, a) in &answers {
        assert_eq!(a.trim_end(), "action=DUNNO", "{name}: {a:?}");
    }

    // 50 concurrent clients, 20 requests each on one connection, over TCP and
    // the unix socket; the bot's port is refused, everyone else DUNNO.
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let bport = bport.clone();
            let sock = sock.clone();
            lab.in_server(move || -> anyhow::Result<usize> {
                let stream: Box<dyn ReadWrite> = if i % 2 == 0 {
                    Box::new(TcpStream::connect(POLICY)?)
                } else {
                    Box::new(std::os::unix::net::UnixStream::connect(&sock)?)
                };
                let mut r = BufReader::new(stream);
                let mut refused = 0;
                for j in 0..20 {
                    let port = if j % 5 == 0 { bport.clone() } else { format!("{}", 30000 + i * 20 + j) };
                    let req = format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={CLIENT_V4}\nclient_port={port}\nrecipient=r{j}@lab.example\n\n");
                    r.get_mut().write_all(req.as_bytes())?;
                    let mut l = String::new();
                    r.read_line(&mut l)?;
                    let mut blank = String::new();
                    r.read_line(&mut blank)?;
                    anyhow::ensure!(blank == "\n", "answer not terminated: {blank:?}");
                    if j % 5 == 0 {
                        anyhow::ensure!(l.trim_end() == format!("action=REJECT {REPLY_TEXT}"), "{l:?}");
                        refused += 1;
                    } else {
                        anyhow::ensure!(l.trim_end() == "action=DUNNO", "{l:?}");
                    }
                }
                Ok(refused)
            })
        })
        .collect();
    let started = Instant::now();
    let mut refused = 0;
    for h in handles {
        refused += join(h).unwrap().unwrap();
    }
    eprintln!("50 clients x 20 requests in {:?}", started.elapsed());
    assert_eq!(refused, 50 * 4);
    // Mode 0660 on the unix socket, and the agent is still alive and well.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let st = agent.stop().unwrap();
    assert!(st.success(), "agent exit {st:?}: {}", agent.stderr());
    assert!(
        agent.stderr().contains("attribute line longer than"),
        "{}",
        agent.stderr()
    );
}

trait ReadWrite: std::io::Read + Write + Send {}
impl<T: std::io::Read + Write + Send> ReadWrite for T {}
