//! What the agent counts beside the kernel's STATS: early talkers by what was
//! done to them, failed enforcement steps, and kernel records it could not read.
//! One table names them for the STOPPED line, `status` and the metrics, like
//! earlytalker-common's table does for the kernel's counters.

use crate::config::Taken;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStat {
    Deny,
    Denysoft,
    Defer,
    Log,
    TeardownFailures,
    RecordsRejected,
    Released,
    ReleaseRetries,
    ReleasesAbandoned,
    StaleSwept,
    FilterRepairs,
    Penalties,
    SharedPublished,
    SharedReceived,
    SharedIgnored,
    SharedDropped,
    SharedOutages,
}

pub struct AgentStatInfo {
    pub stat: AgentStat,
    pub name: &'static str,
    pub help: &'static str,
    /// Exported as a metric of its own (the actions are exported as one family,
    /// `early_talkers{action=…}`).
    pub metric: bool,
}

const fn s(stat: AgentStat, name: &'static str, help: &'static str, metric: bool) -> AgentStatInfo {
    AgentStatInfo {
        stat,
        name,
        help,
        metric,
    }
}

/// Indexed by `AgentStat`.
pub const AGENT_STATS: [AgentStatInfo; 17] = [
    s(
        AgentStat::Deny,
        "action_deny",
        "Early talkers denied",
        false,
    ),
    s(
        AgentStat::Denysoft,
        "action_denysoft",
        "Early talkers denied softly",
        false,
    ),
    s(
        AgentStat::Defer,
        "action_defer",
        "Early talkers left to the MTA to refuse",
        false,
    ),
    s(
        AgentStat::Log,
        "action_log",
        "Early talkers only logged",
        false,
    ),
    s(
        AgentStat::TeardownFailures,
        "teardown_failures",
        "Failed steps of deny/denysoft enforcement",
        true,
    ),
    s(
        AgentStat::RecordsRejected,
        "kernel_records_rejected",
        "Kernel records the agent could not read (unknown kind or reason, short record)",
        true,
    ),
    s(
        AgentStat::Released,
        "releases",
        "Held connections whose handshake the agent completed",
        true,
    ),
    s(
        AgentStat::ReleaseRetries,
        "release_retries",
        "Releases sent again because the handshake had not completed",
        true,
    ),
    s(
        AgentStat::ReleasesAbandoned,
        "releases_abandoned",
        "Releases given up (the server dropped the request, or tries ran out)",
        true,
    ),
    s(
        AgentStat::StaleSwept,
        "stale_entries_swept",
        "Kernel entries of connections long gone, deleted by the agent",
        true,
    ),
    s(
        AgentStat::FilterRepairs,
        "filter_counts_repaired",
        "Counts of the kernel's tracked-connection filter lowered after map evictions",
        true,
    ),
    s(
        AgentStat::Penalties,
        "penalties",
        "Addresses put in the penalty box (--penalty)",
        true,
    ),
    s(
        AgentStat::SharedPublished,
        "shared_cache_published",
        "Passes and early talks this relay published to the shared cache (--shared-cache)",
        true,
    ),
    s(
        AgentStat::SharedReceived,
        "shared_cache_received",
        "Passes and early talks of other relays read from the shared cache",
        true,
    ),
    s(
        AgentStat::SharedIgnored,
        "shared_cache_ignored",
        "Unreadable messages or values in the shared cache, ignored",
        true,
    ),
    s(
        AgentStat::SharedDropped,
        "shared_cache_dropped",
        "News for the shared cache dropped (the queue was full during an outage)",
        true,
    ),
    s(
        AgentStat::SharedOutages,
        "shared_cache_outages",
        "Times the shared cache became unreachable",
        true,
    ),
];

const _: () = {
    let mut i = 0;
    while i < AGENT_STATS.len() {
        assert!(AGENT_STATS[i].stat as usize == i);
        i += 1;
    }
};

impl AgentStat {
    pub fn of(t: Taken) -> Self {
        match t {
            Taken::Deny => AgentStat::Deny,
            Taken::Denysoft => AgentStat::Denysoft,
            Taken::Defer => AgentStat::Defer,
            Taken::Log => AgentStat::Log,
        }
    }
}

/// Shared by the pipeline and the release thread (a clone counts into the same
/// cells).
#[derive(Default, Clone, Debug)]
pub struct Counts(Arc<[AtomicU64; AGENT_STATS.len()]>);

impl Counts {
    pub fn add(&self, s: AgentStat) {
        self.0[s as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_n(&self, s: AgentStat, n: u64) {
        self.0[s as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, s: AgentStat) -> u64 {
        self.0[s as usize].load(Ordering::Relaxed)
    }

    /// Early talkers by what was done to them.
    pub fn by_action(&self) -> Vec<(Taken, u64)> {
        Taken::ALL
            .iter()
            .map(|t| (*t, self.get(AgentStat::of(*t))))
            .collect()
    }

    /// Every counter with its name, in table order.
    pub fn list(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        AGENT_STATS.iter().map(|i| (i.name, self.get(i.stat)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_and_action() {
        let c = Counts::default();
        c.add(AgentStat::of(Taken::Defer));
        c.add(AgentStat::RecordsRejected);
        c.add(AgentStat::RecordsRejected);
        let l: Vec<_> = c.list().collect();
        assert_eq!(l[2], ("action_defer", 1));
        assert_eq!(l[5], ("kernel_records_rejected", 2));
        assert_eq!(c.by_action()[2], (Taken::Defer, 1));
    }
}
