//! The kernel's per-CPU counters: the index into the STATS map, and the one table
//! of names and help texts that logs, metrics and `status` print.

/// An index into the per-CPU STATS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Tracked = 0,
    Early = 1,
    Pass = 2,
    HoldDrops = 3,
    EventsLost = 4,
    MapFull = 5,
    Handshakes = 6,
    SynData = 7,
    ClosedEarly = 8,
    DenyDrops = 9,
    AllowHits = 10,
    PassCacheHits = 11,
    Pipeconnect = 12,
    Held = 13,
    PenaltyRefused = 14,
    ProxyHeaders = 15,
}

pub struct StatInfo {
    pub stat: Stat,
    /// The name in the STOPPED line, `status` and the metric (with a prefix).
    pub name: &'static str,
    pub help: &'static str,
    /// Exported as a metric of its own (early talkers are exported by action,
    /// from the agent's counts, instead).
    pub metric: bool,
}

impl Stat {
    /// Entries in the STATS map.
    pub const COUNT: u32 = STATS.len() as u32;

    pub const fn info(self) -> &'static StatInfo {
        &STATS[self as usize]
    }

    pub const fn name(self) -> &'static str {
        self.info().name
    }
}

const fn s(stat: Stat, name: &'static str, help: &'static str, metric: bool) -> StatInfo {
    StatInfo {
        stat,
        name,
        help,
        metric,
    }
}

/// Indexed by `Stat`: entry i describes the counter at index i.
pub const STATS: [StatInfo; 16] = [
    s(
        Stat::Tracked,
        "connections_tracked",
        "Connections tracked from their handshake",
        true,
    ),
    s(
        Stat::Early,
        "early_talkers",
        "Clients that talked before the greeting",
        false,
    ),
    s(
        Stat::Pass,
        "passes",
        "Clients whose greeting left before they talked",
        true,
    ),
    s(
        Stat::HoldDrops,
        "held_segments_withheld",
        "Client ACKs kept from the server while a connection was held",
        true,
    ),
    s(
        Stat::EventsLost,
        "events_lost",
        "Verdict events lost because the ring buffer was full",
        true,
    ),
    s(
        Stat::MapFull,
        "conn_map_insert_failures",
        "Connections left untracked because the table refused them",
        true,
    ),
    s(
        Stat::Handshakes,
        "handshakes_seen",
        "SYN-ACKs seen on watched ports",
        true,
    ),
    s(
        Stat::SynData,
        "syn_data",
        "SYNs carrying data (TCP Fast Open): early talkers",
        true,
    ),
    s(
        Stat::ClosedEarly,
        "closed_before_greeting",
        "Early talkers whose connection ended before any greeting",
        true,
    ),
    s(
        Stat::DenyDrops,
        "enforced_segments_dropped",
        "Segments of denied connections dropped in the kernel",
        true,
    ),
    s(
        Stat::AllowHits,
        "allowlist_hits",
        "Connections from allowlisted clients",
        true,
    ),
    s(
        Stat::PassCacheHits,
        "pass_cache_hits",
        "Connections not held thanks to the pass cache",
        true,
    ),
    s(
        Stat::Pipeconnect,
        "pipeconnect_allowed",
        "Early EHLOs allowed as PIPECONNECT from clients that passed before",
        true,
    ),
    s(
        Stat::Held,
        "held_before_accept",
        "Connections held before the MTA could accept them",
        true,
    ),
    s(
        Stat::PenaltyRefused,
        "penalty_box_refused",
        "SYNs from addresses in the penalty box refused at XDP",
        true,
    ),
    s(
        Stat::ProxyHeaders,
        "proxy_headers",
        "PROXY protocol headers taken from balancers (--proxy-protocol)",
        true,
    ),
];

// Each entry sits at its own index, and names are unique.
const _: () = {
    let mut i = 0;
    while i < STATS.len() {
        assert!(STATS[i].stat as usize == i);
        let mut j = 0;
        while j < i {
            assert!(!eq(STATS[i].name, STATS[j].name));
            j += 1;
        }
        i += 1;
    }
};

const fn eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
