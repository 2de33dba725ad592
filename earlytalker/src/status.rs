//! What the running agent knows about itself, refreshed by its event loop and
//! read by the control socket (`earlytalker status`) and the metrics endpoint.

use crate::events::Verdict;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::{
    collections::VecDeque,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

/// Most recent verdicts kept for `status`.
pub const RECENT: usize = 20;

#[derive(Default, Debug, Clone)]
pub struct Snapshot {
    /// Kernel and agent counters, by name.
    pub counters: Vec<(&'static str, u64)>,
    /// Early talkers by what was done to them.
    pub by_action: Vec<(&'static str, u64)>,
    pub config: Value,
    /// The last verdicts, rendered only when asked for.
    pub recent: VecDeque<(SystemTime, Verdict)>,
    pub conns: u64,
    pub conns_capacity: u64,
    pub held_now: u64,
    pub passed: u64,
    pub passed_capacity: u64,
    pub allow: u64,
    pub verdict_store: u64,
    pub started_unix: u64,
    /// The kernel's TRACKED filter, as of the last sweep.
    pub filter: crate::tracked::Fill,
    /// Whether the stress wait is in force.
    pub stress: bool,
    /// Addresses in the penalty box now; None when it is off.
    pub penalty_box: Option<u64>,
    /// The fleet's shared cache; None when it is off.
    pub fleet: Option<crate::fleet::Status>,
}

pub type Shared = Arc<Mutex<Snapshot>>;

impl Snapshot {
    pub fn push_recent(&mut self, v: &Verdict) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((SystemTime::now(), v.clone()));
    }

    pub fn to_json(&self) -> Value {
        let counters: serde_json::Map<String, Value> = self
            .counters
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect();
        json!({
            "config": self.config,
            "counters": counters,
            "early_talkers_by_action": self.by_action.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "connections_tracked_now": self.conns,
            "connections_capacity": self.conns_capacity,
            "greetings_held_now": self.held_now,
            "pass_cache_entries": self.passed,
            "pass_cache_capacity": self.passed_capacity,
            "allowlist_entries": self.allow,
            "verdict_store_entries": self.verdict_store,
            "started_unix": self.started_unix,
            "stress": self.stress,
            "penalty_box_entries": self.penalty_box,
            "shared_cache": self.fleet,
            "tracked_filter": {
                "entries": self.filter.entries,
                "counted": self.filter.counted,
                "buckets_in_use": self.filter.in_use,
                "buckets": earlytalker_common::TRACKED_BUCKETS,
            },
            "recent_verdicts": self.recent.iter().map(|(t, v)| {
                let mut j = crate::output::json_value(v);
                j["ts"] = humantime::format_rfc3339_millis(*t).to_string().into();
                j
            }).collect::<Vec<_>>(),
        })
    }
}

/// Serves the control socket: a client writes `status` and reads one JSON object.
pub async fn serve(path: PathBuf, snap: Shared) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::listen::claim_socket(&path)?;
    let l =
        UnixListener::bind(&path).with_context(|| format!("control socket {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Root only: status shows client addresses.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    // A few at a time is plenty for root's status queries.
    let peers = crate::listen::Peers::new(16);
    crate::listen::spawn_accept_loop("control", l, peers, move |s: tokio::net::UnixStream, _| {
        let snap = snap.clone();
        async move {
            let (rd, mut wr) = s.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd).take(64);
            let read = rd.read_line(&mut line);
            if tokio::time::timeout(Duration::from_secs(2), read)
                .await
                .is_err()
            {
                return;
            }
            let answer = match line.trim() {
                "status" => {
                    let v = snap.lock().expect("snapshot lock").to_json();
                    format!("{v}\n")
                }
                other => format!(
                    "{}\n",
                    json!({"error": format!("unknown request {other:?}")})
                ),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(5), wr.write_all(answer.as_bytes())).await;
        }
    });
    Ok(())
}

/// `earlytalker status`: asks the agent and prints its answer.
pub fn client(path: &Path, json_out: bool) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the agent at {} (is it running? as root?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut buf = String::new();
    s.take(16 << 20).read_to_string(&mut buf)?;
    let v: Value = serde_json::from_str(&buf).context("the agent's answer is not JSON")?;
    if json_out {
        return Ok(format!("{v:#}"));
    }
    Ok(render(&v))
}

/// The human view of a status answer.
pub fn render(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let c = &v["config"];
    let _ = writeln!(
        o,
        "earlytalker on {} port(s) {}: wait {} s, action {}{}",
        c["interfaces"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
        c["ports"]
            .as_array()
            .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        c["wait"],
        c["action"].as_str().unwrap_or("?"),
        if c["defer_reject"] == true {
            " (defer-reject)"
        } else {
            ""
        },
    );
    let _ = writeln!(
        o,
        "allowlist {} entries, pass cache {} of {} (ttl {} s)",
        v["allowlist_entries"], v["pass_cache_entries"], v["pass_cache_capacity"], c["pass_ttl"]
    );
    let _ = writeln!(
        o,
        "connections tracked now {} of {}, greetings held now {}",
        v["connections_tracked_now"], v["connections_capacity"], v["greetings_held_now"]
    );
    let _ = writeln!(o, "\ncounters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            let _ = writeln!(o, "  {k:<28} {n}");
        }
    }
    let _ = writeln!(o, "\nrecent verdicts:");
    if let Some(r) = v["recent_verdicts"].as_array() {
        if r.is_empty() {
            let _ = writeln!(o, "  (none yet)");
        }
        for e in r {
            let _ = writeln!(
                o,
                "  {} {} {} {}",
                e["ts"].as_str().unwrap_or(""),
                e["event"].as_str().unwrap_or(""),
                e["client"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or("")
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_is_bounded_and_rendered() {
        use crate::events::{
            tests::{conn, key4},
            verdict, End,
        };
        let mut s = Snapshot::default();
        for i in 0..30 {
            let k = key4([10, 0, 0, 2], i, [10, 0, 0, 1], 25);
            s.push_recent(&verdict(
                &k,
                &conn(b""),
                End::Greeting,
                2_000_000_000,
                crate::config::Taken::Log,
            ));
        }
        assert_eq!(s.recent.len(), RECENT);
        let j = s.to_json();
        assert_eq!(j["recent_verdicts"][0]["client"], "10.0.0.2:10");
        assert_eq!(j["recent_verdicts"][0]["event"], "pass");
        assert!(j["recent_verdicts"][0]["ts"].is_string());
        s.config = json!({"interfaces": ["eth0"], "ports": [25], "wait": 1.0, "action": "deny", "defer_reject": false, "pass_ttl": 86400});
        s.counters = vec![("early_talkers", 3)];
        let text = render(&s.to_json());
        assert!(
            text.starts_with("earlytalker on eth0 port(s) 25: wait 1.0 s, action deny\n"),
            "{text}"
        );
        assert!(text.contains("early_talkers"));
        assert!(text.contains("10.0.0.2:29"));
    }
}
