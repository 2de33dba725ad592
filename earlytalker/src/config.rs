//! Command line, configuration file, and the settings derived from both. Flags
//! override the file; both go through the same validation. Pure: unit-tested.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/earlytalker/control.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/earlytalker";

/// What to do with an early talker (qpsmtpd's `check_earlytalker` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// 554 5.7.1 instead of the greeting, then disconnect.
    Deny,
    /// 421 4.7.1 instead of the greeting, then disconnect.
    Denysoft,
    /// Only log the verdict; the connection is not touched.
    Log,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Deny => "deny",
            Action::Denysoft => "denysoft",
            Action::Log => "log",
        })
    }
}

/// What was done to an early talker: the action, or `defer` when the MTA is left
/// to refuse it (defer-reject).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Taken {
    Deny,
    Denysoft,
    Defer,
    Log,
}

impl Taken {
    pub fn of(action: Action, defer_reject: bool) -> Self {
        match (action, defer_reject) {
            (Action::Log, _) => Taken::Log,
            (_, true) => Taken::Defer,
            (Action::Deny, false) => Taken::Deny,
            (Action::Denysoft, false) => Taken::Denysoft,
        }
    }

    pub const ALL: [Taken; 4] = [Taken::Deny, Taken::Denysoft, Taken::Defer, Taken::Log];

    pub fn as_str(self) -> &'static str {
        match self {
            Taken::Deny => "deny",
            Taken::Denysoft => "denysoft",
            Taken::Defer => "defer",
            Taken::Log => "log",
        }
    }
}

/// Tests and logs compare with the logged word.
impl PartialEq<&str> for Taken {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to make of an early EHLO from a client that passed before (Exim's
/// early pipelining, PIPECONNECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pipeconnect {
    /// Log it as PIPECONNECT and let it through.
    Known,
    /// Judge it as any early talker.
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per verdict for people, modelled on postscreen's.
    Text,
    /// One JSON object per line.
    Json,
}

/// Catch SMTP clients that talk before the server's greeting, in the kernel,
/// in front of any unmodified MTA.
#[derive(Parser, Debug, Clone)]
#[command(name = "earlytalker", version, about, long_about = None,
          args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Show the running agent's counters, configuration and recent verdicts
    Status {
        /// Print the agent's answer as JSON
        #[arg(long)]
        json: bool,
        /// The agent's control socket
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Defer-reject for OpenSMTPD: a filter (smtpd.conf `proc-exec`) that asks
    /// the running agent's policy service at MAIL FROM and RCPT TO
    #[command(group(clap::ArgGroup::new("policy").required(true)))]
    OpensmtpdFilter {
        /// The agent's policy service on this unix socket (its --policy-socket)
        #[arg(long, value_name = "PATH", group = "policy")]
        policy_socket: Option<PathBuf>,
        /// The agent's policy service at this address (its --policy-listen)
        #[arg(long, value_name = "ADDR:PORT", group = "policy", value_parser = parse_loopback)]
        policy_listen: Option<SocketAddr>,
    },
    /// Write the man page and shell completions into DIR (for packaging)
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Configuration file (TOML); flags override it, SIGHUP reloads it
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Interface to watch (repeatable) [default: the interface of the default route]
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub iface: Vec<String>,

    /// Server TCP port to watch (repeatable) [default: 25]
    #[arg(short, long = "port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// A watched port behind a balancer that sends a PROXY protocol header
    /// (v1 or v2; HAProxy's send-proxy): the header is not early talk, and the
    /// client it names is the one judged (repeatable) [default: none]
    #[arg(long = "proxy-protocol", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_protocol: Vec<u16>,

    /// Seconds to hold each new connection after its handshake, before the MTA can accept it; decimals allowed, at most 60, 0 = no hold [default: 1]
    #[arg(short, long, value_name = "SECONDS", value_parser = parse_wait,
          allow_negative_numbers = true)]
    pub wait: Option<Duration>,

    /// Seconds to hold new connections instead while under stress (the kernel's
    /// tables or the MTA's listen queue filling up; never longer than --wait) [default: 2]
    #[arg(long, value_name = "SECONDS", value_parser = parse_wait,
          allow_negative_numbers = true)]
    pub wait_under_stress: Option<Duration>,

    /// Fill (0 to 1) of the kernel's connection tables or of the MTA's listen
    /// queue at which stress begins; it ends below 80 % of this [default: 0.75]
    #[arg(long, value_name = "FRACTION", value_parser = parse_fraction)]
    pub stress_threshold: Option<f64>,

    /// Penalty box at XDP: an address that talked early N times within WINDOW
    /// has its SYNs refused for TTL, e.g. 3/10m:1h [default: off]
    #[arg(long, value_name = "N/WINDOW:TTL", value_parser = parse_penalty)]
    pub penalty: Option<Penalty>,

    /// How the penalty box refuses a SYN: a RST built at XDP, or a silent drop [default: rst]
    #[arg(long, value_enum)]
    pub penalty_action: Option<PenaltyAction>,

    /// Share passes and early talks with the other relays of the fleet through
    /// Redis or Valkey: redis://[:PASSWORD@]HOST:PORT/DB, rediss://… (TLS) or
    /// unix:///PATH [default: off]
    // Checked in Settings::build: clap's own error would repeat the value,
    // password included.
    #[arg(long, value_name = "URL")]
    pub shared_cache: Option<String>,

    /// What to do with an early talker [default: denysoft]
    #[arg(short, long, value_enum)]
    pub action: Option<Action>,

    /// Greet early talkers as usual; the MTA refuses their MAIL/RCPT with the
    /// deny/denysoft code (ask through --policy-* or --milter-*)
    #[arg(long)]
    pub defer_reject: bool,

    /// An early EHLO from a client that passed before (Exim's PIPECONNECT):
    /// known = log and let it through, deny = an early talker like any other
    /// [default: known if the MTA advertises PIPECONNECT, else deny]
    #[arg(long, value_enum)]
    pub pipeconnect: Option<Pipeconnect>,

    /// Format of the verdict lines on stdout [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Never hold, flag or act on clients in this network (CIDR or address; repeatable;
    /// added to the file's list)
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    pub allow: Vec<IpNet>,

    /// A client address that passed is not held again for this long (e.g. 1d, 12h, 0 = off) [default: 1d]
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub pass_ttl: Option<Duration>,

    /// Where the pass cache is saved across restarts [default: /var/lib/earlytalker]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Serve Postfix's policy delegation protocol on this unix socket (mode 0660)
    #[arg(long, value_name = "PATH")]
    pub policy_socket: Option<PathBuf>,

    /// Serve Postfix's policy delegation protocol on this TCP address (loopback only)
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_loopback)]
    pub policy_listen: Option<SocketAddr>,

    /// Serve a milter (Postfix smtpd_milters, Sendmail) on this unix socket (mode 0660)
    #[arg(long, value_name = "PATH")]
    pub milter_socket: Option<PathBuf>,

    /// Serve a milter on this TCP address (loopback only)
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_loopback)]
    pub milter_listen: Option<SocketAddr>,

    /// Group given the policy and milter unix sockets (e.g. postfix)
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9125)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Control socket for `earlytalker status` (mode 0600) [default: /run/earlytalker/control.sock]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Size of the kernel's connection table and of its half-open (SYN-ACK) table, each an LRU [default: 65536]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub max_connections: Option<u32>,

    /// Size of the kernel-to-agent event ring buffer in bytes (power of two, 4 KiB to 256 MiB; one verdict takes 168 bytes) [default: 1048576]
    #[arg(long, value_name = "BYTES", value_parser = parse_ring)]
    pub event_buffer: Option<u32>,

    /// More diagnostics on stderr, including the kernel programs' debug messages
    #[arg(short, long)]
    pub verbose: bool,

    /// How long a defer-reject verdict outlives its connection, for the MTA to
    /// finish the transaction [default: 30s] (for tests; hidden)
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl, hide = true)]
    pub close_grace: Option<Duration>,

    /// How often stale kernel entries are swept and the TRACKED filter's counts
    /// repaired [default: 30s] (for tests; hidden)
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl, hide = true)]
    pub sweep_every: Option<Duration>,

    /// Age at which every kind of kernel entry counts as stale, instead of
    /// each kind's own (for tests; hidden)
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl, hide = true)]
    pub stale_after: Option<Duration>,
}

/// A ring buffer size: a power of two from one page (4 KiB) to 256 MiB.
pub fn parse_ring(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of bytes"))?;
    if !n.is_power_of_two() || !(4096..=(256 << 20)).contains(&n) {
        return Err(format!(
            "'{s}' must be a power of two from 4096 to 268435456"
        ));
    }
    Ok(n)
}

/// The configuration file: every flag, by the same name with underscores.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub interfaces: Option<Vec<String>>,
    pub ports: Option<Vec<i64>>,
    pub proxy_protocol: Option<Vec<i64>>,
    pub wait: Option<f64>,
    pub wait_under_stress: Option<f64>,
    pub stress_threshold: Option<f64>,
    pub penalty: Option<String>,
    pub penalty_action: Option<PenaltyAction>,
    pub shared_cache: Option<String>,
    pub action: Option<Action>,
    pub defer_reject: Option<bool>,
    pub pipeconnect: Option<Pipeconnect>,
    pub log_format: Option<LogFormat>,
    pub allow: Option<Vec<String>>,
    pub pass_ttl: Option<TtlValue>,
    pub state_dir: Option<PathBuf>,
    pub policy_socket: Option<PathBuf>,
    pub policy_listen: Option<String>,
    pub milter_socket: Option<PathBuf>,
    pub milter_listen: Option<String>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub max_connections: Option<i64>,
    pub event_buffer: Option<i64>,
}

/// `pass_ttl = "1d"` or `pass_ttl = 86400` (seconds).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum TtlValue {
    Seconds(u64),
    Text(String),
}

/// Parses `--wait`: a non-negative decimal number of seconds.
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    wait_secs(v).map_err(|e| format!("'{s}' {e}"))
}

fn wait_secs(v: f64) -> Result<Duration, String> {
    if !v.is_finite() || v < 0.0 {
        return Err("must be a number of seconds >= 0".into());
    }
    if v > 3600.0 {
        return Err("seconds is absurdly long".into());
    }
    Ok(Duration::from_secs_f64(v))
}

/// The penalty box's rule: `n` early talks within `window` earn `ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Penalty {
    pub n: u32,
    #[serde(with = "humantime_serde_secs")]
    pub window: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub ttl: Duration,
}

/// Durations as seconds in the settings' serialized form.
mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PenaltyAction {
    /// Answer the SYN with a RST (the client fails at once, as at a closed port)
    Rst,
    /// Drop the SYN (the client retries, then times out)
    Drop,
}

/// Parses `--penalty N/WINDOW:TTL`, e.g. `3/10m:1h`.
pub fn parse_penalty(s: &str) -> Result<Penalty, String> {
    let bad = || format!("'{s}' is not N/WINDOW:TTL like 3/10m:1h");
    let (n, rest) = s.trim().split_once('/').ok_or_else(bad)?;
    let (window, ttl) = rest.split_once(':').ok_or_else(bad)?;
    let n: u32 = n.parse().map_err(|_| bad())?;
    let window = humantime::parse_duration(window).map_err(|_| bad())?;
    let ttl = humantime::parse_duration(ttl).map_err(|_| bad())?;
    if n == 0 || window.is_zero() || ttl.is_zero() {
        return Err(format!("'{s}': N, WINDOW and TTL must all be above 0"));
    }
    if ttl > Duration::from_secs(365 * 86_400) || window > Duration::from_secs(365 * 86_400) {
        return Err(format!("'{s}': at most a year"));
    }
    Ok(Penalty { n, window, ttl })
}

/// postscreen's stress wait (`${stress?{2}:{6}}s`).
pub const WAIT_UNDER_STRESS: Duration = Duration::from_secs(2);
pub const STRESS_THRESHOLD: f64 = 0.75;

/// Parses `--stress-threshold`: a fraction above 0, at most 1.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    fraction(v).map_err(|e| format!("'{s}' {e}"))
}

fn fraction(v: f64) -> Result<f64, String> {
    if !(v > 0.0 && v <= 1.0) {
        return Err("must be a fraction above 0 and at most 1".into());
    }
    Ok(v)
}

/// A pass-cache lifetime: "1d", "12h", "90m", "0".
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("'{s}' is not a duration like 1d or 12h ({e})"))?;
    if d > Duration::from_secs(365 * 86_400) {
        return Err(format!("'{s}' is longer than a year"));
    }
    Ok(d)
}

/// A network: CIDR, or a bare address meaning just that host.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    t.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{s}' is not a CIDR network (e.g. 192.0.2.0/24, 2001:db8::/32)"))
}

/// Parses a TCP listen address and insists on loopback: the policy and milter
/// answers must not be offered to the network.
pub fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an ADDR:PORT (e.g. 127.0.0.1:10040)"))?;
    if !a.ip().is_loopback() {
        return Err(format!("'{s}' is not a loopback address"));
    }
    Ok(a)
}

/// Reads and parses a configuration file; errors name the file and the problem.
pub fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.to_string();
        // toml's message spans lines (with a source excerpt); keep what names the problem.
        let first = msg.lines().last().unwrap_or("").trim();
        let line = e
            .span()
            .map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(0);
        anyhow::anyhow!("config {} line {line}: {first}", path.display())
    })
}

/// Settings in force, after file, flags, defaults and validation: what a reload
/// may change, and what is bound at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub live: Live,
    pub fixed: Fixed,
}

/// What a SIGHUP reload applies: the kernel's configuration maps and the
/// agent's verdict policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub ports: Vec<u16>,
    /// The watched ports behind a PROXY protocol balancer.
    pub proxy_ports: Vec<u16>,
    pub wait: Duration,
    /// The hold while under stress (at most `wait`), and where stress begins.
    pub wait_under_stress: Duration,
    pub stress_threshold: f64,
    pub action: Action,
    pub defer_reject: bool,
    pub allow: Vec<IpNet>,
    pub pass_ttl: Duration,
    /// None: decided by what the MTA advertises.
    pub pipeconnect: Option<Pipeconnect>,
}

/// What is bound at start-up (interfaces attached, maps sized, sockets bound,
/// logger set up): a reload that changes any of it is told so and keeps the
/// running value. Serialized only to name the fields that differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fixed {
    pub config: Option<PathBuf>,
    #[serde(rename = "interfaces")]
    pub ifaces: Vec<String>,
    pub log_format: LogFormat,
    pub state_dir: PathBuf,
    pub max_connections: u32,
    pub event_buffer: u32,
    pub verbose: bool,
    pub policy_socket: Option<PathBuf>,
    pub policy_listen: Option<SocketAddr>,
    pub milter_socket: Option<PathBuf>,
    pub milter_listen: Option<SocketAddr>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: PathBuf,
    pub close_grace: Duration,
    pub sweep_every: Duration,
    pub stale_after: Option<Duration>,
    /// The penalty box (its XDP program is attached only when set).
    pub penalty: Option<Penalty>,
    pub penalty_action: PenaltyAction,
    /// The fleet's shared cache (serialized masked).
    pub shared_cache: Option<crate::fleet::CacheUrl>,
}

impl Fixed {
    /// Names of the settings that differ from `new`, derived from the fields
    /// themselves (sorted), so none can be forgotten.
    pub fn changes(&self, new: &Fixed) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(new).unwrap_or_default(),
        );
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => a
                .into_iter()
                .filter(|(k, v)| b.get(k) != Some(v))
                .map(|(k, _)| k)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Default for `--close-grace`.
pub const CLOSE_GRACE: Duration = Duration::from_secs(30);

fn file_err(path: &Option<PathBuf>, what: &str, e: impl fmt::Display) -> anyhow::Error {
    let p = path.as_deref().map(Path::display);
    match p {
        Some(p) => anyhow::anyhow!("config {p}: {what}: {e}"),
        None => anyhow::anyhow!("{what}: {e}"),
    }
}

impl Settings {
    /// Merges flags over the file; `default_iface` is asked only when neither
    /// names an interface.
    pub fn build(
        cli: &RunArgs,
        file: Option<FileConfig>,
        default_iface: impl FnOnce() -> Result<String>,
    ) -> Result<Self> {
        let f = file.unwrap_or_default();
        let path = cli.config.clone();
        let fe = |what: &str, e: &dyn fmt::Display| file_err(&path, what, e);

        let mut ifaces = if cli.iface.is_empty() {
            f.interfaces.unwrap_or_default()
        } else {
            cli.iface.clone()
        };
        if ifaces.is_empty() {
            ifaces.push(default_iface()?);
        }
        dedup(&mut ifaces);

        let mut ports: Vec<u16> = if cli.port.is_empty() {
            let mut v = Vec::new();
            for p in f.ports.unwrap_or_else(|| vec![25]) {
                match u16::try_from(p) {
                    Ok(p) if p > 0 => v.push(p),
                    _ => return Err(fe("ports", &format!("{p} is not a TCP port (1-65535)"))),
                }
            }
            v
        } else {
            cli.port.clone()
        };
        if ports.is_empty() {
            return Err(fe("ports", &"the list is empty"));
        }
        dedup(&mut ports);
        let mut proxy_ports: Vec<u16> = if cli.proxy_protocol.is_empty() {
            let mut v = Vec::new();
            for p in f.proxy_protocol.unwrap_or_default() {
                match u16::try_from(p) {
                    Ok(p) if p > 0 => v.push(p),
                    _ => {
                        return Err(fe(
                            "proxy_protocol",
                            &format!("{p} is not a TCP port (1-65535)"),
                        ))
                    }
                }
            }
            v
        } else {
            cli.proxy_protocol.clone()
        };
        dedup(&mut proxy_ports);
        if let Some(p) = proxy_ports.iter().find(|p| !ports.contains(p)) {
            return Err(fe(
                "proxy_protocol",
                &format!("port {p} is not a watched port"),
            ));
        }

        let wait = match (cli.wait, f.wait) {
            (Some(w), _) => w,
            (None, Some(w)) => wait_secs(w).map_err(|e| fe("wait", &format!("{w} {e}")))?,
            (None, None) => Duration::from_secs(1),
        };
        let wait_under_stress = match (cli.wait_under_stress, f.wait_under_stress) {
            (Some(w), _) => w,
            (None, Some(w)) => {
                wait_secs(w).map_err(|e| fe("wait_under_stress", &format!("{w} {e}")))?
            }
            (None, None) => WAIT_UNDER_STRESS,
        };
        let stress_threshold = match (cli.stress_threshold, f.stress_threshold) {
            (Some(t), _) => t,
            (None, Some(t)) => {
                fraction(t).map_err(|e| fe("stress_threshold", &format!("{t} {e}")))?
            }
            (None, None) => STRESS_THRESHOLD,
        };

        let mut allow = Vec::new();
        for a in f.allow.unwrap_or_default() {
            allow.push(parse_net(&a).map_err(|e| fe("allow", &e))?);
        }
        allow.extend(cli.allow.iter().copied());
        dedup(&mut allow);
        if allow.len() > earlytalker_common::MAX_ALLOW as usize {
            return Err(fe(
                "allow",
                &format!("more than {} networks", earlytalker_common::MAX_ALLOW),
            ));
        }

        let pass_ttl = match (cli.pass_ttl, f.pass_ttl) {
            (Some(t), _) => t,
            (None, Some(TtlValue::Seconds(s))) => Duration::from_secs(s.min(365 * 86_400)),
            (None, Some(TtlValue::Text(t))) => parse_ttl(&t).map_err(|e| fe("pass_ttl", &e))?,
            (None, None) => Duration::from_secs(86_400),
        };

        let listen = |flag: Option<SocketAddr>,
                      file: Option<String>,
                      what: &str|
         -> Result<Option<SocketAddr>> {
            match (flag, file) {
                (Some(a), _) => Ok(Some(a)),
                (None, Some(s)) => parse_loopback(&s).map(Some).map_err(|e| fe(what, &e)),
                (None, None) => Ok(None),
            }
        };
        let policy_listen = listen(cli.policy_listen, f.policy_listen, "policy_listen")?;
        let milter_listen = listen(cli.milter_listen, f.milter_listen, "milter_listen")?;
        let metrics_listen = match (cli.metrics_listen, f.metrics_listen) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => Some(
                s.parse()
                    .map_err(|_| fe("metrics_listen", &format!("'{s}' is not an ADDR:PORT")))?,
            ),
            (None, None) => None,
        };
        let max_connections = match (cli.max_connections, f.max_connections) {
            (Some(n), _) => n,
            (None, Some(n)) => u32::try_from(n)
                .ok()
                .filter(|n| (64..=16_777_216).contains(n))
                .ok_or_else(|| fe("max_connections", &format!("{n} is not in 64..=16777216")))?,
            (None, None) => earlytalker_common::DEFAULT_MAX_CONNS,
        };

        let event_buffer = match (cli.event_buffer, f.event_buffer) {
            (Some(n), _) => n,
            (None, Some(n)) => parse_ring(&n.to_string()).map_err(|e| fe("event_buffer", &e))?,
            (None, None) => earlytalker_common::DEFAULT_EVENTS_BYTES,
        };

        Ok(Settings {
            live: Live {
                ports,
                proxy_ports,
                wait,
                wait_under_stress,
                stress_threshold,
                action: cli.action.or(f.action).unwrap_or(Action::Denysoft),
                defer_reject: cli.defer_reject || f.defer_reject.unwrap_or(false),
                allow,
                pass_ttl,
                pipeconnect: cli.pipeconnect.or(f.pipeconnect),
            },
            fixed: Fixed {
                config: cli.config.clone(),
                ifaces,
                log_format: cli.log_format.or(f.log_format).unwrap_or(LogFormat::Text),
                state_dir: cli
                    .state_dir
                    .clone()
                    .or(f.state_dir)
                    .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
                max_connections,
                event_buffer,
                verbose: cli.verbose,
                policy_socket: cli.policy_socket.clone().or(f.policy_socket),
                policy_listen,
                milter_socket: cli.milter_socket.clone().or(f.milter_socket),
                milter_listen,
                socket_group: cli.socket_group.clone().or(f.socket_group),
                metrics_listen,
                control_socket: cli
                    .control_socket
                    .clone()
                    .or(f.control_socket)
                    .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
                close_grace: cli.close_grace.unwrap_or(CLOSE_GRACE),
                sweep_every: cli
                    .sweep_every
                    .filter(|d| !d.is_zero())
                    .unwrap_or(crate::tracked::SWEEP_EVERY),
                stale_after: cli.stale_after,
                penalty: match (cli.penalty, f.penalty) {
                    (Some(p), _) => Some(p),
                    (None, Some(text)) => {
                        Some(parse_penalty(&text).map_err(|e| fe("penalty", &e))?)
                    }
                    (None, None) => None,
                },
                penalty_action: cli
                    .penalty_action
                    .or(f.penalty_action)
                    .unwrap_or(PenaltyAction::Rst),
                shared_cache: match (&cli.shared_cache, &f.shared_cache) {
                    (Some(text), _) => Some(
                        crate::fleet::CacheUrl::parse(text)
                            .map_err(|e| anyhow::anyhow!("--shared-cache: {e}"))?,
                    ),
                    (None, Some(text)) => Some(
                        crate::fleet::CacheUrl::parse(text).map_err(|e| fe("shared_cache", &e))?,
                    ),
                    (None, None) => None,
                },
            },
        })
    }

    /// Loads the file named by `--config` (if any) and merges.
    pub fn load(cli: &RunArgs, default_iface: impl FnOnce() -> Result<String>) -> Result<Self> {
        let file = match &cli.config {
            Some(p) => Some(load_file(p)?),
            None => None,
        };
        Self::build(cli, file, default_iface)
    }

    /// Refuses a wait the greeting-hold technique cannot deliver on this kernel.
    pub fn check_wait(&self, max: Duration, why: &str) -> Result<()> {
        if self.live.wait > max {
            bail!(
                "--wait {} exceeds the {:.1} s this kernel can hold a greeting ({why})",
                secs(self.live.wait),
                max.as_secs_f64()
            );
        }
        Ok(())
    }
}

impl Live {
    /// The kernel drops early talkers' bytes and their greeting.
    pub fn enforce(&self) -> bool {
        self.action != Action::Log && !self.defer_reject
    }

    /// The hold for new connections: the shorter one while under stress.
    pub fn wait_now(&self, stressed: bool) -> Duration {
        if stressed {
            self.wait.min(self.wait_under_stress)
        } else {
            self.wait
        }
    }

    /// What is done to an early talker, as logged.
    pub fn taken(&self) -> Taken {
        Taken::of(self.action, self.defer_reject)
    }

    /// Whether PIPECONNECT is let through, given whether the MTA advertises it
    /// (None: not known yet, e.g. the MTA is not up).
    pub fn pipeconnect_allowed(&self, advertised: Option<bool>) -> bool {
        match self.pipeconnect {
            Some(Pipeconnect::Known) => true,
            Some(Pipeconnect::Deny) => false,
            None => advertised == Some(true),
        }
    }
}

fn dedup<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v.drain(..) {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    *v = out;
}

/// Seconds as an operator would write them: "1", "0.5".
pub fn secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The longest hold before accept this kernel allows. A held request socket
/// retransmits its SYN-ACK after 1, 2, 4, … s and is dropped after
/// `tcp_synack_retries` of them, 2^(n+1) − 1 s after the SYN (63 s for the
/// default 5); keep 3 s of margin. A SYN cookie is good for at least 60 s (two
/// one-minute counter ticks), hence the ceiling.
pub fn max_wait_for_synack_retries(retries: u32) -> Duration {
    let life_ms = ((1u64 << retries.min(16).saturating_add(1)) - 1) * 1000;
    Duration::from_millis(life_ms.saturating_sub(3000).min(MAX_WAIT_COOKIE_MS))
}

/// How long a SYN cookie is surely still valid.
const MAX_WAIT_COOKIE_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("earlytalker").chain(args.iter().copied()))
    }

    fn settings(args: &[&str]) -> Result<Settings> {
        Settings::build(&parse(args)?.run, None, || Ok("eth9".into()))
    }

    fn with_file(args: &[&str], toml_text: &str) -> Result<Settings> {
        let file: FileConfig = toml::from_str(toml_text)?;
        let mut cli = parse(args)?.run;
        cli.config = Some("/etc/earlytalker/earlytalker.toml".into());
        Settings::build(&cli, Some(file), || Ok("eth9".into()))
    }

    #[test]
    fn defaults_follow_qpsmtpd_and_postscreen() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.live.wait, Duration::from_secs(1));
        assert_eq!(s.live.action, Action::Denysoft);
        assert!(!s.live.defer_reject);
        assert_eq!(s.fixed.log_format, LogFormat::Text);
        assert_eq!(s.fixed.ifaces, vec!["eth9"]);
        assert_eq!(s.live.ports, vec![25]);
        assert_eq!(s.live.pass_ttl, Duration::from_secs(86_400));
        assert_eq!(
            s.fixed.control_socket,
            PathBuf::from(DEFAULT_CONTROL_SOCKET)
        );
    }

    #[test]
    fn repeatable_flags_dedup() {
        let s = settings(&["-i", "a", "-i", "b", "-i", "a", "-p", "25", "-p", "587"]).unwrap();
        assert_eq!(s.fixed.ifaces, vec!["a", "b"]);
        assert_eq!(s.live.ports, vec![25, 587]);
    }

    #[test]
    fn actions_and_defer_reject() {
        let taken = |a: &[&str]| {
            let s = settings(a).unwrap();
            (s.live.taken().as_str(), s.live.enforce())
        };
        assert_eq!(taken(&[]), ("denysoft", true));
        assert_eq!(taken(&["-a", "deny"]), ("deny", true));
        assert_eq!(taken(&["-a", "log"]), ("log", false));
        assert_eq!(taken(&["--defer-reject"]), ("defer", false));
        assert_eq!(taken(&["-a", "deny", "--defer-reject"]), ("defer", false));
        assert_eq!(taken(&["-a", "log", "--defer-reject"]), ("log", false));
    }

    #[test]
    fn policy_listen_must_be_loopback() {
        assert!(parse_loopback("127.0.0.1:10040").is_ok());
        assert!(parse_loopback("[::1]:10040").is_ok());
        assert!(parse_loopback("0.0.0.0:10040").is_err());
        assert!(parse_loopback("10.0.0.1:10040").is_err());
        assert!(parse_loopback("localhost").is_err());
    }

    #[test]
    fn wait_accepts_decimals_and_zero() {
        assert_eq!(parse_wait("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("0").unwrap(), Duration::ZERO);
        assert_eq!(
            settings(&["--wait", "2.25"]).unwrap().live.wait,
            Duration::from_millis(2250)
        );
    }

    #[test]
    fn bad_flags_are_rejected() {
        for args in [
            &["--wait", "-1"][..],
            &["--wait", "abc"],
            &["--wait", "nan"],
            &["--wait", "inf"],
            &["--port", "0"],
            &["--port", "70000"],
            &["--port", "x"],
            &["--action", "maybe"],
            &["--log-format", "xml"],
            &["--allow", "10.0.0.0/33"],
            &["--allow", "example.com"],
            &["--pass-ttl", "forever"],
            &["--nosuch"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn allow_and_ttl_values() {
        let s = settings(&[
            "--allow",
            "192.0.2.7/24",
            "--allow",
            "2001:db8::1",
            "--pass-ttl",
            "12h",
        ])
        .unwrap();
        assert_eq!(s.live.allow[0].to_string(), "192.0.2.0/24");
        assert_eq!(s.live.allow[1].to_string(), "2001:db8::1/128");
        assert_eq!(s.live.pass_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(parse_ttl("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_ttl("1d").unwrap(), Duration::from_secs(86_400));
    }

    #[test]
    fn file_covers_flags_and_flags_override() {
        let toml_text = r#"
            interfaces = ["eth0", "eth1"]
            ports = [25, 587]
            wait = 2.5
            action = "deny"
            defer_reject = true
            log_format = "json"
            allow = ["198.51.100.0/24"]
            pass_ttl = "6h"
            state_dir = "/srv/et"
            policy_socket = "/run/et/policy"
            policy_listen = "127.0.0.1:10040"
            milter_socket = "/run/et/milter"
            milter_listen = "[::1]:10041"
            socket_group = "postfix"
            metrics_listen = "0.0.0.0:9125"
            control_socket = "/run/et/control"
            max_connections = 1024
        "#;
        let s = with_file(&[], toml_text).unwrap();
        assert_eq!(s.fixed.ifaces, vec!["eth0", "eth1"]);
        assert_eq!(s.live.ports, vec![25, 587]);
        assert_eq!(s.live.wait, Duration::from_millis(2500));
        assert_eq!(s.live.taken(), "defer");
        assert_eq!(s.fixed.log_format, LogFormat::Json);
        assert_eq!(s.live.allow.len(), 1);
        assert_eq!(s.live.pass_ttl, Duration::from_secs(6 * 3600));
        assert_eq!(s.fixed.state_dir, PathBuf::from("/srv/et"));
        assert_eq!(s.fixed.milter_listen, Some("[::1]:10041".parse().unwrap()));
        assert_eq!(
            s.fixed.metrics_listen,
            Some("0.0.0.0:9125".parse().unwrap())
        );
        assert_eq!(s.fixed.max_connections, 1024);
        let s = with_file(
            &[
                "-w",
                "0.5",
                "-a",
                "log",
                "-i",
                "lo",
                "--allow",
                "10.0.0.0/8",
            ],
            toml_text,
        )
        .unwrap();
        assert_eq!(
            (s.live.wait, s.live.action),
            (Duration::from_millis(500), Action::Log)
        );
        assert_eq!(s.fixed.ifaces, vec!["lo"]);
        // --allow adds to the file's list.
        assert_eq!(s.live.allow.len(), 2);
    }

    #[test]
    fn bad_file_values_are_clear_errors() {
        for (text, needle) in [
            ("ports = [0]", "ports: 0 is not a TCP port"),
            ("ports = [70000]", "ports: 70000 is not a TCP port"),
            ("ports = []", "ports: the list is empty"),
            ("wait = -1.0", "wait: -1"),
            (
                "allow = [\"10.0.0.0/33\"]",
                "allow: '10.0.0.0/33' is not a CIDR",
            ),
            ("pass_ttl = \"soon\"", "pass_ttl: 'soon' is not a duration"),
            (
                "policy_listen = \"0.0.0.0:1\"",
                "policy_listen: '0.0.0.0:1' is not a loopback",
            ),
            ("max_connections = 5", "max_connections: 5 is not in"),
            (
                "metrics_listen = \"nope\"",
                "metrics_listen: 'nope' is not an ADDR:PORT",
            ),
        ] {
            let e = with_file(&[], text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(
                e.starts_with("config /etc/earlytalker/earlytalker.toml: "),
                "{e}"
            );
        }
        // Unknown keys and wrong types are refused by the parser, with the line.
        let dir = std::env::temp_dir().join(format!("et-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, needle) in [
            (
                "wait = 1\nactoin = \"deny\"\n",
                "line 2: unknown field `actoin`",
            ),
            ("action = \"maybe\"\n", "line 1: unknown variant `maybe`"),
            ("wait = \"x\"\n", "line 1: invalid type"),
        ] {
            let p = dir.join("bad.toml");
            std::fs::write(&p, text).unwrap();
            let e = load_file(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stress_wait_is_never_longer_than_wait_and_its_threshold_a_fraction() {
        let s = settings(&["-w", "6"]).unwrap();
        assert_eq!(s.live.wait_now(false), Duration::from_secs(6));
        assert_eq!(s.live.wait_now(true), WAIT_UNDER_STRESS);
        assert_eq!(s.live.stress_threshold, STRESS_THRESHOLD);
        // Under stress the wait only shortens.
        let s = settings(&["-w", "1", "--wait-under-stress", "2"]).unwrap();
        assert_eq!(s.live.wait_now(true), Duration::from_secs(1));
        for bad in ["0", "1.5", "-0.2", "x"] {
            assert!(settings(&["--stress-threshold", bad]).is_err(), "{bad}");
        }
        let s = with_file(&[], "wait_under_stress = 0.5\nstress_threshold = 0.9\n").unwrap();
        assert_eq!(s.live.wait_now(true), Duration::from_millis(500));
        assert_eq!(s.live.stress_threshold, 0.9);
        assert!(with_file(&[], "stress_threshold = 2.0\n").is_err());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let file: FileConfig = toml::from_str(include_str!("../dist/earlytalker.toml")).unwrap();
        let mut cli = parse(&[]).unwrap().run;
        cli.config = Some("dist/earlytalker.toml".into());
        let s = Settings::build(&cli, Some(file), || Ok("eth0".into())).unwrap();
        // Safe first install: the shipped file only logs (the CLI default is
        // denysoft, see defaults_follow_qpsmtpd_and_postscreen).
        assert_eq!(s.live.action, Action::Log);
        assert_eq!(s.live.allow.len(), 2);
        assert_eq!(s.live.pass_ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn shared_cache_from_flag_or_file_masked_and_checked() {
        let s = with_file(&[], "shared_cache = \"redis://:pw1@10.0.0.5:6379/0\"\n").unwrap();
        let u = s.fixed.shared_cache.as_ref().unwrap();
        assert_eq!(u.to_string(), "redis://:****@10.0.0.5:6379/0");
        let flag = settings(&["--shared-cache", "unix:///run/redis.sock"]).unwrap();
        assert_eq!(
            flag.fixed.shared_cache.unwrap().to_string(),
            "unix:///run/redis.sock"
        );
        let e = with_file(&[], "shared_cache = \"memcache://:pw1@h/\"\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("shared_cache") && !e.contains("pw1"), "{e}");
        let e = format!(
            "{:#}",
            settings(&["--shared-cache", "redis//:pw1@h"]).unwrap_err()
        );
        assert!(
            e.starts_with("--shared-cache: ") && !e.contains("pw1"),
            "{e}"
        );
        // A change of URL needs a restart, and is named without the password.
        let mut b = s.clone();
        b.fixed.shared_cache = None;
        assert_eq!(s.fixed.changes(&b.fixed), vec!["shared_cache"]);
    }

    #[test]
    fn proxy_protocol_ports_must_be_watched() {
        let s = settings(&["-p", "25", "-p", "587", "--proxy-protocol", "587"]).unwrap();
        assert_eq!(s.live.proxy_ports, vec![587]);
        let e = format!("{:#}", settings(&["--proxy-protocol", "587"]).unwrap_err());
        assert!(e.contains("port 587 is not a watched port"), "{e}");
        let s = with_file(&[], "proxy_protocol = [25]\n").unwrap();
        assert_eq!(s.live.proxy_ports, vec![25]);
        assert!(with_file(&[], "proxy_protocol = [0]\n").is_err());
        assert!(settings(&[]).unwrap().live.proxy_ports.is_empty());
    }

    #[test]
    fn shipped_example_settings_commented_out_are_valid_too() {
        let text: String = include_str!("../dist/earlytalker.toml")
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if ["penalty", "shared_cache", "proxy_protocol"]
                        .iter()
                        .any(|k| rest.starts_with(k)) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: FileConfig = toml::from_str(&text).unwrap();
        let cli = parse(&[]).unwrap().run;
        let s = Settings::build(&cli, Some(file), || Ok("eth0".into())).unwrap();
        assert!(s.fixed.penalty.is_some());
        assert!(s.fixed.shared_cache.is_some());
        assert_eq!(s.live.proxy_ports, vec![25]);
    }

    #[test]
    fn reload_names_what_needs_a_restart() {
        let a = settings(&[]).unwrap();
        let mut b = a.clone();
        b.live.wait = Duration::ZERO;
        b.live.action = Action::Deny;
        assert!(a.fixed.changes(&b.fixed).is_empty());
        b.fixed.ifaces = vec!["other".into()];
        b.fixed.log_format = LogFormat::Json;
        assert_eq!(a.fixed.changes(&b.fixed), vec!["interfaces", "log_format"]);
        // Every restart-only field is compared, including those a hand-written
        // list once forgot.
        let mut c = a.clone();
        c.fixed.event_buffer *= 2;
        c.fixed.close_grace = Duration::from_secs(1);
        assert_eq!(
            a.fixed.changes(&c.fixed),
            vec!["close_grace", "event_buffer"]
        );
    }

    #[test]
    fn max_wait_follows_the_synack_retry_budget() {
        assert_eq!(max_wait_for_synack_retries(5), Duration::from_secs(60));
        assert_eq!(max_wait_for_synack_retries(2), Duration::from_secs(4));
        assert_eq!(max_wait_for_synack_retries(1), Duration::ZERO);
        assert_eq!(max_wait_for_synack_retries(9), Duration::from_secs(60));
        let s = settings(&["-w", "61"]).unwrap();
        let e = s
            .check_wait(max_wait_for_synack_retries(5), "x")
            .unwrap_err();
        assert!(
            e.to_string().contains("--wait 61 exceeds the 60.0 s"),
            "{e}"
        );
        settings(&["-w", "60"])
            .unwrap()
            .check_wait(max_wait_for_synack_retries(5), "x")
            .unwrap();
    }

    #[test]
    fn secs_formats_briefly() {
        assert_eq!(secs(Duration::from_secs(1)), "1");
        assert_eq!(secs(Duration::from_millis(500)), "0.5");
        assert_eq!(secs(Duration::ZERO), "0");
    }
}
