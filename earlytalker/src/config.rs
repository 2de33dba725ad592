//! Command line and the settings derived from it. Pure: no I/O, unit-tested.

use clap::{Parser, ValueEnum};
use std::{fmt, time::Duration};

/// What to do with an early talker (qpsmtpd's `check_earlytalker` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per verdict for people, modelled on postscreen's.
    Text,
    /// One JSON object per line.
    Json,
}

/// Catch SMTP clients that talk before the server's greeting, in the kernel,
/// in front of any unmodified MTA.
#[derive(Parser, Debug, Clone)]
#[command(name = "earlytalker", version, about, long_about = None)]
pub struct Cli {
    /// Interface to watch (repeatable) [default: the interface of the default route]
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub iface: Vec<String>,

    /// Server TCP port to watch (repeatable) [default: 25]
    #[arg(short, long = "port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Seconds to hold the greeting after the handshake; decimals allowed, 0 = no hold
    #[arg(short, long, value_name = "SECONDS", default_value = "1",
          value_parser = parse_wait, allow_negative_numbers = true)]
    pub wait: Duration,

    /// What to do with an early talker
    #[arg(short, long, value_enum, default_value_t = Action::Denysoft)]
    pub action: Action,

    /// Greet early talkers as usual; the MTA refuses their MAIL/RCPT with the
    /// deny/denysoft code
    #[arg(long)]
    pub defer_reject: bool,

    /// Format of the verdict lines on stdout
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Postfix's policy delegation protocol on this unix socket (mode 0660)
    #[arg(long, value_name = "PATH")]
    pub policy_socket: Option<std::path::PathBuf>,

    /// Serve Postfix's policy delegation protocol on this TCP address (loopback only)
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_loopback)]
    pub policy_listen: Option<std::net::SocketAddr>,

    /// Serve a milter (Postfix smtpd_milters, Sendmail) on this unix socket (mode 0660)
    #[arg(long, value_name = "PATH")]
    pub milter_socket: Option<std::path::PathBuf>,

    /// Serve a milter on this TCP address (loopback only)
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_loopback)]
    pub milter_listen: Option<std::net::SocketAddr>,

    /// Group given the policy and milter unix sockets (e.g. postfix)
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Size of the connection table in the kernel (LRU; entries live until the greeting)
    #[arg(long, value_name = "N", default_value = "65536",
          value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub max_connections: u32,

    /// More diagnostics on stderr, including the kernel programs' debug messages
    #[arg(short, long)]
    pub verbose: bool,
}

/// Parses a TCP listen address and insists on loopback: the policy answers must
/// not be offered to the network.
pub fn parse_loopback(s: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an ADDR:PORT (e.g. 127.0.0.1:10040)"))?;
    if !a.ip().is_loopback() {
        return Err(format!("'{s}' is not a loopback address"));
    }
    Ok(a)
}

/// Parses `--wait`: a non-negative decimal number of seconds.
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("'{s}' must be a number of seconds >= 0"));
    }
    if v > 3600.0 {
        return Err(format!("'{s}' seconds is absurdly long"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Settings in force, after defaults and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub ifaces: Vec<String>,
    pub ports: Vec<u16>,
    pub wait: Duration,
    pub action: Action,
    pub defer_reject: bool,
    pub log_format: LogFormat,
    pub max_connections: u32,
    pub verbose: bool,
    pub policy_socket: Option<std::path::PathBuf>,
    pub policy_listen: Option<std::net::SocketAddr>,
    pub milter_socket: Option<std::path::PathBuf>,
    pub milter_listen: Option<std::net::SocketAddr>,
    pub socket_group: Option<String>,
}

impl Settings {
    /// Applies defaults; `default_iface` is asked only when no `--iface` was given.
    pub fn from_cli(
        cli: Cli,
        default_iface: impl FnOnce() -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let mut ifaces = cli.iface;
        if ifaces.is_empty() {
            ifaces.push(default_iface()?);
        }
        dedup(&mut ifaces);
        let mut ports = cli.port;
        if ports.is_empty() {
            ports.push(25);
        }
        dedup(&mut ports);
        Ok(Settings {
            ifaces,
            ports,
            wait: cli.wait,
            action: cli.action,
            defer_reject: cli.defer_reject,
            log_format: cli.log_format,
            max_connections: cli.max_connections,
            verbose: cli.verbose,
            policy_socket: cli.policy_socket,
            policy_listen: cli.policy_listen,
            milter_socket: cli.milter_socket,
            milter_listen: cli.milter_listen,
            socket_group: cli.socket_group,
        })
    }

    /// The kernel drops early talkers' bytes and their greeting.
    pub fn enforce(&self) -> bool {
        self.action != Action::Log && !self.defer_reject
    }

    /// What is done to an early talker, as logged.
    pub fn taken(&self) -> &'static str {
        match (self.action, self.defer_reject) {
            (Action::Log, _) => "log",
            (_, true) => "defer",
            (Action::Deny, false) => "deny",
            (Action::Denysoft, false) => "denysoft",
        }
    }

    /// Refuses a wait the greeting-hold technique cannot deliver on this kernel.
    pub fn check_wait(&self, max: Duration, why: &str) -> anyhow::Result<()> {
        if self.wait > max {
            anyhow::bail!(
                "--wait {} exceeds the {:.1} s this kernel can hold a greeting ({why})",
                secs(self.wait),
                max.as_secs_f64()
            );
        }
        Ok(())
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

/// The longest hold the TC-drop technique supports: TCP re-sends a locally dropped
/// segment every 500 ms and aborts after `tcp_retries2` such probes, so keep a
/// one-second margin below that (measured: 15 retries -> abort at ~7.5 s).
pub fn max_wait_for_retries(tcp_retries2: u32) -> Duration {
    let ms = u64::from(tcp_retries2) * 500;
    Duration::from_millis(ms.saturating_sub(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("earlytalker").chain(args.iter().copied()))
    }

    fn settings(args: &[&str]) -> anyhow::Result<Settings> {
        Settings::from_cli(parse(args)?, || Ok("eth9".into()))
    }

    #[test]
    fn defaults_follow_qpsmtpd() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.wait, Duration::from_secs(1));
        assert_eq!(c.action, Action::Denysoft);
        assert!(!c.defer_reject);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn log_settings_fill_defaults() {
        let s = settings(&["-a", "log"]).unwrap();
        assert_eq!(s.ifaces, vec!["eth9"]);
        assert_eq!(s.ports, vec![25]);
        let s = settings(&[
            "-a", "log", "-i", "a", "-i", "b", "-i", "a", "-p", "25", "-p", "587",
        ])
        .unwrap();
        assert_eq!(s.ifaces, vec!["a", "b"]);
        assert_eq!(s.ports, vec![25, 587]);
    }

    #[test]
    fn actions_and_defer_reject() {
        let taken = |a: &[&str]| {
            let s = settings(a).unwrap();
            (s.taken(), s.enforce())
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
            parse(&["--wait", "2.25"]).unwrap().wait,
            Duration::from_millis(2250)
        );
    }

    #[test]
    fn bad_values_are_rejected() {
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
            &["--nosuch"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn max_wait_follows_tcp_retries2() {
        assert_eq!(max_wait_for_retries(15), Duration::from_millis(6500));
        assert_eq!(max_wait_for_retries(8), Duration::from_secs(3));
        assert_eq!(max_wait_for_retries(1), Duration::ZERO);
        let s = settings(&["-a", "log", "-w", "60"]).unwrap();
        let e = s.check_wait(max_wait_for_retries(15), "x").unwrap_err();
        assert!(e.to_string().contains("--wait 60 exceeds the 6.5 s"), "{e}");
        settings(&["-a", "log", "-w", "6.5"])
            .unwrap()
            .check_wait(max_wait_for_retries(15), "x")
            .unwrap();
    }

    #[test]
    fn secs_formats_briefly() {
        assert_eq!(secs(Duration::from_secs(1)), "1");
        assert_eq!(secs(Duration::from_millis(500)), "0.5");
        assert_eq!(secs(Duration::ZERO), "0");
    }
}
