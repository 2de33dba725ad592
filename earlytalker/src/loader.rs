//! Loading the kernel programs, configuring their maps and attaching them through
//! TCX links. A TCX link is a file descriptor owned by this process: if the agent
//! dies, the kernel detaches the programs and mail flows untouched (fail open).

use crate::config::{max_wait_for_synack_retries, Fixed, Live};
use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf,
    },
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLinkId, XdpMode},
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use earlytalker_common::{
    CfgFlags, Config, Conn, ConnFlags, ConnKey, Handshake, Stat, MAP_ALLOW, MAP_CONFIG, MAP_CONNS,
    MAP_EVENTS, MAP_HANDSHAKES, MAP_PASSED, MAP_PENALTY, MAP_PORTS, MAP_PROXY_PORTS, MAP_STATS,
    MAP_TAILS, MAP_TRACKED, PORT_WORDS, PROG_EGRESS, PROG_INGRESS, PROG_INGRESS_PROXY, PROG_XDP,
    STATS, TAIL_PROXY,
};
use ipnet::IpNet;
use std::os::fd::AsFd;
use std::time::Duration;
use std::{collections::HashSet, net::IpAddr};

/// The kernel programs, built by build.rs and embedded: the agent needs no file
/// at run time, and the tests load exactly what the agent loads.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/earlytalker.bpf.o"));

const TCX_MIN: KernelVersion = KernelVersion::new(6, 6, 0);

/// What this kernel offers, checked before anything is loaded.
pub struct Features {
    pub kernel: String,
    pub max_wait: Duration,
    /// net.ipv4.tcp_synack_retries: how long a held request socket lives.
    pub tcp_synack_retries: u32,
    /// /sys/kernel/btf/vmlinux is present (not needed by the programs; reported).
    pub btf: bool,
}

/// Checks privilege and kernel features; every failure is one clear line.
pub fn detect() -> Result<Features> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "must run as root: loading and attaching BPF programs needs CAP_BPF and CAP_NET_ADMIN"
        );
    }
    let kv = KernelVersion::current().context("cannot read the kernel version")?;
    if kv < TCX_MIN {
        bail!("kernel {kv} lacks TCX links (needs 6.6 or later); earlytalker only attaches through TCX so that it fails open");
    }
    // Per network namespace: read the one the agent runs in, like its interfaces.
    let raw = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_synack_retries")
        .context("cannot read net.ipv4.tcp_synack_retries")?;
    let tcp_synack_retries: u32 = raw
        .trim()
        .parse()
        .with_context(|| format!("odd net.ipv4.tcp_synack_retries value {raw:?}"))?;
    Ok(Features {
        kernel: kv.to_string(),
        max_wait: max_wait_for_synack_retries(tcp_synack_retries),
        tcp_synack_retries,
        btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    })
}

/// Loaded and attached programs; dropping it detaches everything.
pub struct Guard {
    pub ebpf: Ebpf,
    /// Kept alive: dropping the logger closes its map (aya-log 0.3).
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    links: Vec<(String, TcAttachType, SchedClassifierLinkId)>,
    /// The penalty box's XDP links, and the mode they got ("native" where the
    /// driver runs XDP itself, else "generic").
    xdp: Vec<(String, XdpLinkId)>,
    pub xdp_mode: Option<&'static str>,
    /// `--penalty-action drop`, written into every configuration.
    penalty_drop: bool,
}

pub fn ports_bitmap(ports: &[u16]) -> Vec<u64> {
    let mut words = vec![0u64; PORT_WORDS as usize];
    for &p in ports {
        words[usize::from(p >> 6)] |= 1 << (p & 63);
    }
    words
}

/// The kernel's configuration for these settings; `pipeconnect` says whether
/// PIPECONNECT is let through (see `Live::pipeconnect_allowed`), `stressed`
/// whether the stress wait applies.
pub fn config_for(s: &Live, pipeconnect: bool, stressed: bool) -> Config {
    let mut flags = if s.enforce() {
        CfgFlags::ENFORCE
    } else {
        // The verdict store needs to hear when an early talker's connection ends.
        CfgFlags::TRACK_EARLY
    };
    if pipeconnect {
        flags |= CfgFlags::PIPECONNECT;
    }
    Config {
        wait_ns: u64::try_from(s.wait_now(stressed).as_nanos()).unwrap_or(u64::MAX),
        flags: flags.bits(),
        pass_ttl_ns: u64::try_from(s.pass_ttl.as_nanos()).unwrap_or(u64::MAX),
    }
}

/// Address as the kernel keys it: IPv4 mapped into IPv6.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An allowlist network as an LPM trie key (IPv4 prefixes shift by 96 bits).
pub fn allow_key(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.prefix_len()) + 96,
            mapped(IpAddr::V4(n.network())),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

impl Guard {
    pub fn load(fixed: &Fixed, live: &Live, pipeconnect: bool) -> Result<Self> {
        for name in &fixed.ifaces {
            nix::net::if_::if_nametoindex(name.as_str())
                .map_err(|_| anyhow::anyhow!("no such network interface: {name}"))?;
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONNS, fixed.max_connections)
            // One knob for both tables: half-open handshakes are bounded alike.
            .map_max_entries(MAP_HANDSHAKES, fixed.max_connections)
            .map_max_entries(MAP_EVENTS, fixed.event_buffer)
            .load(OBJECT)
            .context("loading the eBPF object failed")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                // Only the kernel's debug messages are lost.
                log::warn!("kernel debug log unavailable: {e}");
                None
            }
        };
        let mut guard = Guard {
            ebpf,
            logger,
            links: Vec::new(),
            xdp: Vec::new(),
            xdp_mode: None,
            penalty_drop: fixed.penalty_action == crate::config::PenaltyAction::Drop,
        };
        guard.configure(live, pipeconnect, false)?;
        guard.attach(&fixed.ifaces)?;
        if fixed.penalty.is_some() {
            guard.attach_xdp(&fixed.ifaces)?;
        }
        Ok(guard)
    }

    /// Writes the run-time settings into the CONFIG and PORTS maps.
    pub fn configure(&mut self, s: &Live, pipeconnect: bool, stressed: bool) -> Result<()> {
        let mut cfg: Array<_, Config> = Array::try_from(
            self.ebpf
                .map_mut(MAP_CONFIG)
                .context("CONFIG map missing")?,
        )?;
        let mut c = config_for(s, pipeconnect, stressed);
        if self.penalty_drop {
            c.flags |= CfgFlags::PENALTY_DROP.bits();
        }
        cfg.set(0, c, 0).context("writing CONFIG")?;
        self.write_ports(MAP_PORTS, &s.ports)?;
        self.write_ports(MAP_PROXY_PORTS, &s.proxy_ports)?;
        self.sync_allow(&s.allow)
    }

    /// Makes the port bitmap `name` hold exactly `ports`.
    fn write_ports(&mut self, name: &str, ports: &[u16]) -> Result<()> {
        let mut map: Array<_, u64> = Array::try_from(
            self.ebpf
                .map_mut(name)
                .with_context(|| format!("{name} map missing"))?,
        )?;
        for (i, w) in ports_bitmap(ports).into_iter().enumerate() {
            map.set(i as u32, w, 0)
                .with_context(|| format!("writing {name}"))?;
        }
        Ok(())
    }

    /// Makes ALLOW hold exactly `nets`: adds first, then removes, so an entry kept
    /// across a reload is never briefly missing.
    fn sync_allow(&mut self, nets: &[IpNet]) -> Result<()> {
        let mut trie: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_ALLOW).context("ALLOW map missing")?)?;
        let want: HashSet<(u32, [u8; 16])> = nets.iter().map(allow_key).collect();
        let have: HashSet<(u32, [u8; 16])> = trie
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        for (len, data) in want.difference(&have) {
            trie.insert(&Key::new(*len, *data), 1, 0)
                .context("writing the allowlist")?;
        }
        for (len, data) in have.difference(&want) {
            trie.remove(&Key::new(*len, *data))
                .context("pruning the allowlist")?;
        }
        Ok(())
    }

    /// Pass-cache entries: address and bpf_ktime_get_ns of its pass.
    pub fn passed(&self) -> Vec<([u8; 16], u64)> {
        let Some(map) = self.ebpf.map(MAP_PASSED) else {
            return Vec::new();
        };
        let Ok(m) = HashMap::<_, [u8; 16], u64>::try_from(map) else {
            return Vec::new();
        };
        m.iter().filter_map(Result::ok).collect()
    }

    /// Pass-cache size: keys only (one syscall each), no values.
    pub fn passed_count(&self) -> u64 {
        let Some(map) = self.ebpf.map(MAP_PASSED) else {
            return 0;
        };
        HashMap::<_, [u8; 16], u64>::try_from(map)
            .map_or(0, |m| m.keys().filter(Result::is_ok).count() as u64)
    }

    pub fn restore_passed(&mut self, entries: &[([u8; 16], u64)]) -> Result<usize> {
        let mut m: HashMap<_, [u8; 16], u64> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_PASSED)
                .context("PASSED map missing")?,
        )?;
        let mut n = 0;
        for (k, t) in entries {
            if m.insert(k, t, 0).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records a pass another relay saw at `t` (CLOCK_MONOTONIC ns), unless
    /// this relay knows a later one; true if it was recorded.
    pub fn learn_pass(&mut self, addr: &[u8; 16], t: u64) -> Result<bool> {
        let mut m: HashMap<_, [u8; 16], u64> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_PASSED)
                .context("PASSED map missing")?,
        )?;
        if m.get(addr, 0).is_ok_and(|mine| mine >= t) {
            return Ok(false);
        }
        m.insert(addr, t, 0)?;
        Ok(true)
    }

    /// Drops `addr`'s pass if it has one from before `t` (CLOCK_MONOTONIC
    /// ns), when another relay saw it talk early.
    pub fn forget_pass_before(&mut self, addr: &[u8; 16], t: u64) -> Result<()> {
        let mut m: HashMap<_, [u8; 16], u64> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_PASSED)
                .context("PASSED map missing")?,
        )?;
        // Most addresses the fleet hears of never passed here.
        if !m.get(addr, 0).is_ok_and(|passed| passed <= t) {
            return Ok(());
        }
        Ok(m.remove(addr)?)
    }

    /// Tracked connections and how many of them are held right now (before the
    /// MTA could accept them).
    pub fn conn_fill(&self, now_ns: u64) -> (u64, u64) {
        let Some(map) = self.ebpf.map(MAP_CONNS) else {
            return (0, 0);
        };
        let Ok(m) = HashMap::<_, ConnKey, Conn>::try_from(map) else {
            return (0, 0);
        };
        let (mut n, mut held) = (0, 0);
        for (_, c) in m.iter().filter_map(Result::ok) {
            n += 1;
            if c.before_accept()
                && !c.has(ConnFlags::DENY | ConnFlags::REPORTED)
                && now_ns < c.release_ns
            {
                held += 1;
            }
        }
        (n, held)
    }

    /// Loads et_ingress_proxy into TAILS: et_ingress jumps there for a
    /// balancer's bytes on a PROXY protocol port. Before et_ingress attaches.
    fn load_tails(&mut self) -> Result<()> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_INGRESS_PROXY)
            .with_context(|| format!("program {PROG_INGRESS_PROXY} missing from the object"))?
            .try_into()?;
        p.load()
            .map_err(|e| verifier_error(PROG_INGRESS_PROXY, e))?;
        let fd = p.fd()?.try_clone()?;
        let mut tails: ProgramArray<_> =
            ProgramArray::try_from(self.ebpf.map_mut(MAP_TAILS).context("TAILS map missing")?)?;
        tails
            .set(TAIL_PROXY, &fd, 0)
            .context("installing et_ingress_proxy")
    }

    fn attach(&mut self, ifaces: &[String]) -> Result<()> {
        self.load_tails()?;
        for (prog, kind) in [
            (PROG_INGRESS, TcAttachType::Ingress),
            (PROG_EGRESS, TcAttachType::Egress),
        ] {
            let p: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the object"))?
                .try_into()?;
            p.load().map_err(|e| verifier_error(prog, e))?;
            for iface in ifaces {
                // Never fall back to netlink filters: they would outlive the agent.
                let id = p
                    .attach_with_options(
                        iface,
                        kind,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| {
                        format!("attaching {prog} to {iface} ({kind:?}) through TCX")
                    })?;
                self.links.push((iface.clone(), kind, id));
            }
        }
        Ok(())
    }

    /// A second handle on the connection table, for a thread of its own.
    pub fn conns_handle(&self) -> Result<HashMap<MapData, ConnKey, Conn>> {
        self.lru_handle(MAP_CONNS)
    }

    /// A second handle on the handshake table, for the sweep thread.
    pub fn handshakes_handle(&self) -> Result<HashMap<MapData, ConnKey, Handshake>> {
        self.lru_handle(MAP_HANDSHAKES)
    }

    fn lru_handle<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<HashMap<MapData, K, V>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("{name} map missing"))?;
        let aya::maps::Map::LruHashMap(data) = map else {
            bail!("{name} is not an LRU hash map");
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the {name} map descriptor"))?;
        Ok(HashMap::try_from(aya::maps::Map::LruHashMap(
            MapData::from_fd(fd)?,
        ))?)
    }

    /// The penalty box's map, for the pipeline.
    pub fn penalty_handle(&self) -> Result<HashMap<MapData, [u8; 16], u64>> {
        self.lru_handle(MAP_PENALTY)
    }

    /// The pass cache, for the real clients behind PROXY protocol balancers.
    pub fn passed_handle(&self) -> Result<HashMap<MapData, [u8; 16], u64>> {
        self.lru_handle(MAP_PASSED)
    }

    /// The penalty box at XDP: native mode where the driver has it, generic
    /// otherwise. Links like the TC programs': they go with the agent.
    fn attach_xdp(&mut self, ifaces: &[String]) -> Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .with_context(|| format!("program {PROG_XDP} missing from the object"))?
            .try_into()?;
        p.load().map_err(|e| verifier_error(PROG_XDP, e))?;
        for iface in ifaces {
            let (id, mode) = match p.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(native) => {
                    log::debug!("XDP native mode on {iface}: {native}");
                    let id = p.attach(iface, XdpMode::Skb).with_context(|| {
                        format!("attaching {PROG_XDP} to {iface} (native: {native})")
                    })?;
                    (id, "generic")
                }
            };
            // One word for the start-up line: the weakest mode in use.
            if self.xdp_mode != Some("generic") {
                self.xdp_mode = Some(mode);
            }
            self.xdp.push((iface.clone(), id));
        }
        Ok(())
    }

    /// The kernel's TRACKED filter, mapped into this process.
    pub fn filter(&self) -> Result<crate::tracked::Filter> {
        let map = self.ebpf.map(MAP_TRACKED).context("TRACKED map missing")?;
        let aya::maps::Map::Array(data) = map else {
            bail!("TRACKED is not an array");
        };
        crate::tracked::Filter::map(data.fd().as_fd())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let m = self
            .ebpf
            .take_map(MAP_EVENTS)
            .context("EVENTS map missing")?;
        Ok(RingBuf::try_from(m)?)
    }

    /// The kernel's current view of a tracked connection.
    pub fn lookup(&self, key: &ConnKey) -> Option<Conn> {
        let map = self.ebpf.map(MAP_CONNS)?;
        let conns: HashMap<_, ConnKey, Conn> = HashMap::try_from(map).ok()?;
        conns.get(key, 0).ok()
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Stat, u64)> {
        let Some(map) = self.ebpf.map(MAP_STATS) else {
            return Vec::new();
        };
        let Ok(stats) = PerCpuArray::<_, u64>::try_from(map) else {
            return Vec::new();
        };
        STATS
            .iter()
            .map(|info| {
                let sum = stats
                    .get(&(info.stat as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or_default();
                (info.stat, sum)
            })
            .collect()
    }

    /// Detaches explicitly (dropping would too) so failures can be reported.
    pub fn detach(mut self) {
        for (iface, id) in std::mem::take(&mut self.xdp) {
            let res = self
                .ebpf
                .program_mut(PROG_XDP)
                .and_then(|p| <&mut Xdp>::try_from(p).ok())
                .map(|p| p.detach(id));
            if let Some(Err(e)) = res {
                log::warn!("detaching {PROG_XDP} from {iface}: {e}");
            }
        }
        for (iface, kind, id) in std::mem::take(&mut self.links) {
            let prog = match kind {
                TcAttachType::Ingress => PROG_INGRESS,
                _ => PROG_EGRESS,
            };
            let res = self
                .ebpf
                .program_mut(prog)
                .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
                .map(|p| p.detach(id));
            if let Some(Err(e)) = res {
                log::warn!("detaching {prog} from {iface}: {e}");
            }
        }
    }
}

fn verifier_error(prog: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    // The verifier log is long; keep it for -v and give one line otherwise.
    let full = e.to_string();
    log::debug!("{prog}: {full}");
    let first = full
        .lines()
        .next()
        .unwrap_or("")
        .split(". Verifier output")
        .next()
        .unwrap_or("");
    anyhow::anyhow!("the kernel refused to load {prog}: {first} (run with -v for the verifier log)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_bitmap_sets_exactly_the_ports() {
        let w = ports_bitmap(&[25, 587, 65535, 1]);
        assert_eq!(w.len(), 1024);
        assert_eq!(w[0], (1 << 25) | (1 << 1));
        assert_eq!(w[587 / 64], 1 << (587 % 64));
        assert_eq!(w[1023], 1 << 63);
        assert_eq!(w.iter().map(|x| x.count_ones()).sum::<u32>(), 4);
    }
}
