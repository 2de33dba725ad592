//! `earlytalker opensmtpd-filter`: defer-reject for OpenSMTPD, which has no
//! policy service or milter but runs filters (smtpd-filters(7), `proc-exec`).
//! smtpd starts this as a child and talks to it line by line on stdin/stdout;
//! it learns each session's client address:port from the link-connect report
//! and, at MAIL FROM and RCPT TO, asks the running agent's policy service the
//! same question Postfix would. Any failure to ask answers "proceed": if the
//! agent is down, mail flows.

use crate::actions::REPLY_TEXT;
use anyhow::{bail, Context, Result};
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

/// How long one policy question may take before the session proceeds.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the agent's policy service listens.
#[derive(Clone, Debug)]
pub enum PolicyAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// One question for the policy service.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    pub state: &'static str,
    pub client: SocketAddr,
    pub sender: String,
    pub recipient: String,
}

/// The protocol's state: which session came from where.
#[derive(Default)]
pub struct Filter {
    sessions: HashMap<String, SocketAddr>,
}

impl Filter {
    /// Handles one line from smtpd; returns the lines to answer. `ask` puts a
    /// question to the policy service and returns its action (`DUNNO`,
    /// `REJECT text`, `DEFER text`), or None if it could not be asked.
    pub fn line(&mut self, line: &str, ask: impl FnOnce(&Query) -> Option<String>) -> Vec<String> {
        let f: Vec<&str> = line.trim_end_matches(['\r', '\n']).split('|').collect();
        match f.as_slice() {
            ["config", "ready"] => [
                "register|report|smtp-in|link-connect",
                "register|report|smtp-in|link-disconnect",
                "register|filter|smtp-in|mail-from",
                "register|filter|smtp-in|rcpt-to",
                "register|ready",
            ]
            .map(String::from)
            .to_vec(),
            ["report", _, _, "smtp-in", "link-connect", session, _rdns, _fcrdns, src, ..] => {
                // A unix-socket or unparsable source is no lab client: not tracked.
                if let Ok(a) = src.parse::<SocketAddr>() {
                    self.sessions.insert((*session).to_string(), a);
                }
                Vec::new()
            }
            ["report", _, _, "smtp-in", "link-disconnect", session, ..] => {
                self.sessions.remove(*session);
                Vec::new()
            }
            ["filter", version, _, "smtp-in", phase @ ("mail-from" | "rcpt-to"), session, token, rest @ ..] =>
            {
                let addr = rest.join("|");
                let decision = self
                    .sessions
                    .get(*session)
                    .and_then(|client| {
                        let (state, sender, recipient) = if *phase == "mail-from" {
                            ("MAIL", addr.clone(), String::new())
                        } else {
                            ("RCPT", String::new(), addr.clone())
                        };
                        ask(&Query {
                            state,
                            client: *client,
                            sender,
                            recipient,
                        })
                    })
                    .map_or_else(|| "proceed".to_string(), |a| decision(&a));
                vec![result(version, session, token, &decision)]
            }
            _ => Vec::new(),
        }
    }
}

/// The filter's decision for a policy action: refused with the code the milter
/// uses (554 5.7.1 deny, 451 4.7.1 denysoft), else proceed.
fn decision(action: &str) -> String {
    if action.starts_with("REJECT") {
        format!("reject|554 5.7.1 {REPLY_TEXT}")
    } else if action.starts_with("DEFER") {
        format!("reject|451 4.7.1 {REPLY_TEXT}")
    } else {
        "proceed".into()
    }
}

/// A filter-result line; protocol versions before 0.5 put the token first.
fn result(version: &str, session: &str, token: &str, decision: &str) -> String {
    let old = version
        .split_once('.')
        .and_then(|(maj, min)| Some((maj.parse::<u32>().ok()?, min.parse::<u32>().ok()?)))
        .is_some_and(|v| v < (0, 5));
    let (a, b) = if old {
        (token, session)
    } else {
        (session, token)
    };
    format!("filter-result|{a}|{b}|{decision}")
}

/// One policy question over the agent's socket, as Postfix asks it.
pub fn ask(to: &PolicyAddr, q: &Query) -> Result<String> {
    let req = format!(
        "request=smtpd_access_policy\nprotocol_state={}\nclient_address={}\nclient_port={}\nsender={}\nrecipient={}\n\n",
        q.state,
        q.client.ip(),
        q.client.port(),
        q.sender.trim_matches(['<', '>']),
        q.recipient.trim_matches(['<', '>'])
    );
    let answer = match to {
        PolicyAddr::Tcp(a) => {
            let s = std::net::TcpStream::connect_timeout(a, ASK_TIMEOUT)?;
            exchange(s.try_clone()?, s, &req)?
        }
        PolicyAddr::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)?;
            s.set_read_timeout(Some(ASK_TIMEOUT))?;
            s.set_write_timeout(Some(ASK_TIMEOUT))?;
            exchange(s.try_clone()?, s, &req)?
        }
    };
    answer
        .trim_end()
        .strip_prefix("action=")
        .map(str::to_string)
        .with_context(|| format!("odd policy answer {answer:?}"))
}

fn exchange(mut w: impl Write, r: impl Read, req: &str) -> Result<String> {
    w.write_all(req.as_bytes())?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line)?;
    if line.is_empty() {
        bail!("the policy service closed without an answer");
    }
    Ok(line)
}

/// Runs the filter on stdin/stdout until smtpd closes stdin.
pub fn run(to: PolicyAddr) -> Result<()> {
    let mut filter = Filter::default();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut warned = false;
    for line in stdin.lock().lines() {
        let line = line.context("reading from smtpd")?;
        let answer = filter.line(&line, |q| match ask(&to, q) {
            Ok(a) => Some(a),
            Err(e) => {
                // stderr goes to smtpd's log; once per outage is enough.
                if !warned {
                    eprintln!("earlytalker opensmtpd-filter: cannot ask the agent ({e:#}); sessions proceed");
                    warned = true;
                }
                None
            }
        });
        for l in answer {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_tracks_sessions_and_answers_by_version() {
        let mut f = Filter::default();
        assert!(f.line("config|smtpd-version|6.8.0", |_| None).is_empty());
        let reg = f.line("config|ready", |_| None);
        assert_eq!(reg.last().map(String::as_str), Some("register|ready"));
        assert!(reg.contains(&"register|filter|smtp-in|rcpt-to".to_string()));
        f.line(
            "report|0.6|1.5|smtp-in|link-connect|aaaa|<unknown>|error|10.99.0.2:40000|10.99.0.1:25",
            |_| None,
        );
        let mut asked = None;
        let out = f.line(
            "filter|0.6|1.6|smtp-in|rcpt-to|aaaa|tok1|<victim@lab.example>",
            |q| {
                asked = Some((q.state, q.client, q.recipient.clone()));
                Some(format!("REJECT {REPLY_TEXT}"))
            },
        );
        assert_eq!(
            asked,
            Some((
                "RCPT",
                "10.99.0.2:40000".parse().unwrap(),
                "<victim@lab.example>".to_string()
            ))
        );
        assert_eq!(
            out,
            vec![format!(
                "filter-result|aaaa|tok1|reject|554 5.7.1 {REPLY_TEXT}"
            )]
        );
        // Protocol 0.4 put the token first; DEFER is a 4xx.
        let out = f.line("filter|0.4|1.7|smtp-in|mail-from|aaaa|tok2|<s@x>", |_| {
            Some("DEFER x".into())
        });
        assert_eq!(
            out,
            vec![format!(
                "filter-result|tok2|aaaa|reject|451 4.7.1 {REPLY_TEXT}"
            )]
        );
        // Unanswered (agent down) or DUNNO: proceed.
        let out = f.line("filter|0.6|1.8|smtp-in|rcpt-to|aaaa|tok3|<a@b>", |_| None);
        assert_eq!(out, vec!["filter-result|aaaa|tok3|proceed".to_string()]);
        // IPv6 sources; a session never reported is not asked about.
        f.line(
            "report|0.6|1.9|smtp-in|link-connect|bbbb|x|pass|[fd00:99::2]:40001|[fd00:99::1]:25",
            |_| None,
        );
        let mut seen = None;
        f.line("filter|0.6|2.0|smtp-in|rcpt-to|bbbb|t|<a@b>", |q| {
            seen = Some(q.client);
            Some("DUNNO".into())
        });
        assert_eq!(seen, Some("[fd00:99::2]:40001".parse().unwrap()));
        let out = f.line("filter|0.6|2.1|smtp-in|rcpt-to|cccc|t|<a@b>", |_| {
            panic!("asked about an unknown session")
        });
        assert_eq!(out, vec!["filter-result|cccc|t|proceed".to_string()]);
        // Disconnected sessions are forgotten.
        f.line("report|0.6|2.2|smtp-in|link-disconnect|aaaa", |_| None);
        let out = f.line("filter|0.6|2.3|smtp-in|rcpt-to|aaaa|t|<a@b>", |_| {
            panic!("asked about a closed session")
        });
        assert_eq!(out, vec!["filter-result|aaaa|t|proceed".to_string()]);
    }
}
