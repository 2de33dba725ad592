//! Real SMTP clients through earlytalker in deny mode, to a private Postfix:
//! swaks (plain and pipelining), Python's smtplib, curl, msmtp, Postfix's
//! smtp(8) and Exim's smtp transport relaying for a sender. All wait for the
//! greeting: every message is delivered, none is flagged. Needs root.

use earlytalker_tests::*;
use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

/// A client command in the lab's client namespace, with `input` on stdin.
fn run_client(lab: &Lab, argv: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.client_ns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{argv:?}: {e} (cargo xtask test installs the clients)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    // Each client has its own timeout below; this bounds a hung one too.
    let out = wait_output(child, Duration::from_secs(60));
    (
        out.0,
        format!("{argv:?}: {}", String::from_utf8_lossy(&out.1)),
    )
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> (bool, Vec<u8>) {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("client output");
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    (out.status.success(), text)
}

fn message(tag: &str) -> String {
    format!(
        "From: <{tag}@client.example>\r\nTo: <r@lab.example>\r\nSubject: {tag}\r\n\r\nsent by {tag}\r\n"
    )
}

/// Postfix behind the agent in deny mode (1 s hold).
fn server(lab: &Lab) -> (Agent, Postfix) {
    let agent = Agent::start(lab, &["-a", "deny", "-w", "1"]).unwrap();
    (agent, Postfix::start(lab, "", "").unwrap())
}

/// Every tag's message arrived, and the agent flagged no one.
fn assert_all_delivered(
    agent: &mut Agent,
    pf: &Postfix,
    tags: &[&str],
    sender_log: impl Fn() -> String,
) {
    let arrived = eventually(Duration::from_secs(30), || {
        let d = pf.delivered();
        tags.iter()
            .all(|t| d.iter().any(|m| m.contains(&format!("sent by {t}"))))
    });
    assert!(
        arrived,
        "delivered {:?}\nserver:\n{}\nsender:\n{}",
        pf.delivered()
            .iter()
            .filter_map(|m| m.lines().find(|l| l.starts_with("Subject")))
            .collect::<Vec<_>>(),
        pf.log(),
        sender_log()
    );
    agent.stop().unwrap();
    assert!(
        agent.events("early_talker").is_empty(),
        "a real client was flagged: {:?}",
        agent.events("early_talker")
    );
    let passes = agent.events("pass").len();
    assert!(passes >= tags.len(), "{passes} passes for {tags:?}");
}

#[test]
fn c01_swaks_smtplib_curl_msmtp() {
    require_root();
    let lab = Lab::new().unwrap();
    let (mut agent, pf) = server(&lab);
    let s = SERVER_V4;
    let mut results = vec![
        swaks(&lab, "r@lab.example", &["--body", "sent by swaks"]),
        swaks(
            &lab,
            "r@lab.example",
            &["--pipeline", "--body", "sent by swaks-pipeline"],
        ),
    ];
    let py = format!(
        "import smtplib,sys\ns=smtplib.SMTP('{s}',25,timeout=20)\ns.sendmail('smtplib@client.example',['r@lab.example'],sys.stdin.read())\ns.quit()\n"
    );
    results.push(run_client(
        &lab,
        &["python3", "-c", &py],
        &message("smtplib"),
    ));
    let url = format!("smtp://{s}:25");
    results.push(run_client(
        &lab,
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--url",
            &url,
            "--mail-from",
            "curl@client.example",
            "--mail-rcpt",
            "r@lab.example",
            "--upload-file",
            "-",
        ],
        &message("curl"),
    ));
    results.push(run_client(
        &lab,
        &[
            "msmtp",
            "--host",
            s,
            "--port=25",
            "--auth=off",
            "--tls=off",
            "--timeout=20",
            "--from=msmtp@client.example",
            "r@lab.example",
        ],
        &message("msmtp"),
    ));
    for (ok, out) in &results {
        assert!(ok, "{out}");
    }
    assert_all_delivered(
        &mut agent,
        &pf,
        &["swaks", "swaks-pipeline", "smtplib", "curl", "msmtp"],
        String::new,
    );
}

/// A sending MTA on the client's loopback relays what swaks gives it.
fn through_sending_mta<M>(start: impl FnOnce(&Lab) -> M, tag: &str, log: impl Fn(&M) -> String) {
    require_root();
    let lab = Lab::new().unwrap();
    let (mut agent, pf) = server(&lab);
    let sender = start(&lab);
    let body = format!("sent by {tag}");
    let (ok, out) = swaks_via(&lab, "127.0.0.1", "r@lab.example", &["--body", &body]);
    assert!(ok, "{out}\n{}", log(&sender));
    assert_all_delivered(&mut agent, &pf, &[tag], || log(&sender));
}

#[test]
fn c02_postfix_smtp_client_relays() {
    through_sending_mta(
        |lab| Postfix::client(lab).unwrap(),
        "postfix-smtp",
        Postfix::log,
    );
}

#[test]
fn c03_exim_smtp_transport_relays() {
    through_sending_mta(
        |lab| Exim::client(lab, "", "").unwrap(),
        "exim-smtp",
        Exim::log,
    );
}
