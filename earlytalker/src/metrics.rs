//! Prometheus metrics (`--metrics-listen`), in the standard text exposition
//! format, built from the same snapshot `earlytalker status` shows.

use crate::counts::AGENT_STATS;
use crate::status::{Shared, Snapshot};
use anyhow::{Context, Result};
use earlytalker_common::STATS;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
    },
    registry::Registry,
};
use std::net::SocketAddr;

/// Renders the exposition text for a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("earlytalker");
    // The kernel's and the agent's counters, named by their tables.
    let tables = STATS
        .iter()
        .filter(|i| i.metric)
        .map(|i| (i.name, i.help))
        .chain(
            AGENT_STATS
                .iter()
                .filter(|i| i.metric)
                .map(|i| (i.name, i.help)),
        );
    for (name, help) in tables {
        let v = s
            .counters
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(0, |(_, v)| *v);
        reg.register(name, help, ConstCounter::new(v));
    }
    let early = Family::<Vec<(String, String)>, Counter>::default();
    for (action, n) in &s.by_action {
        early
            .get_or_create(&vec![("action".into(), (*action).into())])
            .inc_by(*n);
    }
    reg.register(
        "early_talkers",
        "Early talkers, by what was done to them",
        early,
    );
    reg.register(
        "greetings_held",
        "Connections held right now, before the MTA could accept them (their greeting not yet sent)",
        ConstGauge::new(s.held_now as i64),
    );
    reg.register(
        "stress",
        "1 while the stress wait is in force (the kernel's tables or the MTA's listen queue filling up)",
        ConstGauge::new(i64::from(s.stress)),
    );
    reg.register(
        "filter_buckets_in_use",
        "Buckets of the kernel's tracked-connection filter in use (the share of watched-port segments that need a hash look-up), as of the last sweep",
        ConstGauge::new(s.filter.in_use as i64),
    );
    if let Some(f) = &s.fleet {
        reg.register(
            "shared_cache_up",
            "1 while the fleet's shared cache (--shared-cache) is reachable",
            ConstGauge::new(i64::from(f.state == "up")),
        );
    }
    let entries = Family::<Vec<(String, String)>, Gauge>::default();
    let capacity = Family::<Vec<(String, String)>, Gauge>::default();
    for (map, n, cap) in [
        ("connections", s.conns, s.conns_capacity),
        ("pass_cache", s.passed, s.passed_capacity),
        (
            "allowlist",
            s.allow,
            u64::from(earlytalker_common::MAX_ALLOW),
        ),
    ] {
        let l = vec![("map".to_string(), map.to_string())];
        entries.get_or_create(&l).set(n as i64);
        capacity.get_or_create(&l).set(cap as i64);
    }
    reg.register("map_entries", "Entries in the kernel maps", entries);
    reg.register("map_capacity", "Capacity of the kernel maps", capacity);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serves GET /metrics on its own thread (blocking I/O, off the event loop).
pub fn serve(addr: SocketAddr, snap: Shared) -> Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("metrics listener {addr}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let body = render(&snap.lock().expect("snapshot lock"));
                    let ct = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(body).with_header(ct)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counts_and_labels() {
        let s = Snapshot {
            counters: vec![("connections_tracked", 7), ("events_lost", 0)],
            by_action: vec![("deny", 3), ("log", 1)],
            held_now: 2,
            conns: 5,
            conns_capacity: 65536,
            ..Default::default()
        };
        let t = render(&s);
        assert!(t.contains("earlytalker_connections_tracked_total 7"), "{t}");
        assert!(t.contains("earlytalker_events_lost_total 0"), "{t}");
        assert!(
            t.contains("earlytalker_early_talkers_total{action=\"deny\"} 3"),
            "{t}"
        );
        assert!(t.contains("earlytalker_greetings_held 2"), "{t}");
        assert!(
            t.contains("earlytalker_map_entries{map=\"connections\"} 5"),
            "{t}"
        );
        assert!(t.contains("# HELP earlytalker_passes"), "{t}");
        assert!(t.trim_end().ends_with("# EOF"), "{t}");
    }
}
