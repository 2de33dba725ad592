//! The verdict pipeline: kernel record → decode → dedupe → store / enforce →
//! report. It owns everything a record can change; the daemon feeds it records
//! and ticks, and tells it when the policy changes.

use crate::{
    actions::Enforcer,
    config::{Action, Live, Taken},
    counts::{AgentStat, Counts},
    events::{self, client_of, decode, server_of, DecodeError, Dedupe, End, Kind, Record, Tracker},
    fleet,
    loader::mapped,
    output::Out,
    penalty::PenaltyBox,
    proxy,
    release::{monotonic_ns, Releaser},
    status,
    store::Store,
};
use aya::maps::{HashMap as BpfHashMap, MapData};
use earlytalker_common::{Conn, ConnFlags, ConnKey, EventKind};
use ipnet::IpNet;
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Distinct unreadable-record errors logged (each once); later ones are only
/// counted.
const REJECTS_LOGGED: usize = 16;

/// What acts on the kernel's records beside logging: the enforcer (replies,
/// teardown), the release thread, and the counters they share.
pub struct Hands {
    /// None only in unit tests (opening it needs CAP_NET_RAW).
    pub enforcer: Option<Enforcer>,
    /// None only in unit tests.
    pub releaser: Option<Releaser>,
    pub counts: Counts,
    /// `--penalty`: None when off.
    pub penalty: Option<PenaltyBox>,
    /// `--shared-cache`: None when off.
    pub fleet: Option<fleet::Publisher>,
    /// The kernel's pass cache, for clients behind a PROXY protocol balancer
    /// (the kernel sees only the balancer's address); None in unit tests.
    pub passed: Option<BpfHashMap<MapData, [u8; 16], u64>>,
}

pub struct Pipeline {
    out: Out,
    dedupe: Dedupe,
    tracker: Tracker,
    pub store: Arc<Mutex<Store>>,
    /// None only in unit tests (opening it needs CAP_NET_RAW).
    enforcer: Option<Enforcer>,
    /// Completes held handshakes on time; None only in unit tests.
    releaser: Option<Releaser>,
    pub counts: Counts,
    snap: status::Shared,
    /// The policy in force: what is done to an early talker, and with which code.
    action: Action,
    defer_reject: bool,
    rejects_seen: HashSet<DecodeError>,
    pub penalty: Option<PenaltyBox>,
    fleet: Option<fleet::Publisher>,
    /// How long a pass lasts (0: the pass cache is off, nothing to share).
    pass_ttl: std::time::Duration,
    passed: Option<BpfHashMap<MapData, [u8; 16], u64>>,
    /// Real clients behind PROXY protocol balancers, by connection.
    proxied: proxy::Table,
    allow: Vec<IpNet>,
}

impl Pipeline {
    pub fn new(
        out: Out,
        store: Arc<Mutex<Store>>,
        hands: Hands,
        snap: status::Shared,
        live: &Live,
        grace_ns: u64,
        limit: usize,
    ) -> Self {
        Pipeline {
            out,
            // Racing duplicates are reserved in the ring microseconds apart, so a few
            // thousand recent records cover them; a small table also stays in cache.
            dedupe: Dedupe::new(4096),
            tracker: Tracker::new(live.taken(), grace_ns, limit),
            store,
            enforcer: hands.enforcer,
            releaser: hands.releaser,
            counts: hands.counts,
            snap,
            action: live.action,
            defer_reject: live.defer_reject,
            rejects_seen: HashSet::new(),
            penalty: hands.penalty,
            fleet: hands.fleet,
            pass_ttl: live.pass_ttl,
            passed: hands.passed,
            proxied: proxy::Table::new(limit),
            allow: live.allow.clone(),
        }
    }

    /// A reload changed the policy: verdicts from now on follow it.
    pub fn set_policy(&mut self, live: &Live) {
        self.action = live.action;
        self.defer_reject = live.defer_reject;
        self.pass_ttl = live.pass_ttl;
        self.allow.clone_from(&live.allow);
        self.tracker.set_action(live.taken());
    }

    /// The release thread, for the daemon to stop after detaching.
    pub fn take_releaser(&mut self) -> Option<Releaser> {
        self.releaser.take()
    }

    /// For a reload that switches enforcement on: SOCK_DESTROY must work.
    pub fn enforcer(&mut self) -> Option<&mut Enforcer> {
        self.enforcer.as_mut()
    }

    /// One ring-buffer record, as the kernel wrote it.
    pub fn record(&mut self, bytes: &[u8]) {
        match decode(bytes) {
            Ok(r) if r.kind == EventKind::Proxied => match events::proxy_header(bytes) {
                Ok(h) => self.proxy_header(&r, h),
                Err(e) => self.rejected(e),
            },
            Ok(r) => self.handle(&r),
            Err(e) => self.rejected(e),
        }
    }

    /// Counted always, logged once per distinct error: a kernel built from
    /// another ABI would otherwise flood the log.
    fn rejected(&mut self, e: DecodeError) {
        self.counts.add(AgentStat::RecordsRejected);
        if self.rejects_seen.len() < REJECTS_LOGGED && self.rejects_seen.insert(e) {
            log::warn!(
                "ignoring a kernel record: {e} (counted in kernel_records_rejected; logged once)"
            );
        }
    }

    /// A balancer's PROXY header: from now on its client is the one named. An
    /// allowlisted client, or one that passed before, is released at once.
    fn proxy_header(&mut self, r: &Record, header: Vec<u8>) {
        let balancer = client_of(&r.key);
        match proxy::parse(&header) {
            Ok(proxy::Said::Client(real)) => {
                let known = self.let_through(real.ip());
                log::debug!("{balancer} is a balancer for {real} (let through: {known})");
                self.proxied.insert(r.key, real, known);
                if let Some(rel) = &self.releaser {
                    rel.header(r.key, header);
                    if known && r.conn.before_accept() {
                        rel.hold(r.key, monotonic_ns());
                    }
                }
            }
            Ok(proxy::Said::Balancer) => {
                if let Some(rel) = &self.releaser {
                    rel.header(r.key, header);
                }
            }
            Err(e) => {
                // Framed like a header, but unreadable: dropped, as the MTA would.
                self.out.bad_proxy(balancer, server_of(&r.key), &e);
                if r.conn.before_accept() {
                    self.abort(r);
                }
            }
        }
    }

    /// Whether a client named by a PROXY header skips the hold: allowlisted,
    /// or passed within the pass TTL.
    fn let_through(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_canonical(),
            v4 => v4,
        };
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        if self.pass_ttl.is_zero() {
            return false;
        }
        let ttl = u64::try_from(self.pass_ttl.as_nanos()).unwrap_or(u64::MAX);
        self.passed
            .as_ref()
            .and_then(|m| m.get(&mapped(ip), 0).ok())
            .is_some_and(|t| monotonic_ns().saturating_sub(t) < ttl)
    }

    /// The client as the MTA knows it: behind a balancer, the one its header named.
    fn client(&self, key: &ConnKey) -> std::net::SocketAddr {
        self.proxied.client(key).unwrap_or_else(|| client_of(key))
    }

    /// Resets a held connection on both sides: the MTA never sees it.
    fn abort(&mut self, r: &Record) {
        if let Some(Err(e)) = self.enforcer.as_mut().map(|e| e.abort(&r.key, &r.conn)) {
            self.counts.add(AgentStat::TeardownFailures);
            let client = self.client(&r.key);
            self.out
                .teardown_failed(client, server_of(&r.key), "abort", &format!("{e:#}"));
        }
    }

    fn handle(&mut self, r: &Record) {
        // One early event (one reply), one verdict and one close per connection.
        if !self.dedupe.first(r) {
            return;
        }
        let client = self.client(&r.key);
        log::debug!(
            "kernel {:?} ({:?}) from {client}: flags {}",
            r.kind,
            r.reason,
            r.conn.flag_set()
        );
        match r.kind {
            EventKind::Held => {
                if let Some(rel) = &self.releaser {
                    rel.hold(r.key, r.conn.release_ns);
                }
                return;
            }
            EventKind::Verdict
                if matches!(
                    r.reason,
                    earlytalker_common::Reason::ClientFin
                        | earlytalker_common::Reason::BadProxyHeader
                ) && r.conn.before_accept() =>
            {
                // Hung up while held (the client gets a RST for its FIN), or
                // no PROXY header where one must be (dropped, as the MTA would):
                // the request socket goes.
                self.abort(r);
            }
            // Let through: nothing for the MTA to refuse.
            EventKind::Early if r.conn.has(ConnFlags::PIPECONNECT) => {}
            EventKind::Early => {
                self.store.lock().expect("store lock").insert(
                    client,
                    server_of(&r.key),
                    self.action,
                    self.defer_reject,
                    r.conn.early_bytes(),
                    Instant::now(),
                );
                if r.conn.has(ConnFlags::DENY) {
                    self.enforce(&r.key, &r.conn, r.now_ns);
                    return;
                }
            }
            EventKind::Closed => {
                // The verdict now lives only as long as the MTA may still ask.
                self.store
                    .lock()
                    .expect("store lock")
                    .closed(&client, Instant::now());
                self.proxied.remove(&r.key);
                return;
            }
            EventKind::Verdict | EventKind::Proxied => {}
        }
        if let Some(v) = self.tracker.on_event(r) {
            self.report(&v);
        }
    }

    /// Early talkers whose greeting never came (see `Tracker::sweep`).
    pub fn sweep(&mut self, now_ns: u64, lookup: impl FnMut(&ConnKey) -> Option<Conn>) {
        for v in self.tracker.sweep(now_ns, lookup) {
            self.report(&v);
        }
        self.store
            .lock()
            .expect("store lock")
            .expire(Instant::now());
        self.proxied.sweep(Instant::now());
    }

    fn report(&mut self, v: &events::Verdict) {
        let real;
        let v = match self.proxied.client(&v.key) {
            Some(c) => {
                let mut p = v.clone();
                p.client = c;
                real = p;
                self.proxied_pass(&real);
                &real
            }
            None => v,
        };
        if v.kind == Kind::EarlyTalker {
            self.counts.add(AgentStat::of(v.action));
            self.store
                .lock()
                .expect("store lock")
                .update_bytes(&v.client, v.bytes);
        }
        self.out.verdict(v);
        self.share(v);
        if v.kind == Kind::EarlyTalker {
            let now = crate::release::monotonic_ns();
            if let Some(until) = self
                .penalty
                .as_mut()
                .and_then(|b| b.offend(v.client.ip(), now))
            {
                self.counts.add(AgentStat::Penalties);
                self.out
                    .penalty(v.client.ip(), std::time::Duration::from_nanos(until - now));
            }
        }
        self.snap.lock().expect("snapshot lock").push_recent(v);
        // Behind a balancer, the real client is forgotten with its verdict,
        // unless the MTA may still ask about it (defer-reject: until Closed).
        if !(v.kind == Kind::EarlyTalker && self.defer_reject) {
            self.proxied.remove(&v.key);
        }
    }

    /// Behind a balancer the kernel records nothing in the pass cache: the
    /// real client's pass is written here, and its early talk costs it.
    fn proxied_pass(&mut self, v: &events::Verdict) {
        let Some(m) = self.passed.as_mut() else {
            return;
        };
        let key = mapped(v.client.ip());
        match v.kind {
            Kind::Pass if !self.pass_ttl.is_zero() && !self.proxied.known(&v.key) => {
                if let Err(e) = m.insert(key, monotonic_ns(), 0) {
                    log::warn!("pass of {} not recorded: {e}", v.client.ip());
                }
            }
            Kind::EarlyTalker => {
                let _ = m.remove(&key);
            }
            _ => {}
        }
    }

    /// Tells the fleet what the kernel just recorded: a pass it earned, or an
    /// early talk (which cost it its pass).
    fn share(&self, v: &events::Verdict) {
        let Some(f) = &self.fleet else { return };
        let at_ms = fleet::unix_ms(std::time::SystemTime::now());
        let addr = v.client.ip();
        match v.kind {
            Kind::Pass
                if v.earned_pass && !self.pass_ttl.is_zero() && !self.proxied.known(&v.key) =>
            {
                f.send(fleet::Note::Pass {
                    addr,
                    at_ms,
                    ttl: self.pass_ttl,
                })
            }
            Kind::EarlyTalker => f.send(fleet::Note::Talk { addr, at_ms }),
            _ => {}
        }
    }

    /// deny/denysoft: reply in place of the greeting, tear the MTA's socket down.
    fn enforce(&mut self, key: &ConnKey, conn: &Conn, now_ns: u64) {
        let v = events::verdict(
            key,
            conn,
            End::Denied,
            now_ns,
            Taken::of(self.action, self.defer_reject),
        );
        let Some(enforcer) = self.enforcer.as_mut() else {
            log::error!("kernel condemned {} but enforcement is off", v.client);
            return;
        };
        let outcome = enforcer.deny(key, conn, self.action);
        self.report(&v);
        for (step, err) in [
            ("reply", outcome.reply_error),
            ("destroy", outcome.destroy_error),
        ] {
            if let Some(e) = err {
                self.counts.add(AgentStat::TeardownFailures);
                self.out.teardown_failed(v.client, v.server, step, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::tests::{conn, key4, raw};
    use earlytalker_common::Reason;

    #[test]
    fn unknown_records_are_counted_and_the_rest_still_flow() {
        let store = Arc::new(Mutex::new(Store::new(16, crate::config::CLOSE_GRACE)));
        let mut p = Pipeline::new(
            Out::new(crate::config::LogFormat::Json),
            store.clone(),
            Hands {
                enforcer: None,
                releaser: None,
                counts: Counts::default(),
                penalty: None,
                fleet: None,
                passed: None,
            },
            status::Shared::default(),
            &Live {
                ports: vec![25],
                proxy_ports: Vec::new(),
                wait: std::time::Duration::from_secs(1),
                wait_under_stress: crate::config::WAIT_UNDER_STRESS,
                stress_threshold: crate::config::STRESS_THRESHOLD,
                action: Action::Deny,
                defer_reject: true,
                allow: Vec::new(),
                pass_ttl: std::time::Duration::ZERO,
                pipeconnect: None,
            },
            5_000_000_000,
            16,
        );
        let k = key4([10, 0, 0, 2], 40000, [10, 0, 0, 1], 25);
        p.record(&raw(42, 0, k, conn(b"")));
        p.record(&raw(42, 0, k, conn(b"")));
        p.record(&raw(2, 77, k, conn(b"")));
        assert_eq!(p.counts.get(AgentStat::RecordsRejected), 3);
        assert_eq!(p.rejects_seen.len(), 2, "each distinct error once");
        // An early talker under defer-reject, then its close: the store hears both.
        let c = conn(b"EHLO bot\r\n");
        p.record(&raw(EventKind::Early as u32, Reason::None as u32, k, c));
        let now = Instant::now();
        assert!(store.lock().unwrap().lookup(&client_of(&k), now).is_some());
        p.record(&raw(
            EventKind::Closed as u32,
            Reason::ClientFin as u32,
            k,
            c,
        ));
        let later = now + crate::config::CLOSE_GRACE + std::time::Duration::from_secs(1);
        assert!(store
            .lock()
            .unwrap()
            .lookup(&client_of(&k), later)
            .is_none());
        assert_eq!(p.counts.get(AgentStat::RecordsRejected), 3);
    }
}
