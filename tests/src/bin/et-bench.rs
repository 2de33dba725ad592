//! `cargo xtask bench`: figures measured side by side in one run, on veth between
//! network namespaces, with the real agent. Prints a table and writes JSON.
//! Every loop is bounded in count and time.

use anyhow::{bail, Context, Result};
use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
use earlytalker_tests::*;
use serde_json::{json, Value};
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn main() {
    if !is_root() {
        eprintln!("et-bench needs root (BPF, network namespaces)");
        std::process::exit(2);
    }
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("et-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// (run_time_ns, run_count) of the loaded programs matching `pick`.
fn prog_stats(pick: impl Fn(&aya::programs::ProgramInfo) -> bool) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| pick(p))
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos() as u64, c + p.run_count())
        })
}

/// Each of our programs and the empty program on the same hook.
#[derive(Clone, Copy)]
struct Stats {
    ingress: (u64, u64),
    egress: (u64, u64),
    floor_in: (u64, u64),
    floor_eg: (u64, u64),
}

/// The agent's programs, or the lower bound's (`bound.rs` in the kernel crate).
const OURS: (&str, &str) = ("et_ingress", "et_egress");
const BOUND: (&str, &str) = ("et_lb_ingress", "et_lb_egress");

fn snapshot(progs: (&'static str, &'static str), floor_ids: (u32, u32)) -> Stats {
    let named = |n: &'static str| move |p: &aya::programs::ProgramInfo| p.name_as_str() == Some(n);
    Stats {
        ingress: prog_stats(named(progs.0)),
        egress: prog_stats(named(progs.1)),
        floor_in: prog_stats(|p| p.id() == floor_ids.0),
        floor_eg: prog_stats(|p| p.id() == floor_ids.1),
    }
}

fn per_packet(a: (u64, u64), b: (u64, u64)) -> f64 {
    let (t, c) = (b.0 - a.0, b.1 - a.1);
    if c == 0 {
        0.0
    } else {
        t as f64 / c as f64
    }
}

fn sum(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

/// The figures for one kind of traffic, from the snapshots around it.
fn cost_between(a: &Stats, b: &Stats, target: f64) -> Value {
    let prog = |x: (u64, u64), y: (u64, u64), fx: (u64, u64), fy: (u64, u64)| {
        let (ours, floor) = (per_packet(x, y), per_packet(fx, fy));
        json!({"ours_ns": ours, "floor_ns": floor, "ratio": ours / floor, "packets": y.1 - x.1})
    };
    let mut v = prog(
        sum(a.ingress, a.egress),
        sum(b.ingress, b.egress),
        sum(a.floor_in, a.floor_eg),
        sum(b.floor_in, b.floor_eg),
    );
    v["target_ratio"] = json!(target);
    v["et_ingress"] = prog(a.ingress, b.ingress, a.floor_in, b.floor_in);
    v["et_egress"] = prog(a.egress, b.egress, a.floor_eg, b.floor_eg);
    v
}

/// Minimal polite sessions (greeting, EHLO, QUIT), nothing else: every packet's
/// share of the per-connection work is as large as it gets.
fn churn(lab: &Lab, port: u16, sessions: usize) -> Result<()> {
    let s = SocketAddr::new(lab.server_addr(false), port);
    for chunk in 0..(sessions / 25) {
        let hs: Vec<_> = (0..25)
            .map(|_| lab.in_client(move || session(s, &Manner::Polite)))
            .collect();
        for h in hs {
            join(h)?.with_context(|| format!("session batch {chunk}"))?;
        }
    }
    Ok(())
}

/// Figure 1: per-packet cost of each of our programs next to an empty program on
/// the same hook, on real SMTP (smtp-source to smtp-sink: EHLO, MAIL, RCPT, DATA
/// with a 1 KiB message, QUIT) to port 25 and to an unwatched port, and on
/// connection churn to port 25. In each round the lower bound (`et_lb_*`: the
/// least any design keeping per-connection state does) then carries the same
/// port 25 traffic with the agent stopped, next to the same empty programs.
fn per_packet_cost() -> Result<Value> {
    let lab = Lab::new()?;
    let sinks = vec![smtp_sink(&lab, 25, None)?, smtp_sink(&lab, 2525, None)?];
    // The floor: et_floor from the same object, loaded once per hook so that each
    // direction has its own figures, first in the chain (it returns TCX_NEXT, so
    // ours still run after it).
    let floors = attach_floors(&lab)?;
    let ids = (floors[0].1, floors[1].1);
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let (smtp_sessions, churn_sessions) = (2000, 500);
    let smtp = |port| smtp_source_to(&lab, port, 20, smtp_sessions, None);
    // Measure each kind of traffic on its own, in rounds: the map work is
    // memory-bound and swings with the shared host's load more than the empty
    // program does, so each figure is the round with the median ratio.
    let mut rounds: [Vec<Value>; 5] = Default::default();
    for round in 0..PER_PACKET_ROUNDS {
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0"])?;
        if round == 0 {
            smtp(2525)?; // warm-up
        }
        let a = snapshot(OURS, ids);
        smtp(2525)?;
        let b = snapshot(OURS, ids);
        smtp(25)?;
        let c = snapshot(OURS, ids);
        churn(&lab, 25, churn_sessions)?;
        let d = snapshot(OURS, ids);
        agent.stop()?;
        rounds[0].push(cost_between(&a, &b, 1.2));
        rounds[1].push(cost_between(&b, &c, 3.0));
        rounds[2].push(cost_between(&c, &d, 4.0));
        let bound = attach_bound(&lab)?;
        let e = snapshot(BOUND, ids);
        smtp(25)?;
        let f = snapshot(BOUND, ids);
        churn(&lab, 25, churn_sessions)?;
        let g = snapshot(BOUND, ids);
        drop(bound);
        rounds[3].push(cost_between(&e, &f, 3.0));
        rounds[4].push(cost_between(&f, &g, 4.0));
    }
    drop(floors);
    // The penalty box's XDP program, in a phase of its own: native XDP on a
    // veth changes how the TC programs' packets arrive, so it must not run
    // during their rounds.
    let xdp = xdp_cost(&lab)?;
    drop(sinks);
    let [other, port25, churned, bound25, bound_churn] = rounds.map(median_round);
    Ok(json!({
        "other_traffic": other, "port25_traffic": port25, "port25_churn": churned,
        "bound_port25_traffic": bound25, "bound_port25_churn": bound_churn,
        "xdp_penalty_box": xdp,
        "smtp_sessions": smtp_sessions, "churn_sessions": churn_sessions,
        "rounds": PER_PACKET_ROUNDS,
    }))
}

/// et_floor, loaded once per hook (each direction has its own figures) and
/// attached first in the server's chain. Dropping the objects detaches them.
fn attach_floors(lab: &Lab) -> Result<Vec<(aya::Ebpf, u32)>> {
    let obj = kernel_object();
    let dev = lab.server_if.clone();
    join(lab.in_server(move || -> Result<Vec<(aya::Ebpf, u32)>> {
        let mut out = Vec::new();
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let mut ebpf = aya::Ebpf::load(obj)?;
            let p: &mut SchedClassifier = ebpf
                .program_mut("et_floor")
                .context("et_floor")?
                .try_into()?;
            p.load()?;
            p.attach_with_options(&dev, t, TcAttachOptions::TcxOrder(LinkOrder::first()))?;
            let id = p.info()?.id();
            out.push((ebpf, id));
        }
        Ok(out)
    }))?
}

/// The lower bound's two programs, sharing one load of the object (and so its
/// maps, sized as the agent sizes CONNS and TRACKED by default), last in the
/// server's chain, watching port 25. Dropping the object detaches them.
fn attach_bound(lab: &Lab) -> Result<aya::Ebpf> {
    const SIZES: &[(&str, u32)] = &[
        ("LB_CONNS", earlytalker_common::DEFAULT_MAX_CONNS),
        ("LB_FILTER", earlytalker_common::TRACKED_BUCKETS),
    ];
    let obj = kernel_object();
    let dev = lab.server_if.clone();
    join(lab.in_server(move || -> Result<aya::Ebpf> {
        let mut loader = aya::EbpfLoader::new();
        for (m, n) in SIZES {
            loader.map_max_entries(m, *n);
        }
        let mut ebpf = loader.load(obj)?;
        let mut ports: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(ebpf.map_mut("PORTS").context("PORTS")?)?;
        ports.set(0, 1 << 25, 0)?;
        for (name, hook) in [
            ("et_lb_ingress", TcAttachType::Ingress),
            ("et_lb_egress", TcAttachType::Egress),
        ] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
            p.attach_with_options(&dev, hook, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
        }
        Ok(ebpf)
    }))?
}

/// et_xdp (attached by an agent with a penalty configured) against an empty
/// XDP program, on one round of real SMTP to port 25 and to another port.
fn xdp_cost(lab: &Lab) -> Result<Value> {
    // With a penalty configured, the agent attaches et_xdp too: its cost on
    // every packet the server receives is measured alongside.
    let mut agent = Agent::start(lab, &["-a", "log", "-w", "0", "--penalty", "3/10m:1h"])?;
    // An interface takes one XDP program: the empty one runs on the client's
    // end of the veth instead (on the server's packets; an XDP program's
    // floor does not depend on the packet).
    let cdev = lab.client_if.clone();
    let xdp_floor = join(lab.in_client(move || -> Result<(aya::Ebpf, u32)> {
        let mut ebpf = aya::Ebpf::load(kernel_object())?;
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut("et_xdp_floor")
            .context("et_xdp_floor")?
            .try_into()?;
        p.load()?;
        p.attach(&cdev, aya::programs::xdp::XdpMode::Driver)?;
        let id = p.info()?.id();
        Ok((ebpf, id))
    }))??;
    let xdp_floor_id = xdp_floor.1;
    let xdp_stats = || {
        (
            prog_stats(|p| p.name_as_str() == Some("et_xdp")),
            prog_stats(|p| p.id() == xdp_floor_id),
        )
    };
    let smtp = |port| smtp_source_to(lab, port, 20, 2000, None);
    let a = xdp_stats();
    smtp(25)?;
    smtp(2525)?;
    let b = xdp_stats();
    drop(xdp_floor);
    agent.stop()?;
    let (ours, floor) = (per_packet(a.0, b.0), per_packet(a.1, b.1));
    Ok(
        json!({"ours_ns": ours, "floor_ns": floor, "ratio": ours / floor,
        "packets": b.0 .1 - a.0 .1}),
    )
}

const PER_PACKET_ROUNDS: usize = 5;

/// The round whose overall ratio is the median, with the range over all rounds.
fn median_round(mut rounds: Vec<Value>) -> Value {
    let ratio = |v: &Value| v["ratio"].as_f64().unwrap_or(f64::NAN);
    rounds.sort_by(|x, y| ratio(x).total_cmp(&ratio(y)));
    let range = [ratio(&rounds[0]), ratio(&rounds[rounds.len() - 1])];
    let mut m = rounds[rounds.len() / 2].clone();
    m["ratio_range"] = json!(range);
    m
}

/// A child process killed when dropped, so that a figure failing half-way
/// leaves no smtp-sink behind in a deleted namespace.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec NS`, pinned to one CPU if asked.
fn in_netns(ns: &str, cpu: Option<usize>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).envs(postfix_env());
    if let Some(cpu) = cpu {
        c.args(["taskset", "-c", &cpu.to_string()]);
    }
    c
}

/// Runs smtp-source in the client namespace: `msgs` sessions of one 1 KiB message
/// each, `sessions` at a time. Returns its wall time.
fn smtp_source_to(
    lab: &Lab,
    port: u16,
    sessions: u32,
    msgs: u32,
    cpu: Option<usize>,
) -> Result<Duration> {
    let t = Instant::now();
    let st = in_netns(&lab.client_ns, cpu)
        .args(["timeout", "120", "smtp-source"])
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &msgs.to_string(),
            "-l",
            "1024",
        ])
        .args(["-f", "a@client.example", "-t", "b@lab.example"])
        .arg(format!("{SERVER_V4}:{port}"))
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("smtp-source failed: {st}");
    }
    Ok(t.elapsed())
}

fn smtp_sink(lab: &Lab, port: u16, cpu: Option<usize>) -> Result<Reaped> {
    let c = in_netns(&lab.server_ns, cpu)
        .args(["smtp-sink", "-u", "nobody"])
        .arg(format!("{SERVER_V4}:{port}"))
        .arg("1024")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Reaped(c))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of all of a process's threads so far, in nanoseconds from each
/// thread's schedstat (the clock-tick counts in /proc/PID/stat are too coarse for
/// a few microseconds per session).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Busy CPU time of the whole machine so far (all but idle and iowait), from
/// /proc/stat.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let busy = f.iter().sum::<u64>() - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v.max(1) as u64);
    Duration::from_millis(busy * 1000 / hz)
}

/// The agent as deployed: its log lines go to a file (as they would to
/// journald), read only after the measurement, so that the bench's own parsing
/// of them is not counted against the agent.
struct FileAgent {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl FileAgent {
    fn start(lab: &Lab, args: &[&str], log: std::path::PathBuf) -> Result<Self> {
        // The default text format, as an operator runs it.
        let child = agent_command(lab, args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()?;
        let agent = FileAgent { child, log };
        let end = Instant::now() + Duration::from_secs(20);
        while agent.count("STARTED ") == 0 {
            if Instant::now() > end {
                bail!("agent did not start within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    /// Lines containing `what`.
    fn count(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    fn stop(&mut self) -> Result<()> {
        stop_agent(&mut self.child).map(drop)
    }
}

impl Drop for FileAgent {
    fn drop(&mut self) {
        // Already stopped, or a figure failed half-way: nothing may stay attached.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same smtp-source load on both labs at once; elapsed time of each.
fn smtp_source_pair(labs: &[Lab; 2], sessions: u32, msgs: u32) -> Result<[Duration; 2]> {
    std::thread::scope(|s| {
        let runs = labs
            .each_ref()
            .map(|lab| s.spawn(move || smtp_source_to(lab, 25, sessions, msgs, pair_cpus()[0])));
        let [a, b] = runs.map(|h| h.join().map_err(|_| anyhow::anyhow!("smtp-source thread")));
        Ok([a??, b??])
    })
}

/// Where the paired labs' clients and servers run: both clients on one CPU and both
/// servers on the other, so that each lab gets the same mix of the two (virtual
/// CPUs of a shared host run at different speeds from moment to moment). With a
/// single CPU there is nothing to pin.
fn pair_cpus() -> [Option<usize>; 2] {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() >= 2 => [Some(0), Some(1)],
        _ => [None, None],
    }
}

/// Quartiles (25 %, 50 %, 75 %) of a sample.
fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    [q(0.25), q(0.5), q(0.75)]
}

/// Figure 2: SMTP session rate, smtp-source against smtp-sink, with and without the
/// agent.
///
/// Paired: two identical labs carry the same load at the same time, the agent on
/// one of them, on A and B in turn so that any difference between the labs cancels.
/// On 2 shared cores the machine's speed swings by ±15 % from one second to the
/// next, so back-to-back runs cannot resolve a few per cent; both labs of a pair
/// feel the same swing. Calibration rounds with no agent measure what is left of
/// the method's own noise. The scheduler takes the agent's CPU from both labs
/// alike, so it is charged back to the lab it serves: its CPU time, converted at
/// that lab's share of the machine, is added to that lab's elapsed time.
fn session_rate() -> Result<Value> {
    let labs = [Lab::new()?, Lab::new()?];
    let _sinks = [
        smtp_sink(&labs[0], 25, pair_cpus()[1])?,
        smtp_sink(&labs[1], 25, pair_cpus()[1])?,
    ];
    let (parallel, msgs, calibration, rounds) = (10, 10_000, 4, 24);
    smtp_source_pair(&labs, parallel, 2000)?; // warm-up
    let mut null = Vec::new();
    for _ in 0..calibration {
        let [a, b] = smtp_source_pair(&labs, parallel, msgs)?;
        null.push(a.as_secs_f64() / b.as_secs_f64());
    }
    let (mut with, mut without, mut ratios, mut raw) = (vec![], vec![], vec![], vec![]);
    let mut agent_cpu = Duration::ZERO;
    for round in 0..rounds {
        let (w, wo) = (round % 2, 1 - round % 2);
        let log = labs[w].state_dir().with_file_name("agent.log");
        std::fs::create_dir_all(log.parent().context("lab directory")?)?;
        let mut agent = FileAgent::start(&labs[w], &["-a", "log", "-w", "0"], log)?;
        let (cpu0, busy0) = (cpu_time(agent.child.id()), machine_busy());
        let t = smtp_source_pair(&labs, parallel, msgs)?;
        let cpu = cpu_time(agent.child.id()).saturating_sub(cpu0);
        let busy = machine_busy().saturating_sub(busy0);
        agent.stop()?;
        // Every session must have had its verdict logged: the agent kept up.
        let passes = agent.count(" PASS greeting after ");
        if passes < msgs as usize {
            bail!("only {passes} of {msgs} sessions had a verdict");
        }
        agent_cpu += cpu;
        let (tw, two) = (t[w].as_secs_f64(), t[wo].as_secs_f64());
        // Cores one lab kept busy: the machine's busy time less the agent's, halved.
        let share = ((busy.as_secs_f64() - cpu.as_secs_f64()) / 2.0 / tw.max(two)).clamp(0.1, 1.0);
        with.push(f64::from(msgs) / tw);
        without.push(f64::from(msgs) / two);
        raw.push(two / tw);
        ratios.push(two / (tw + cpu.as_secs_f64() / share));
    }
    let [r25, r50, r75] = quartiles(ratios.clone());
    let [n25, n50, n75] = quartiles(null);
    Ok(json!({
        "sessions_per_s_without": median(without), "sessions_per_s_with": median(with),
        "ratio": r50, "ratio_q1": r25, "ratio_q3": r75, "target_ratio": 0.97,
        "ratio_before_charging_agent": median(raw), "round_ratios": ratios,
        "calibration_ratio": n50, "calibration_q1": n25, "calibration_q3": n75,
        "parallel_per_lab": parallel, "sessions_per_round": msgs, "rounds": rounds,
        "calibration_rounds": calibration,
        "agent_cpu_us_per_session": agent_cpu.as_secs_f64() * 1e6 / (f64::from(msgs) * rounds as f64),
    }))
}

/// A polite client for the hold figures: (greeting lateness after `wait`, in
/// ms, measured from connect() returning), or None if never greeted.
fn held_client(server: SocketAddr, wait: f64) -> Option<f64> {
    use std::io::{BufRead, BufReader, Write};
    let c = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(20)).ok()?;
    let t0 = Instant::now();
    c.set_read_timeout(Some(Duration::from_secs_f64(wait + 30.0)))
        .ok()?;
    let mut r = BufReader::new(c.try_clone().ok()?);
    let mut l = String::new();
    r.read_line(&mut l).ok().filter(|n| *n > 0)?;
    let late = (t0.elapsed().as_secs_f64() - wait) * 1e3;
    let mut w = c;
    let _ = w.write_all(b"QUIT\r\n");
    Some(late)
}

/// Request sockets (SYN-RECV) in the server namespace, by sock_diag (`ss`), and
/// the size of one (`request_sock_TCP` in /proc/slabinfo).
fn request_socks(lab: &Lab) -> (u64, u64) {
    let n = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server_ns,
            "ss",
            "-Htn",
            "state",
            "syn-recv",
        ])
        .output()
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout).lines().count() as u64
        });
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let size = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() > 3 && c[0] == "request_sock_TCP")
        .and_then(|c| c[3].parse().ok())
        .unwrap_or(0);
    (n, size)
}

/// Figure 5: the hold before accept. `n` polite clients connect at once and are
/// all held (the wait outlasts the burst of connects); each greeting's lateness
/// after the wait, and the server side's memory while they are held: request
/// sockets (SYN cookies cost none), the agent's growth, the MTA's (none: it has
/// accepted nothing, see the suite's Postfix test).
///
/// `burst`: all connect at once (their deadlines fall together, and the greetings
/// come as fast as the MTA accepts); otherwise they arrive evenly over 80 % of the
/// wait, so that all `n` are held at once at the end and each is released alone.
fn hold_figures(n: usize, burst: bool) -> Result<Value> {
    let lab = Lab::new()?;
    let _r = Responder::start_with(
        &lab,
        Listen {
            backlog: 4096,
            ..Listen::new(25)
        },
    )?;
    let wait = if n > 1 { 5.0 } else { 1.0 };
    let w = wait.to_string();
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", &w, "--max-connections", "65536"])?;
    let pid = agent.pid();
    let rss0 = vm_field(pid, "VmRSS:");
    let server = SocketAddr::new(lab.server_addr(false), 25);
    let clients = lab.in_client(move || {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        if !burst {
                            std::thread::sleep(Duration::from_secs_f64(
                                wait * 0.8 * i as f64 / n as f64,
                            ));
                        }
                        held_client(server, wait)
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok::<_, anyhow::Error>(
            hs.into_iter()
                .map(|h| h.join().ok().flatten())
                .collect::<Vec<_>>(),
        )
    });
    // Every client has connected (the arrivals take 80 % of the wait, a burst
    // well under it), none is released yet.
    std::thread::sleep(Duration::from_secs_f64(wait * 0.9));
    let (held_socks, sock_size) = request_socks(&lab);
    let rss = vm_field(pid, "VmRSS:");
    let got = join(clients)??;
    let conns_map = agent_map_memory(pid)
        .into_iter()
        .find(|(name, _, _)| name == "CONNS");
    agent.stop()?;
    let stopped = agent
        .events("stopped")
        .first()
        .cloned()
        .cloned()
        .unwrap_or_default();
    // At the server: the kernel's own handshake-to-greeting time, as the agent
    // logs it (the clients' clocks below add their threads' scheduling on the
    // same two CPUs).
    let mut server: Vec<f64> = agent
        .events("pass")
        .iter()
        .filter_map(|v| v["greeting_after_ms"].as_f64())
        .map(|ms| ms - wait * 1e3)
        .collect();
    server.sort_by(f64::total_cmp);
    let mut late: Vec<f64> = got.iter().flatten().copied().collect();
    late.sort_by(f64::total_cmp);
    let at = |v: &Vec<f64>, p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
    };
    let q = |p: f64| at(&late, p);
    let sq = |p: f64| at(&server, p);
    let kernel_socks = (held_socks * sock_size) as f64 / n as f64;
    let agent_bytes = (rss.saturating_sub(rss0) * 1024) as f64 / n as f64;
    let entry = conns_map.map(|(_, mem, max)| mem as f64 / max as f64);
    Ok(json!({
        "held": n, "burst": burst, "wait_s": wait, "greeted": late.len(),
        "late_min_ms": sq(0.0), "late_median_ms": sq(0.5), "late_p99_ms": sq(0.99), "late_max_ms": sq(1.0),
        "client_late_min_ms": q(0.0), "client_late_median_ms": q(0.5), "client_late_p99_ms": q(0.99), "client_late_max_ms": q(1.0),
        "request_sockets": held_socks, "syn_cookies": (n as u64).saturating_sub(held_socks),
        "kernel_request_bytes_per_held": kernel_socks,
        "conns_entry_bytes_preallocated": entry,
        "agent_bytes_per_held": agent_bytes,
        "mta_bytes_per_held": 0,
        "total_bytes_per_held": kernel_socks + entry.unwrap_or(0.0) + agent_bytes,
        "postscreen_bytes_per_held": 1300,
        "release_retries": stopped["release_retries"], "releases_abandoned": stopped["releases_abandoned"],
    }))
}

/// Kernel memory (memlock) of the agent's maps, by name, from /proc fdinfo.
fn agent_map_memory(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    let mut seen = std::collections::HashSet::new();
    for e in rd.flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(mem), Some(max)) =
            (field("map_id:"), field("memlock:"), field("max_entries:"))
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_string))
            .unwrap_or_default();
        out.push((name, mem, max));
    }
    out
}

fn vm_field(pid: u32, k: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(k))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Figure 3: many connections held at once (wait 5), every one classified.
fn concurrent(n: u32) -> Result<Value> {
    let lab = Lab::new()?;
    let sink = Command::new("ip")
        .envs(postfix_env())
        .args(["netns", "exec", &lab.server_ns, "sh", "-c"])
        .arg(format!("exec smtp-sink -u nobody {SERVER_V4}:25 4096"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = Agent::start(
        &lab,
        &["-a", "log", "-w", "5", "--max-connections", "65536"],
    )?;
    let pid = agent.pid();
    let t = Instant::now();
    let src = Command::new("ip")
        .envs(postfix_env())
        .args(["netns", "exec", &lab.client_ns, "sh", "-c"])
        .arg(format!(
            "exec timeout 120 smtp-source -s {n} -m {n} -l 100 -f a@client.example -t b@lab.example {SERVER_V4}:25"
        ))
        .stdout(Stdio::null())
        .spawn()?;
    // Sample while the greetings are held.
    let mut src = src;
    let mut peak_tracked = 0u64;
    let end = Instant::now() + Duration::from_secs(120);
    while src.try_wait()?.is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        peak_tracked = peak_tracked.max(agent.events("pass").len() as u64);
    }
    let ok = src.wait()?.success();
    let elapsed = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && (agent.events("pass").len() as u32) < n {
        agent.drain_for(Duration::from_millis(200));
    }
    let rss_kib = vm_field(pid, "VmHWM:");
    let maps = agent_map_memory(pid);
    agent.stop()?;
    drop(sink);
    let passes = agent.events("pass").len();
    let early = agent.events("early_talker").len();
    let conns = maps.iter().find(|(n, _, _)| n == "CONNS").cloned();
    let total_map: u64 = maps.iter().map(|(_, m, _)| m).sum();
    Ok(json!({
        "connections": n, "smtp_source_ok": ok, "elapsed_s": elapsed.as_secs_f64(),
        "passes_logged": passes, "early_talkers_logged": early,
        "agent_peak_rss_mib": rss_kib as f64 / 1024.0, "target_rss_mib": 64,
        "conns_map_bytes": conns.as_ref().map(|c| c.1),
        "conns_map_bytes_per_entry": conns.as_ref().map(|c| c.1 as f64 / c.2 as f64),
        "target_bytes_per_connection": 256,
        "all_maps_bytes": total_map,
    }))
}

/// Figure 4, a burst of early talkers: each connects, talks at once, and resets
/// (so ports recycle). Verdicts logged per second, and verdicts lost.
///
/// `frozen`: the agent is stopped during the burst (a 64 MiB buffer holds it all),
/// then resumed: the drain rate is the agent's own capacity, free of the load
/// generator's. The agent logs text to a file, as deployed; lines are counted as
/// they are written. (Read through a pipe and parsed as JSON by the bench, the
/// bench itself became the bottleneck and the agent blocked on its stdout.)
fn verdict_throughput(n: u32, frozen: bool) -> Result<Value> {
    let lab = Lab::new()?;
    // The MTA is one process against the generator's threads on 2 CPUs: at equal
    // priority it fell 4,096 connections behind (listen-queue overflows, each a
    // 1 s SYN retry for a generator thread), so the burst measured smtp-sink's
    // share of the CPU. As on a real MX, the load comes from elsewhere: it runs
    // at a higher priority than the generator.
    let sink = Command::new("ip")
        .envs(postfix_env())
        .args(["netns", "exec", &lab.server_ns, "nice", "-n", "-10"])
        .args(["smtp-sink", "-u", "nobody"])
        .arg(format!("{SERVER_V4}:25"))
        .arg("4096")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)?;
    std::thread::sleep(Duration::from_millis(300));
    let log = lab.state_dir().with_file_name("agent.log");
    std::fs::create_dir_all(log.parent().context("lab directory")?)?;
    // The hold makes every client's bytes early; the reset ends it at once.
    let mut args = vec!["-a", "log", "-w", "1"];
    if frozen {
        args.extend(["--event-buffer", "67108864"]);
    }
    let mut agent = FileAgent::start(&lab, &args, log.clone())?;
    let sig = |sig| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.child.id() as i32), sig);
    };
    if frozen {
        sig(nix::sys::signal::Signal::SIGSTOP);
    }
    let s = SocketAddr::new(lab.server_addr(false), 25);
    // Blocking clients, each waiting for its handshake: 4 made the most
    // connections per second here (8 to 32 starve the MTA and make fewer).
    let threads = 4;
    let t = Instant::now();
    // Live: verdict lines are counted as the agent writes them, during the burst.
    let live = (!frozen).then(|| follow(log.clone(), "PREGREET ", u64::from(n), LOG_WAIT));
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            lab.in_client(move || -> Result<u32> {
                use std::io::Write;
                let mut ok = 0;
                let end = Instant::now() + Duration::from_secs(120);
                for _ in 0..n / threads {
                    if Instant::now() > end {
                        break;
                    }
                    let Ok(mut c) =
                        std::net::TcpStream::connect_timeout(&s, Duration::from_secs(2))
                    else {
                        continue;
                    };
                    let _ = c.write_all(b"EHLO bot\r\n");
                    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                    drop(c);
                    ok += 1;
                }
                Ok(ok)
            })
        })
        .collect();
    let mut made = 0;
    for h in hs {
        made += join(h)??;
    }
    let generated = t.elapsed();
    let (t, follower) = match live {
        Some(f) => (t, f),
        None => {
            let t = Instant::now();
            sig(nix::sys::signal::Signal::SIGCONT);
            (
                t,
                follow(log.clone(), "PREGREET ", u64::from(made), LOG_WAIT),
            )
        }
    };
    let (logged, last) = follower
        .join()
        .map_err(|_| anyhow::anyhow!("log follower"))??;
    agent.stop()?;
    drop(sink);
    // The agent's own account, from its STOPPED line.
    let stopped = std::fs::read_to_string(&log)?
        .lines()
        .rev()
        .find(|l| l.contains(" STOPPED "))
        .map(str::to_string)
        .unwrap_or_default();
    let counter = |k: &str| {
        stopped
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    Ok(json!({
        "agent_frozen_during_burst": frozen,
        "connections": made,
        "generation_s": generated.as_secs_f64(),
        "connections_per_s": f64::from(made) / generated.as_secs_f64(),
        "verdicts_logged": logged,
        "verdicts_per_s": logged as f64 / last.duration_since(t).as_secs_f64(),
        "events_lost": counter("events_lost"),
        "early_talkers_in_kernel": counter("early_talkers"),
        "target_per_s": 20000,
    }))
}

/// How long the burst figures wait for the last verdict line.
const LOG_WAIT: Duration = Duration::from_secs(60);

/// Follows a growing log file on another thread, counting the lines that contain
/// `what` as they appear, until `want` of them or `limit`. Returns the count and
/// when the last counted line was seen (to 10 ms). Reads only the new bytes, so the
/// bench adds next to nothing to the machine the agent is measured on.
fn follow(
    path: std::path::PathBuf,
    what: &'static str,
    want: u64,
    limit: Duration,
) -> std::thread::JoinHandle<Result<(u64, Instant)>> {
    std::thread::spawn(move || {
        use std::io::Read;
        let end = Instant::now() + limit;
        let mut f = std::fs::File::open(&path)?;
        let (mut n, mut last) = (0u64, Instant::now());
        let (mut chunk, mut partial) = (Vec::new(), Vec::new());
        while n < want && Instant::now() < end {
            chunk.clear();
            f.read_to_end(&mut chunk)?;
            if chunk.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            partial.extend_from_slice(&chunk);
            let cut = partial
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let found = partial[..cut]
                .split(|&b| b == b'\n')
                .filter(|l| l.windows(what.len()).any(|w| w == what.as_bytes()))
                .count() as u64;
            partial.drain(..cut);
            if found > 0 {
                n += found;
                last = Instant::now();
            }
        }
        Ok((n, last))
    })
}

fn run() -> Result<()> {
    let started = Instant::now();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = vm_total_gib();
    // ET_BENCH_ONLY=per_packet,session_rate runs a subset (while tuning one figure).
    let only = std::env::var("ET_BENCH_ONLY").unwrap_or_default();
    let want = |f: &str| only.is_empty() || only.split(',').any(|o| o == f);
    let skip = || -> Result<Value> { Ok(Value::Null) };
    eprintln!("bench: per-packet cost...");
    let cost = if want("per_packet") {
        per_packet_cost()?
    } else {
        skip()?
    };
    eprintln!("bench: session rate...");
    let rate = if want("session_rate") {
        session_rate()?
    } else {
        skip()?
    };
    eprintln!("bench: hold before accept (1, 1000, 5000 held)...");
    let hold = if want("hold") {
        json!([
            hold_figures(1, false)?,
            hold_figures(1000, false)?,
            hold_figures(5000, false)?,
            hold_figures(1000, true)?,
            hold_figures(5000, true)?,
        ])
    } else {
        skip()?
    };
    eprintln!("bench: concurrent holds...");
    let n: u32 = std::env::var("ET_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let conc = if want("concurrent") {
        concurrent(n)?
    } else {
        skip()?
    };
    let burst: u32 = std::env::var("ET_BENCH_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    eprintln!("bench: verdict throughput...");
    let thru = if want("burst") {
        verdict_throughput(burst, false)?
    } else {
        skip()?
    };
    eprintln!("bench: verdict drain rate...");
    let drain = if want("burst") {
        verdict_throughput(burst, true)?
    } else {
        skip()?
    };
    let report = json!({
        "machine": {"kernel": kernel, "cpus": cpus, "memory_gib": mem_gib},
        "per_packet": cost,
        "session_rate": rate,
        "hold": hold,
        "concurrent": conc,
        "verdict_throughput": thru,
        "verdict_drain": drain,
        "bench_seconds": started.elapsed().as_secs_f64(),
    });
    print_table(&report);
    let out = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}

fn vm_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0 / 1024.0)
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let m = &r["machine"];
    println!(
        "machine: kernel {}, {} CPUs, {} GiB",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpus"],
        f(&m["memory_gib"])
    );
    println!("{:<44} {:>12} {:>12}", "figure", "value", "target");
    let row = |name: &str, v: String, t: &str| println!("{name:<44} {v:>12} {t:>12}");
    let p = &r["per_packet"];
    for (key, what, target) in [
        ("other_traffic", "other port, real SMTP", "<= 1.2"),
        ("port25_traffic", "port 25, real SMTP", "<= 3"),
        ("port25_churn", "port 25, EHLO/QUIT churn", "<= 4"),
    ] {
        let t = &p[key];
        for prog in ["et_ingress", "et_egress"] {
            row(
                &format!("per-packet, {what}: {prog} / empty (ns)"),
                format!("{} / {}", f(&t[prog]["ours_ns"]), f(&t[prog]["floor_ns"])),
                "",
            );
        }
        row(
            &format!("per-packet, {what}: ratio (median round)"),
            f(&t["ratio"]),
            target,
        );
        row(
            "  range over the rounds",
            format!("{}-{}", f(&t["ratio_range"][0]), f(&t["ratio_range"][1])),
            "",
        );
    }
    // The least any design keeping per-connection state does (bound.rs):
    // a target below its ratio cannot be met by this architecture here.
    for (key, what) in [
        ("bound_port25_traffic", "port 25, real SMTP"),
        ("bound_port25_churn", "port 25, EHLO/QUIT churn"),
    ] {
        let t = &p[key];
        row(
            &format!("lower bound, {what}: ratio (median round)"),
            f(&t["ratio"]),
            "",
        );
        row(
            "  range over the rounds",
            format!("{}-{}", f(&t["ratio_range"][0]), f(&t["ratio_range"][1])),
            "",
        );
    }
    let x = &p["xdp_penalty_box"];
    row(
        "per-packet, XDP penalty box, all traffic: et_xdp / empty XDP (ns)",
        format!("{} / {}", f(&x["ours_ns"]), f(&x["floor_ns"])),
        "",
    );
    row("  ratio", f(&x["ratio"]), "");
    let s = &r["session_rate"];
    row(
        "sessions/s without agent",
        f(&s["sessions_per_s_without"]),
        "",
    );
    row(
        "sessions/s with agent (log, wait 0)",
        f(&s["sessions_per_s_with"]),
        "",
    );
    row(
        "session rate ratio (median of paired rounds)",
        f(&s["ratio"]),
        ">= 0.97",
    );
    row(
        "  quartiles of the paired rounds",
        format!("{}-{}", f(&s["ratio_q1"]), f(&s["ratio_q3"])),
        "",
    );
    row(
        "  no agent on either lab (method's noise)",
        format!(
            "{} ({}-{})",
            f(&s["calibration_ratio"]),
            f(&s["calibration_q1"]),
            f(&s["calibration_q3"])
        ),
        "",
    );
    row(
        "  agent CPU per session (us)",
        f(&s["agent_cpu_us_per_session"]),
        "",
    );
    for h in r["hold"].as_array().into_iter().flatten() {
        row(
            &format!(
                "hold, {} held{} (wait {} s): greeted",
                h["held"],
                if h["burst"] == true {
                    " in a burst"
                } else {
                    ""
                },
                h["wait_s"]
            ),
            h["greeted"].to_string(),
            "= held",
        );
        row(
            "  lateness at the server min/median/p99/max (ms)",
            format!(
                "{}/{}/{}/{}",
                f(&h["late_min_ms"]),
                f(&h["late_median_ms"]),
                f(&h["late_p99_ms"]),
                f(&h["late_max_ms"])
            ),
            "p99 <= 5, max <= 20",
        );
        row(
            "  lateness at the clients min/median/p99/max (ms)",
            format!(
                "{}/{}/{}/{}",
                f(&h["client_late_min_ms"]),
                f(&h["client_late_median_ms"]),
                f(&h["client_late_p99_ms"]),
                f(&h["client_late_max_ms"])
            ),
            "",
        );
        row(
            "  request sockets / SYN cookies",
            format!("{} / {}", h["request_sockets"], h["syn_cookies"]),
            "",
        );
        row(
            "  bytes per held (kernel req + CONNS entry + agent + MTA)",
            format!(
                "{} = {} + {} + {} + 0",
                f(&h["total_bytes_per_held"]),
                f(&h["kernel_request_bytes_per_held"]),
                f(&h["conns_entry_bytes_preallocated"]),
                f(&h["agent_bytes_per_held"])
            ),
            "postscreen 1300",
        );
    }
    let c = &r["concurrent"];
    row(
        "concurrent held connections",
        c["connections"].to_string(),
        "10000",
    );
    row("  passes logged", c["passes_logged"].to_string(), "= conns");
    row(
        "  agent peak RSS (MiB)",
        f(&c["agent_peak_rss_mib"]),
        "<= 64",
    );
    row(
        "  CONNS map bytes per entry",
        f(&c["conns_map_bytes_per_entry"]),
        "<= 256",
    );
    let v = &r["verdict_throughput"];
    row(
        "early-talker burst: connections",
        v["connections"].to_string(),
        "100000",
    );
    row(
        "  generated per second (load generator)",
        f(&v["connections_per_s"]),
        "",
    );
    row(
        "  verdicts logged per second",
        f(&v["verdicts_per_s"]),
        ">= 20000",
    );
    row(
        "  verdicts logged",
        v["verdicts_logged"].to_string(),
        "= conns",
    );
    row(
        "  verdicts lost (counted)",
        v["events_lost"].to_string(),
        "0",
    );
    let d = &r["verdict_drain"];
    row("same burst, agent frozen, then resumed:", String::new(), "");
    row(
        "  verdicts logged per second (agent capacity)",
        f(&d["verdicts_per_s"]),
        ">= 20000",
    );
    row(
        "  verdicts logged",
        d["verdicts_logged"].to_string(),
        "= conns",
    );
    row(
        "  verdicts lost (counted)",
        d["events_lost"].to_string(),
        "0",
    );
}
