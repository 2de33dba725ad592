//! earlytalker in front of each real MTA, unmodified, one at a time in the server
//! namespace: log, deny and denysoft, and defer-reject through the MTA's own
//! hook. Every MTA is a private copy unpacked from Debian's package (none is
//! installed on the host) and relays to an smtp-sink. Needs root.

use earlytalker_tests::*;
use std::{net::SocketAddr, time::Duration};

/// What the matrix needs of an MTA.
trait Mta {
    fn log(&self) -> String;
    fn sink(&self) -> &Sink;
    /// Processes serving a connection, where it forks one per connection (0
    /// when idle); None where long-lived workers serve them (Postfix's smtpd,
    /// OpenSMTPD's one session process).
    fn processes(&self) -> Option<usize>;
}

impl Mta for Exim {
    fn log(&self) -> String {
        Exim::log(self)
    }
    fn sink(&self) -> &Sink {
        self.sink.as_ref().expect("a server")
    }
    fn processes(&self) -> Option<usize> {
        Some(Exim::processes(self))
    }
}

impl Mta for Sendmail {
    fn log(&self) -> String {
        Sendmail::log(self)
    }
    fn sink(&self) -> &Sink {
        &self.sink
    }
    fn processes(&self) -> Option<usize> {
        Some(Sendmail::processes(self))
    }
}

impl Mta for Opensmtpd {
    fn log(&self) -> String {
        Opensmtpd::log(self)
    }
    fn sink(&self) -> &Sink {
        &self.sink
    }
    fn processes(&self) -> Option<usize> {
        None
    }
}

impl Mta for Postfix {
    fn log(&self) -> String {
        Postfix::log(self)
    }
    fn sink(&self) -> &Sink {
        self.sink.as_ref().expect("a server")
    }
    fn processes(&self) -> Option<usize> {
        None
    }
}

const BODY: &str = "a line to arrive byte for byte: \\ \" 'x' \t tab";
const BOT: &[u8] = b"EHLO bot.example\r\nMAIL FROM:<bot@spam.example>\r\n";

fn server(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.server_addr(false), 25)
}

/// A bot's whole transaction, its EHLO sent before the greeting: its port and
/// the MTA's replies.
fn early_transaction(lab: &Lab) -> (u16, Vec<(u16, String)>) {
    let s = server(lab);
    join(lab.in_client(move || smtp_transaction(s, true, "bot@spam.example", "victim@lab.example")))
        .unwrap()
        .unwrap()
}

/// A polite message through swaks, delivered with its body intact.
fn assert_polite_delivered<M: Mta>(lab: &Lab, mta: &M, already: usize) {
    let (ok, transcript) = swaks(lab, "polite@lab.example", &["--body", BODY]);
    assert!(ok, "swaks failed:\n{transcript}\n{}", mta.log());
    // smtp-sink creates each file before it writes it: wait for the content.
    let has_body = |m: &String| {
        m.contains(&format!("\r\n\r\n{BODY}\r\n")) || m.contains(&format!("\n\n{BODY}\n"))
    };
    let arrived = eventually(Duration::from_secs(20), || {
        let d = mta.sink().delivered();
        d.len() == already + 1 && d.iter().any(has_body)
    });
    let d = mta.sink().delivered();
    assert!(
        arrived,
        "delivered {d:?}, body intact expected\n{}",
        mta.log()
    );
}

/// log: the polite message is delivered; an early talker's bytes are logged
/// and it is served as usual.
fn log_mode<M: Mta>(start: impl FnOnce(&Lab) -> M) {
    require_root();
    let lab = Lab::new().unwrap();
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "1"]).unwrap();
    let mta = start(&lab);
    assert_polite_delivered(&lab, &mta, 0);
    let (port, replies) = early_transaction(&lab);
    assert_eq!(replies[0].0, 220, "{replies:?}");
    let v = agent.verdict_for(port, Duration::from_secs(10)).unwrap();
    assert_eq!(v["event"], "early_talker", "{v}");
    assert_eq!(v["bytes"], "EHLO bot.example\r\n".len(), "{v}");
    assert_eq!(v["payload"], "EHLO bot.example\\r\\n", "{v}");
}

/// deny/denysoft: the bot gets our reply and the MTA never accepts it (held
/// before accept, its request socket is reset): no log line, no process or
/// slot; the next polite client is served.
fn deny_mode<M: Mta>(action: &str, start: impl FnOnce(&Lab) -> M) {
    require_root();
    let lab = Lab::new().unwrap();
    let mut agent = Agent::start(&lab, &["-a", action, "-w", "1"]).unwrap();
    let mta = start(&lab);
    // The readiness probe's process, if any, is gone first.
    assert!(
        eventually(Duration::from_secs(5), || mta.processes().unwrap_or(0) == 0),
        "{:?} busy processes before the bot",
        mta.processes()
    );
    let run = lab.bot(server(&lab), BOT, false);
    assert_eq!(String::from_utf8_lossy(&run.received), reply_line(action));
    assert_eq!(run.end, "eof");
    let v = agent
        .verdict_for(run.local_port, Duration::from_secs(10))
        .unwrap();
    assert_eq!(v["action"], action, "{v}");
    // Held before accept: the MTA never even hears of the bot (the client
    // address appears only with the polite client, below).
    std::thread::sleep(Duration::from_millis(1500));
    let log = mta.log();
    assert!(
        !log.contains(CLIENT_V4),
        "the MTA saw the denied bot:\n{log}"
    );
    // Not a byte of the bot's: neither its EHLO name nor its sender.
    assert!(
        !log.contains("bot.example") && !log.contains("spam.example"),
        "{log}"
    );
    assert!(
        eventually(Duration::from_secs(2), || mta.processes().unwrap_or(0) == 0),
        "{:?} busy processes after the bot",
        mta.processes()
    );
    assert_polite_delivered(&lab, &mta, 0);
    agent.stop().unwrap();
    assert!(
        agent.events("teardown_failed").is_empty(),
        "{:?}",
        agent.seen
    );
}

fn exim(lab: &Lab) -> Exim {
    Exim::start(lab, "", "").unwrap()
}

#[test]
fn m01_exim_log() {
    log_mode(exim);
}

#[test]
fn m02_exim_deny() {
    deny_mode("deny", exim);
}

#[test]
fn m03_exim_denysoft() {
    deny_mode("denysoft", exim);
}

fn postfix(lab: &Lab) -> Postfix {
    Postfix::start(lab, "", "").unwrap()
}

#[test]
fn m04_postfix_log() {
    log_mode(postfix);
}

#[test]
fn m05_postfix_deny() {
    deny_mode("deny", postfix);
}

#[test]
fn m06_postfix_denysoft() {
    deny_mode("denysoft", postfix);
}

/// defer-reject through the MTA's own hook: the bot is greeted as usual and
/// refused at MAIL or RCPT with our text (5xx for deny) in the MTA's log; the
/// polite client's mail is delivered, nothing of the bot's.
fn defer_reject_mode<M: Mta>(
    hook_args: impl FnOnce(&Lab) -> Vec<String>,
    start: impl FnOnce(&Lab) -> M,
) {
    require_root();
    let lab = Lab::new().unwrap();
    std::fs::create_dir_all(lab.dir()).unwrap();
    let hook = hook_args(&lab);
    let mut args = vec!["-a", "deny", "--defer-reject", "-w", "1"];
    args.extend(hook.iter().map(String::as_str));
    // The agent first: the MTA's first lookup must find it.
    let mut agent = Agent::start(&lab, &args).unwrap();
    let mta = start(&lab);
    assert_polite_delivered(&lab, &mta, 0);
    let (port, replies) = early_transaction(&lab);
    assert_eq!(replies[0].0, 220, "greeted as usual: {replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last.0 / 100, 5, "{replies:?}\n{}", mta.log());
    assert!(last.1.contains(REPLY_TEXT), "{replies:?}");
    assert!(replies.len() <= 4, "went past RCPT: {replies:?}");
    let v = agent.verdict_for(port, Duration::from_secs(10)).unwrap();
    assert_eq!(v["action"], "defer", "{v}");
    // Refused at RCPT (the recipient is named) or at MAIL (the sender is). The
    // MTA may write its log a moment after replying (Sendmail logs via syslog).
    let refused = |log: &str| {
        log.lines().any(|l| {
            l.contains(REPLY_TEXT)
                && (l.contains("victim@lab.example") || l.contains("bot@spam.example"))
        })
    };
    assert!(
        eventually(Duration::from_secs(3), || refused(&mta.log())),
        "no refusal with our text in the MTA's log:\n{}",
        mta.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mta.sink().delivered().len(), 1, "{}", mta.log());
}

/// The policy service on a unix socket in the lab's directory, handed to the
/// group the lab's MTAs run in (`mail`).
fn policy_socket(lab: &Lab) -> Vec<String> {
    let socket = lab.dir().join("policy.sock").display().to_string();
    ["--policy-socket", &socket, "--socket-group", EXIM_GROUP]
        .map(String::from)
        .to_vec()
}

#[test]
fn m07_exim_defer_reject_through_the_readme_acl() {
    defer_reject_mode(policy_socket, |lab| {
        let acl = exim::readme_acl(&lab.dir().join("policy.sock")).unwrap();
        Exim::start(lab, &acl, "").unwrap()
    });
}

fn sendmail(lab: &Lab) -> Sendmail {
    Sendmail::start(lab, "").unwrap()
}

#[test]
fn m08_sendmail_log() {
    log_mode(sendmail);
}

#[test]
fn m09_sendmail_deny() {
    deny_mode("deny", sendmail);
}

#[test]
fn m10_sendmail_denysoft() {
    deny_mode("denysoft", sendmail);
}

const MILTER: &str = "127.0.0.1:10041";

#[test]
fn m11_sendmail_defer_reject_through_the_milter() {
    defer_reject_mode(
        |_| vec!["--milter-listen".into(), MILTER.into()],
        |lab| {
            let (ip, port) = MILTER.split_once(':').unwrap();
            Sendmail::start(
                lab,
                &format!("INPUT_MAIL_FILTER(`earlytalker', `S=inet:{port}@{ip}, F=T, T=C:5s;S:5s;R:5s;E:10s')dnl"),
            )
            .unwrap()
        },
    );
}

fn opensmtpd(lab: &Lab) -> Opensmtpd {
    Opensmtpd::start(lab, None).unwrap()
}

#[test]
fn m12_opensmtpd_log() {
    log_mode(opensmtpd);
}

#[test]
fn m13_opensmtpd_deny() {
    deny_mode("deny", opensmtpd);
}

#[test]
fn m14_opensmtpd_denysoft() {
    deny_mode("denysoft", opensmtpd);
}

const POLICY: &str = "127.0.0.1:10040";

#[test]
fn m15_opensmtpd_defer_reject_through_the_filter() {
    defer_reject_mode(
        |_| vec!["--policy-listen".into(), POLICY.into()],
        |lab| {
            let cmd = format!(
                "{} opensmtpd-filter --policy-listen {POLICY}",
                agent_bin().display()
            );
            Opensmtpd::start(lab, Some(&cmd)).unwrap()
        },
    );
}
