//! The verdict pipeline: kernel record → decode → dedupe → store / enforce →
//! report. It owns everything a record can change; the daemon feeds it records
//! and ticks, and tells it when the policy changes.

use crate::{
    actions::Enforcer,
    config::{Action, Live, Taken},
    counts::{AgentStat, Counts},
    events::{self, client_of, decode, server_of, DecodeError, Dedupe, End, Kind, Record, Tracker},
    fleet,
    output::Out,
    penalty::PenaltyBox,
    release::Releaser,
    status,
    store::Store,
};
use earlytalker_common::{Conn, ConnFlags, ConnKey, EventKind};
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
        }
    }

    /// A reload changed the policy: verdicts from now on follow it.
    pub fn set_policy(&mut self, live: &Live) {
        self.action = live.action;
        self.defer_reject = live.defer_reject;
        self.pass_ttl = live.pass_ttl;
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

    fn handle(&mut self, r: &Record) {
        // One early event (one reply), one verdict and one close per connection.
        if !self.dedupe.first(r) {
            return;
        }
        let client = client_of(&r.key);
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
                if r.reason == earlytalker_common::Reason::ClientFin && r.conn.before_accept() =>
            {
                // Hung up while held: the request socket goes, the client gets
                // a RST for its FIN.
                if let Some(Err(e)) = self.enforcer.as_mut().map(|e| e.abort(&r.key, &r.conn)) {
                    self.counts.add(AgentStat::TeardownFailures);
                    self.out
                        .teardown_failed(client, server_of(&r.key), "abort", &format!("{e:#}"));
                }
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
                return;
            }
            EventKind::Verdict => {}
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
    }

    fn report(&mut self, v: &events::Verdict) {
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
    }

    /// Tells the fleet what the kernel just recorded: a pass it earned, or an
    /// early talk (which cost it its pass).
    fn share(&self, v: &events::Verdict) {
        let Some(f) = &self.fleet else { return };
        let at_ms = fleet::unix_ms(std::time::SystemTime::now());
        let addr = v.client.ip();
        match v.kind {
            Kind::Pass if v.earned_pass && !self.pass_ttl.is_zero() => f.send(fleet::Note::Pass {
                addr,
                at_ms,
                ttl: self.pass_ttl,
            }),
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
            },
            status::Shared::default(),
            &Live {
                ports: vec![25],
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
