//! Verdict lines on stdout: text for people (postscreen-like), JSON for machines.
//! Each line is written and flushed at once so `tail -f` shows it immediately.

use crate::config::{secs, LogFormat, Settings};
use crate::events::{End, Kind, Verdict};
use crate::journal::{self, Prio};
use crate::loader::Features;
use serde_json::{json, Value};
use std::{fmt::Write as _, io::Write, net::SocketAddr, time::SystemTime};

/// Escapes client bytes so that nothing but printable ASCII reaches a terminal or
/// a log collector: `\r`, `\n`, `\t`, `\\`, `\"` and `\xNN` for everything else.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// postscreen writes `[addr]:port` for both families.
struct Bracketed<'a>(&'a SocketAddr);

impl std::fmt::Display for Bracketed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]:{}", self.0.ip(), self.0.port())
    }
}

/// Milliseconds shown as seconds with three decimals.
struct Secs(f64);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Integer arithmetic: float formatting showed in the agent's profile of
        // one line per connection.
        let ms = self.0.max(0.0).round() as u64;
        write!(f, "{}.{:03}", ms / 1000, ms % 1000)
    }
}

#[cfg(test)]
pub fn text(v: &Verdict) -> String {
    let mut s = String::new();
    write_text(&mut s, v);
    s
}

/// Appends a verdict's text line (without newline). Written in place: one line per
/// connection is the agent's hottest path, so no intermediate strings.
pub fn write_text(line: &mut String, v: &Verdict) {
    let from = Bracketed(&v.client);
    let to = Bracketed(&v.server);
    // Writing to a String cannot fail.
    let _ = match v.kind {
        Kind::EarlyTalker => {
            let _ = write!(
                line,
                "PREGREET {} after {} from {from} to {to} action={}",
                v.bytes,
                Secs(v.after_ms.unwrap_or(0.0)),
                v.action
            );
            match v.greeting_after_ms {
                Some(g) => {
                    let _ = write!(line, " greeting after {}", Secs(g));
                }
                // Denied: the reply replaced the greeting; nothing more to say.
                None if v.end == End::Denied => {}
                None => {
                    let _ = write!(line, " ended by {}", v.end.as_str());
                }
            }
            write!(line, ": {}", escape(&v.payload))
        }
        Kind::Pipeconnect => write!(
            line,
            "PIPECONNECT {} after {} from {from} to {to} greeting after {}: {}",
            v.bytes,
            Secs(v.after_ms.unwrap_or(0.0)),
            Secs(v.greeting_after_ms.unwrap_or(0.0)),
            escape(&v.payload)
        ),
        Kind::Pass => write!(
            line,
            "PASS greeting after {} from {from} to {to}",
            Secs(v.greeting_after_ms.unwrap_or(0.0))
        ),
        Kind::Hangup if v.end == End::BadProxyHeader => write!(
            line,
            "BADPROXY from {from} to {to}: no PROXY header came first; dropped, as the MTA would"
        ),
        Kind::Hangup => write!(
            line,
            "HANGUP before greeting from {from} to {to} ({})",
            v.end.as_str()
        ),
    };
}

pub fn json_value(v: &Verdict) -> Value {
    match v.kind {
        Kind::EarlyTalker => json!({
            "event": "early_talker",
            "client": v.client.to_string(),
            "server": v.server.to_string(),
            "bytes": v.bytes,
            "after_ms": v.after_ms,
            "payload": escape(&v.payload),
            "action": v.action.as_str(),
            "greeting_after_ms": v.greeting_after_ms,
            "end": v.end.as_str(),
        }),
        Kind::Pipeconnect => json!({
            "event": "pipeconnect",
            "client": v.client.to_string(),
            "server": v.server.to_string(),
            "bytes": v.bytes,
            "after_ms": v.after_ms,
            "payload": escape(&v.payload),
            "greeting_after_ms": v.greeting_after_ms,
            "end": v.end.as_str(),
        }),
        Kind::Pass => json!({
            "event": "pass",
            "client": v.client.to_string(),
            "server": v.server.to_string(),
            "greeting_after_ms": v.greeting_after_ms,
        }),
        Kind::Hangup if v.end == End::BadProxyHeader => json!({
            "event": "bad_proxy_header",
            "client": v.client.to_string(),
            "server": v.server.to_string(),
            "error": "no PROXY header came first",
        }),
        Kind::Hangup => json!({
            "event": "hangup",
            "client": v.client.to_string(),
            "server": v.server.to_string(),
            "end": v.end.as_str(),
        }),
    }
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

/// "allowed" or "off", as the start-up and change lines say it.
fn pipeconnect_word(s: &Settings, advertised: Option<bool>) -> &'static str {
    if s.live.pipeconnect_allowed(advertised) {
        "allowed"
    } else {
        "off"
    }
}

fn join_ports(p: &[u16]) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The settings in force, as `status` and the start-up line show them.
pub fn config_json(s: &Settings, advertised: Option<bool>) -> Value {
    json!({
        "interfaces": s.fixed.ifaces,
        "ports": s.live.ports,
        "proxy_protocol": s.live.proxy_ports,
        "wait": s.live.wait.as_secs_f64(),
        "wait_under_stress": s.live.wait_now(true).as_secs_f64(),
        "stress_threshold": s.live.stress_threshold,
        "action": s.live.action.to_string(),
        "defer_reject": s.live.defer_reject,
        "taken": s.live.taken().as_str(),
        "allow": s.live.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pass_ttl": s.live.pass_ttl.as_secs(),
        "pipeconnect": s.live.pipeconnect.map_or("auto", |p| match p {
            crate::config::Pipeconnect::Known => "known",
            crate::config::Pipeconnect::Deny => "deny",
        }),
        "pipeconnect_advertised": advertised,
        "pipeconnect_allowed": s.live.pipeconnect_allowed(advertised),
        "state_dir": s.fixed.state_dir,
        "max_connections": s.fixed.max_connections,
        "event_buffer": s.fixed.event_buffer,
        "policy_socket": s.fixed.policy_socket,
        "policy_listen": s.fixed.policy_listen.map(|a| a.to_string()),
        "milter_socket": s.fixed.milter_socket,
        "milter_listen": s.fixed.milter_listen.map(|a| a.to_string()),
        "metrics_listen": s.fixed.metrics_listen.map(|a| a.to_string()),
        "control_socket": s.fixed.control_socket,
        "config": s.fixed.config,
        "close_grace": s.fixed.close_grace.as_secs_f64(),
        // Masked: the password never leaves the agent.
        "shared_cache": s.fixed.shared_cache.as_ref().map(ToString::to_string),
    })
}

fn timestamp() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(SystemTime::now())
}

/// Lines formatted but not yet written (see `Out::flush`).
static PENDING: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Writes verdict and lifecycle lines to stdout in the configured format.
#[derive(Clone, Copy)]
pub struct Out {
    format: LogFormat,
    /// stdout is the systemd journal: lines carry their priority, not our time.
    journal: bool,
}

impl Out {
    pub fn new(format: LogFormat) -> Self {
        Out {
            format,
            journal: journal::is_journal(1),
        }
    }

    /// Formats a line and writes it out at once (with anything pending).
    fn emit(&self, prio: Prio, text: String, json: Value) {
        self.push(prio, |b| b.push_str(&text), || json);
        self.flush();
    }

    /// Appends a line to the pending batch; only the configured format is built.
    fn push(&self, prio: Prio, text: impl FnOnce(&mut String), json: impl FnOnce() -> Value) {
        let mut b = PENDING.lock().expect("output lock");
        if self.journal {
            b.push_str(prio.prefix());
        }
        match self.format {
            LogFormat::Text => {
                if !self.journal {
                    let _ = write!(b, "{} ", timestamp());
                }
                text(&mut b);
            }
            LogFormat::Json => {
                let mut json = json();
                if let Value::Object(m) = &mut json {
                    m.insert("ts".into(), Value::String(timestamp().to_string()));
                }
                let _ = write!(b, "{json}");
            }
        }
        b.push('\n');
    }

    /// Writes the pending lines with one write. Called after every batch of
    /// kernel records, so lines still appear at once for `tail -f`.
    pub fn flush(&self) {
        let mut b = PENDING.lock().expect("output lock");
        if b.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        // A closed stdout must not kill the guard; diagnostics still go to stderr.
        let _ = out.write_all(b.as_bytes()).and_then(|()| out.flush());
        b.clear();
    }

    /// Buffered: the caller flushes after the batch.
    pub fn verdict(&self, v: &Verdict) {
        // An early talker is the notable event; the rest is routine.
        let prio = if v.kind == Kind::EarlyTalker {
            Prio::Notice
        } else {
            Prio::Info
        };
        self.push(prio, |b| write_text(b, v), || json_value(v));
    }

    /// One start-up line: settings in force, kernel features found, limits.
    pub fn started(
        &self,
        s: &Settings,
        f: &Features,
        advertised: Option<bool>,
        xdp_mode: Option<&str>,
    ) {
        let mut text = format!(
            "STARTED interfaces={} ports={} wait={}s action={} allow={} pass_ttl={}s pipeconnect={} (MTA advertises it: {}) kernel={} tcx=yes btf={} sock_destroy={} max_wait={}s (tcp_synack_retries={})",
            s.fixed.ifaces.join(","),
            join_ports(&s.live.ports),
            secs(s.live.wait),
            s.live.taken(),
            s.live.allow.len(),
            s.live.pass_ttl.as_secs(),
            pipeconnect_word(s, advertised),
            yes_no(advertised),
            f.kernel,
            if f.btf { "yes" } else { "no" },
            if s.live.enforce() { "yes" } else { "unused" },
            secs(f.max_wait),
            f.tcp_synack_retries,
        );
        let mut json = config_json(s, advertised);
        if let (Some(p), Some(mode)) = (s.fixed.penalty, xdp_mode) {
            let _ = write!(
                text,
                " penalty={}/{}s:{}s ({:?}) xdp={mode}",
                p.n,
                p.window.as_secs(),
                p.ttl.as_secs(),
                s.fixed.penalty_action
            );
            json["penalty"] = json!({"n": p.n, "window": p.window.as_secs(), "ttl": p.ttl.as_secs(),
                "action": s.fixed.penalty_action, "xdp_mode": mode});
        }
        if !s.live.proxy_ports.is_empty() {
            let _ = write!(text, " proxy_protocol={}", join_ports(&s.live.proxy_ports));
        }
        if let Some(u) = &s.fixed.shared_cache {
            let _ = write!(text, " shared_cache={u}");
            json["shared_cache"] = u.to_string().into();
        }
        json["event"] = "started".into();
        json["version"] = env!("CARGO_PKG_VERSION").into();
        json["kernel"] = f.kernel.clone().into();
        json["features"] = json!({
            "tcx": true,
            "btf": f.btf,
            "sock_destroy": if s.live.enforce() { Value::Bool(true) } else { Value::Null },
        });
        json["max_wait"] = f.max_wait.as_secs_f64().into();
        json["tcp_synack_retries"] = f.tcp_synack_retries.into();
        self.emit(Prio::Info, text, json);
    }

    /// A SIGHUP reload: applied (naming the restart-only settings it could not
    /// change), or refused with the reason.
    pub fn reloaded(
        &self,
        s: &Settings,
        advertised: Option<bool>,
        ignored: &[String],
        refused: Option<&str>,
    ) {
        let (mut text, mut json) = match refused {
            None => (
                format!(
                    "RELOADED wait={}s action={} allow={} pass_ttl={}s ports={}",
                    secs(s.live.wait),
                    s.live.taken(),
                    s.live.allow.len(),
                    s.live.pass_ttl.as_secs(),
                    join_ports(&s.live.ports)
                ),
                config_json(s, advertised),
            ),
            Some(why) => (format!("RELOAD-REFUSED {why}"), json!({"error": why})),
        };
        if refused.is_none() && !ignored.is_empty() {
            let _ = write!(text, " restart-needed={}", ignored.join(","));
            json["restart_needed"] = json!(ignored);
        }
        json["event"] = if refused.is_none() {
            "reloaded"
        } else {
            "reload_refused"
        }
        .into();
        self.emit(
            if refused.is_some() {
                Prio::Warning
            } else {
                Prio::Info
            },
            text,
            json,
        );
    }

    /// The MTA's PIPECONNECT offer changed (or became known), and with it
    /// whether early EHLOs from clients that passed are let through.
    pub fn pipeconnect(&self, s: &Settings, advertised: Option<bool>) {
        let text = format!(
            "PIPECONNECT-CHANGED MTA advertises it: {}; pipeconnect={}",
            yes_no(advertised),
            pipeconnect_word(s, advertised)
        );
        let json = json!({
            "event": "pipeconnect_changed",
            "pipeconnect_advertised": advertised,
            "pipeconnect_allowed": s.live.pipeconnect_allowed(advertised),
        });
        self.emit(Prio::Info, text, json);
    }

    /// A policy lookup that matched an early talker.
    pub fn policy(
        &self,
        client: SocketAddr,
        state: &str,
        sender: &str,
        recipient: &str,
        answer: &str,
    ) {
        let text = format!(
            "POLICY {state} from {} sender=<{}> recipient=<{}>: {answer}",
            Bracketed(&client),
            escape(sender.as_bytes()),
            escape(recipient.as_bytes())
        );
        let json = json!({
            "event": "policy",
            "client": client.to_string(),
            "state": state,
            "sender": sender,
            "recipient": recipient,
            "answer": answer,
        });
        self.emit(Prio::Info, text, json);
    }

    /// An address entered the penalty box: its SYNs are refused for `ttl`.
    pub fn penalty(&self, addr: std::net::IpAddr, ttl: std::time::Duration) {
        let text = format!(
            "PENALTY [{addr}] refused at XDP for {}s (talked early too often)",
            ttl.as_secs()
        );
        let json = json!({"event": "penalty", "client": addr.to_string(), "ttl": ttl.as_secs()});
        self.emit(Prio::Notice, text, json);
    }

    /// Stress began or ended: the wait new connections now get, and why.
    pub fn stress(&self, on: bool, fill: crate::stress::Fill, wait: std::time::Duration) {
        let word = if on { "STRESS-ON" } else { "STRESS-OFF" };
        let text = format!(
            "{word} tables={:.2} listen_queue={:.2} wait={}s",
            fill.table,
            fill.queue,
            secs(wait)
        );
        let json = json!({"event": "stress", "on": on, "tables": fill.table,
            "listen_queue": fill.queue, "wait": wait.as_secs_f64()});
        self.emit(if on { Prio::Notice } else { Prio::Info }, text, json);
    }

    /// The kernel could not hand over `lost` verdicts (ring buffer full).
    pub fn lost(&self, lost: u64, total: u64) {
        let text = format!(
            "LOST {lost} verdict event(s): the event ring buffer was full ({total} lost since start; see --event-buffer)"
        );
        self.emit(
            Prio::Warning,
            text,
            json!({"event": "events_lost", "lost": lost, "total": total}),
        );
    }

    /// A PROXY protocol port's client sent no readable header: dropped.
    pub fn bad_proxy(&self, client: SocketAddr, server: SocketAddr, why: &str) {
        let text = format!(
            "BADPROXY from {} to {}: {why}; dropped, as the MTA would",
            Bracketed(&client),
            Bracketed(&server)
        );
        let json = json!({
            "event": "bad_proxy_header",
            "client": client.to_string(),
            "server": server.to_string(),
            "error": why,
        });
        self.emit(Prio::Notice, text, json);
    }

    /// One step of an enforcement failed (the others still ran).
    pub fn teardown_failed(&self, client: SocketAddr, server: SocketAddr, step: &str, error: &str) {
        let text = format!(
            "TEARDOWN-FAILED {step} for {} to {}: {error}",
            Bracketed(&client),
            Bracketed(&server)
        );
        let json = json!({
            "event": "teardown_failed",
            "client": client.to_string(),
            "server": server.to_string(),
            "step": step,
            "error": error,
        });
        self.emit(Prio::Warning, text, json);
    }

    pub fn stopped(&self, counters: &[(&'static str, u64)]) {
        let text = format!(
            "STOPPED {}",
            counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut m = serde_json::Map::new();
        m.insert("event".into(), "stopped".into());
        for (k, v) in counters {
            m.insert((*k).into(), (*v).into());
        }
        self.emit(Prio::Info, text, Value::Object(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{tests::conn, tests::key4, verdict};

    #[test]
    fn escape_keeps_terminals_safe() {
        assert_eq!(escape(b"EHLO bot\r\n"), "EHLO bot\\r\\n");
        assert_eq!(escape(b"\x1b[2J\x00\xff\"\\"), "\\x1b[2J\\x00\\xff\\\"\\\\");
        assert!(escape(&(0u8..=255).collect::<Vec<_>>())
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b)));
    }

    #[test]
    fn text_reads_like_postscreen() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let v = verdict(
            &k,
            &conn(b"EHLO bot\r\n"),
            End::Greeting,
            2_231_000_000,
            crate::config::Taken::Log,
        );
        assert_eq!(
            text(&v),
            "PREGREET 10 after 0.004 from [10.0.0.2]:40000 to [10.0.0.1]:25 action=log greeting after 1.231: EHLO bot\\r\\n"
        );
        let v = verdict(
            &k,
            &conn(b""),
            End::Greeting,
            2_231_000_000,
            crate::config::Taken::Log,
        );
        assert_eq!(
            text(&v),
            "PASS greeting after 1.231 from [10.0.0.2]:40000 to [10.0.0.1]:25"
        );
    }

    #[test]
    fn json_has_the_documented_fields() {
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        let v = json_value(&verdict(
            &k,
            &conn(b"EHLO bot\r\n"),
            End::Greeting,
            2_231_000_000,
            crate::config::Taken::Log,
        ));
        assert_eq!(v["event"], "early_talker");
        assert_eq!(v["client"], "10.0.0.2:40000");
        assert_eq!(v["server"], "10.0.0.1:25");
        assert_eq!(v["bytes"], 10);
        assert_eq!(v["after_ms"], 3.5);
        assert_eq!(v["payload"], "EHLO bot\\r\\n");
        assert_eq!(v["action"], "log");
        let p = json_value(&verdict(
            &k,
            &conn(b""),
            End::Greeting,
            2_231_000_000,
            crate::config::Taken::Log,
        ));
        assert_eq!(p["event"], "pass");
        assert_eq!(p["greeting_after_ms"], 1231.0);
    }
}
