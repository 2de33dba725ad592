//! Postfix SMTP access policy delegation (`check_policy_service`): the MTA asks,
//! at MAIL and RCPT, whether this client address:port talked before the greeting.
//! Early talkers get REJECT (deny) or DEFER (denysoft) with qpsmtpd's text;
//! everyone else, and anything malformed, gets DUNNO. Memory per peer is bounded.

use crate::actions::REPLY_TEXT;
use crate::config::Action;
use crate::listen::Service;
use crate::output::{escape, Out};
use crate::store::Store;
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest attribute line accepted (Postfix's longest, e.g. certificate subjects,
/// stay far below).
pub const MAX_LINE: u64 = 4096;
/// Most attributes in one request (Postfix 3.7 sends about 40).
pub const MAX_ATTRS: usize = 256;
/// Postfix closes idle policy connections after 300 s; allow a little more.
const IDLE: Duration = Duration::from_secs(330);
/// A peer that does not read its answer is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to one request, and what to log about it.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub action: String,
    /// An early talker matched: (client, protocol state, what it got).
    pub matched: Option<(SocketAddr, String)>,
    /// Why a request could not be used.
    pub problem: Option<String>,
}

fn dunno(problem: Option<String>) -> Answer {
    Answer {
        action: "DUNNO".into(),
        matched: None,
        problem,
    }
}

/// Decides one request. Pure; the caller locks the store.
pub fn decide(attrs: &HashMap<String, String>, store: &Store, now: Instant) -> Answer {
    match attrs.get("request").map(String::as_str) {
        Some("smtpd_access_policy") => {}
        other => return dunno(Some(format!("not an access policy request ({other:?})"))),
    }
    let state = attrs
        .get("protocol_state")
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    if state != "MAIL" && state != "RCPT" {
        return dunno(None);
    }
    let Some(ip) = attrs
        .get("client_address")
        .and_then(|a| a.parse::<IpAddr>().ok())
    else {
        return dunno(Some("no usable client_address".into()));
    };
    let Some(port) = attrs.get("client_port").and_then(|p| p.parse::<u16>().ok()) else {
        return dunno(Some(
            "no usable client_port (Postfix sends it since 2.5)".into(),
        ));
    };
    let client = SocketAddr::new(ip.to_canonical(), port);
    let Some(e) = store.lookup(&client, now) else {
        return dunno(None);
    };
    let action = match e.action {
        Action::Log => "DUNNO".to_string(),
        Action::Deny => format!("REJECT {REPLY_TEXT}"),
        Action::Denysoft => format!("DEFER {REPLY_TEXT}"),
    };
    Answer {
        action,
        matched: Some((client, state)),
        problem: None,
    }
}

/// Reads one request: attribute lines up to an empty line. Ok(None) at a clean EOF
/// between requests; Err for anything the peer must be dropped for.
async fn read_request<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> Result<Option<HashMap<String, String>>, String> {
    let mut attrs = HashMap::new();
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let n = tokio::time::timeout(IDLE, (&mut *r).take(MAX_LINE).read_until(b'\n', &mut line))
            .await
            .map_err(|_| "idle timeout".to_string())?
            .map_err(|e| format!("read error: {e}"))?;
        if n == 0 {
            return if attrs.is_empty() {
                Ok(None)
            } else {
                Err("connection closed in the middle of a request".into())
            };
        }
        if line.last() != Some(&b'\n') {
            return Err(format!("attribute line longer than {MAX_LINE} bytes"));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            return Ok(Some(attrs));
        }
        if attrs.len() >= MAX_ATTRS {
            return Err(format!("more than {MAX_ATTRS} attributes"));
        }
        let text = String::from_utf8_lossy(&line);
        match text.split_once('=') {
            Some((k, v)) => {
                attrs.insert(k.to_string(), v.to_string());
            }
            None => {
                // Unusable, but the request may still complete: answer DUNNO then.
                attrs.insert("\0malformed".into(), escape(&line));
            }
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: String,
    store: Arc<Mutex<Store>>,
    out: Out,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(MAX_LINE as usize, rd);
    loop {
        let attrs = match read_request(&mut rd).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(why) => {
                log::warn!("policy client {peer}: {why}; answering DUNNO and closing");
                let _ =
                    tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(b"action=DUNNO\n\n")).await;
                return;
            }
        };
        let answer = if let Some(bad) = attrs.get("\0malformed") {
            dunno(Some(format!("malformed attribute line \"{bad}\"")))
        } else {
            let store = store.lock().expect("store lock");
            decide(&attrs, &store, Instant::now())
        };
        if let Some(p) = &answer.problem {
            log::warn!("policy client {peer}: {p}; answering DUNNO");
        }
        if let Some((client, state)) = &answer.matched {
            out.policy(
                *client,
                state,
                attrs.get("sender").map(String::as_str).unwrap_or(""),
                attrs.get("recipient").map(String::as_str).unwrap_or(""),
                &answer.action,
            );
        }
        let reply = format!("action={}\n\n", answer.action);
        match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(reply.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => {
                log::warn!("policy client {peer}: does not take its answer; closing");
                return;
            }
        }
    }
}

/// The policy service: one connection, many requests (see `serve`).
#[derive(Clone)]
pub struct Policy {
    pub store: Arc<Mutex<Store>>,
    pub out: Out,
}

impl Service for Policy {
    fn serve<S>(&self, stream: S, peer: String) -> impl Future<Output = ()> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        serve(stream, peer, self.store.clone(), self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base(state: &str, port: &str) -> HashMap<String, String> {
        req(&[
            ("request", "smtpd_access_policy"),
            ("protocol_state", state),
            ("client_address", "10.0.0.2"),
            ("client_port", port),
        ])
    }

    #[test]
    fn early_talkers_are_refused_at_mail_and_rcpt() {
        let now = Instant::now();
        let mut s = Store::new(10, crate::config::CLOSE_GRACE);
        let c: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        s.insert(
            c,
            "10.0.0.1:25".parse().unwrap(),
            Action::Deny,
            true,
            10,
            now,
        );
        let a = decide(&base("RCPT", "40000"), &s, now);
        assert_eq!(a.action, format!("REJECT {REPLY_TEXT}"));
        assert_eq!(a.matched, Some((c, "RCPT".into())));
        assert_eq!(decide(&base("MAIL", "40000"), &s, now).action, a.action);
        // Other ports, other states: DUNNO.
        assert_eq!(decide(&base("RCPT", "40001"), &s, now).action, "DUNNO");
        assert_eq!(decide(&base("CONNECT", "40000"), &s, now).action, "DUNNO");
        s.insert(
            c,
            "10.0.0.1:25".parse().unwrap(),
            Action::Denysoft,
            true,
            10,
            now,
        );
        assert_eq!(
            decide(&base("RCPT", "40000"), &s, now).action,
            format!("DEFER {REPLY_TEXT}")
        );
        s.insert(
            c,
            "10.0.0.1:25".parse().unwrap(),
            Action::Log,
            false,
            10,
            now,
        );
        let a = decide(&base("RCPT", "40000"), &s, now);
        assert_eq!(a.action, "DUNNO");
        assert!(a.matched.is_some(), "log mode still logs the lookup");
    }

    #[test]
    fn unusable_requests_get_dunno_with_a_reason() {
        let s = Store::new(1, crate::config::CLOSE_GRACE);
        let now = Instant::now();
        for r in [
            req(&[("request", "junk")]),
            req(&[
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("client_address", "10.0.0.2"),
            ]),
            base("RCPT", "notaport"),
            req(&[
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("client_address", "x"),
                ("client_port", "1"),
            ]),
        ] {
            let a = decide(&r, &s, now);
            assert_eq!(a.action, "DUNNO");
            assert!(a.problem.is_some(), "{r:?}");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_match() {
        let now = Instant::now();
        let mut s = Store::new(10, crate::config::CLOSE_GRACE);
        s.insert(
            "10.0.0.2:5".parse().unwrap(),
            "10.0.0.1:25".parse().unwrap(),
            Action::Deny,
            true,
            1,
            now,
        );
        let mut r = base("RCPT", "5");
        r.insert("client_address".into(), "::ffff:10.0.0.2".into());
        assert!(decide(&r, &s, now).action.starts_with("REJECT"));
    }

    #[tokio::test]
    async fn reader_bounds_lines_and_survives_garbage() {
        let input = b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n".to_vec();
        let mut r = BufReader::new(&input[..]);
        let a = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(a["protocol_state"], "RCPT");
        assert!(read_request(&mut r).await.unwrap().is_none());

        let long = vec![b'a'; MAX_LINE as usize + 10];
        let mut r = BufReader::new(&long[..]);
        assert!(read_request(&mut r)
            .await
            .unwrap_err()
            .contains("longer than"));

        let half = b"request=smtpd_access_policy\nprotocol".to_vec();
        let mut r = BufReader::new(&half[..]);
        assert!(read_request(&mut r).await.is_err());

        let bad = b"no equals sign\n\n".to_vec();
        let mut r = BufReader::new(&bad[..]);
        assert!(read_request(&mut r)
            .await
            .unwrap()
            .unwrap()
            .contains_key("\0malformed"));
    }
}
