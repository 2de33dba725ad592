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

fn object_path() -> std::path::PathBuf {
    std::env::var_os("EARLYTALKER_BPF_OBJ").map_or_else(
        || {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/earlytalker")
        },
        Into::into,
    )
}

/// (run_time_ns, run_count) of every loaded program with this name.
fn prog_stats(name: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos() as u64, c + p.run_count())
        })
}

#[derive(Clone, Copy)]
struct Stats {
    ours: (u64, u64),
    floor: (u64, u64),
}

fn snapshot() -> Stats {
    let i = prog_stats("et_ingress");
    let e = prog_stats("et_egress");
    Stats {
        ours: (i.0 + e.0, i.1 + e.1),
        floor: prog_stats("et_floor"),
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

/// Polite sessions plus a bulk transfer to `port`: the traffic measured.
fn traffic(lab: &Lab, port: u16, sessions: usize) -> Result<()> {
    let s = SocketAddr::new(lab.server_addr(false), port);
    for chunk in 0..(sessions / 25) {
        let hs: Vec<_> = (0..25)
            .map(|_| lab.in_client(move || session(s, &Manner::Polite)))
            .collect();
        for h in hs {
            join(h)?.with_context(|| format!("session batch {chunk}"))?;
        }
    }
    let data = pattern(4 << 20, 9);
    join(lab.in_client(move || send_after_greeting(s, &data)))??;
    Ok(())
}

/// Figure 1: per-packet cost of our programs next to an empty one on the same hooks.
fn per_packet_cost() -> Result<Value> {
    let lab = Lab::new()?;
    let _r25 = Responder::start(&lab, 25, Duration::ZERO)?;
    let _r2525 = Responder::start(&lab, 2525, Duration::ZERO)?;
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0"])?;
    // The floor: et_floor from the same object, on the same veth, both ways.
    let obj = std::fs::read(object_path()).context("reading the eBPF object")?;
    let dev = lab.server_if.clone();
    let floor = join(lab.in_server(move || -> Result<aya::Ebpf> {
        let mut ebpf = aya::Ebpf::load(&obj)?;
        let p: &mut SchedClassifier = ebpf
            .program_mut("et_floor")
            .context("et_floor")?
            .try_into()?;
        p.load()?;
        // First in the chain; it returns TCX_NEXT, so ours still run after it.
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            p.attach_with_options(&dev, t, TcAttachOptions::TcxOrder(LinkOrder::first()))?;
        }
        Ok(ebpf)
    }))??;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    // Warm up, then measure each kind of traffic on its own.
    traffic(&lab, 2525, 25)?;
    let a = snapshot();
    traffic(&lab, 2525, 200)?;
    let b = snapshot();
    traffic(&lab, 25, 200)?;
    let c = snapshot();
    drop(floor);
    agent.stop()?;
    let other = (per_packet(a.ours, b.ours), per_packet(a.floor, b.floor));
    let smtp = (per_packet(b.ours, c.ours), per_packet(b.floor, c.floor));
    Ok(json!({
        "other_traffic": {"ours_ns": other.0, "floor_ns": other.1, "ratio": other.0 / other.1,
                          "packets": b.ours.1 - a.ours.1, "target_ratio": 2.0},
        "port25_traffic": {"ours_ns": smtp.0, "floor_ns": smtp.1, "ratio": smtp.0 / smtp.1,
                           "packets": c.ours.1 - b.ours.1, "target_ratio": 4.0},
    }))
}

/// Runs smtp-source in the client namespace; returns its wall time.
fn smtp_source(lab: &Lab, sessions: u32, msgs: u32) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client_ns,
            "timeout",
            "120",
            "smtp-source",
        ])
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &msgs.to_string(),
            "-l",
            "1024",
        ])
        .args(["-f", "a@client.example", "-t", "b@lab.example"])
        .arg(format!("{SERVER_V4}:25"))
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("smtp-source failed: {st}");
    }
    Ok(t.elapsed())
}

fn smtp_sink(lab: &Lab) -> Result<std::process::Child> {
    let c = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, "smtp-sink", "-u", "nobody"])
        .arg(format!("{SERVER_V4}:25"))
        .arg("1024")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(c)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Figure 2: SMTP session rate, smtp-source against smtp-sink, with and without the agent.
fn session_rate() -> Result<Value> {
    let lab = Lab::new()?;
    let mut sink = smtp_sink(&lab)?;
    let (sessions, msgs) = (20, 3000);
    smtp_source(&lab, sessions, 200)?; // warm-up
    let (mut without, mut with) = (Vec::new(), Vec::new());
    // Alternating rounds, medians: 2 cores make single runs noisy.
    for _ in 0..5 {
        without.push(f64::from(msgs) / smtp_source(&lab, sessions, msgs)?.as_secs_f64());
        let mut agent = Agent::start(&lab, &["-a", "log", "-w", "0"])?;
        with.push(f64::from(msgs) / smtp_source(&lab, sessions, msgs)?.as_secs_f64());
        agent.stop()?;
    }
    let _ = sink.kill();
    let _ = sink.wait();
    let (w, wo) = (median(with), median(without));
    Ok(
        json!({"sessions_per_s_without": wo, "sessions_per_s_with": w, "ratio": w / wo,
              "target_ratio": 0.97, "parallel": sessions, "messages": msgs}),
    )
}

/// Figure 5: hold precision: greeting delay minus wait, over many polite connections.
fn hold_precision() -> Result<Value> {
    let lab = Lab::new()?;
    let _r = Responder::start(&lab, 25, Duration::ZERO)?;
    let wait = 1.0;
    let mut agent = Agent::start(&lab, &["-a", "log", "-w", "1"])?;
    let s = SocketAddr::new(lab.server_addr(false), 25);
    let mut late = Vec::new();
    for _ in 0..4 {
        let hs: Vec<_> = (0..25)
            .map(|_| lab.in_client(move || session(s, &Manner::Polite)))
            .collect();
        for h in hs {
            late.push(join(h)??.greeting_after.as_secs_f64() - wait);
        }
    }
    agent.stop()?;
    late.sort_by(f64::total_cmp);
    let q = |p: f64| late[((late.len() - 1) as f64 * p).round() as usize];
    Ok(
        json!({"wait_s": wait, "connections": late.len(), "late_min_ms": q(0.0) * 1e3,
              "late_median_ms": q(0.5) * 1e3, "late_p99_ms": q(0.99) * 1e3, "late_max_ms": q(1.0) * 1e3}),
    )
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
    let mut sink = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, "sh", "-c"])
        .arg(format!("exec smtp-sink -u nobody {SERVER_V4}:25 4096"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = Agent::start(
        &lab,
        &["-a", "log", "-w", "5", "--max-connections", "65536"],
    )?;
    let pid = agent.pid();
    let t = Instant::now();
    let src = Command::new("ip")
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
    let _ = sink.kill();
    let _ = sink.wait();
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
/// generator's.
fn verdict_throughput(n: u32, frozen: bool) -> Result<Value> {
    let lab = Lab::new()?;
    let mut sink = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, "smtp-sink", "-u", "nobody"])
        .arg(format!("{SERVER_V4}:25"))
        .arg("4096")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    // The hold makes every client's bytes early; the reset ends it at once.
    let mut agent = if frozen {
        Agent::start(
            &lab,
            &["-a", "log", "-w", "1", "--event-buffer", "67108864"],
        )?
    } else {
        Agent::start(&lab, &["-a", "log", "-w", "1"])?
    };
    let sig = |sig| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), sig);
    };
    if frozen {
        sig(nix::sys::signal::Signal::SIGSTOP);
    }
    let s = SocketAddr::new(lab.server_addr(false), 25);
    let threads = 8;
    let t = Instant::now();
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
    let t = if frozen {
        sig(nix::sys::signal::Signal::SIGCONT);
        Instant::now()
    } else {
        t
    };
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end && (agent.events("early_talker").len() as u32) < made {
        agent.drain_for(Duration::from_millis(200));
    }
    let logged = agent.events("early_talker").len() as u64;
    let last = t.elapsed();
    if std::env::var_os("ET_BENCH_DEBUG").is_some() {
        let mut seen = std::collections::HashMap::new();
        for v in agent.events("early_talker") {
            seen.entry(v["client"].as_str().unwrap_or("").to_string())
                .or_insert_with(Vec::new)
                .push(v.clone());
        }
        let mut ends = std::collections::HashMap::new();
        for v in agent.events("early_talker") {
            *ends
                .entry(v["end"].as_str().unwrap_or("").to_string())
                .or_insert(0) += 1;
        }
        let hangups = agent.events("hangup").len();
        eprintln!(
            "ENDS made={made} {ends:?} hangups={hangups} distinct_clients={}",
            seen.len()
        );
    }
    agent.stop()?;
    let _ = sink.kill();
    let _ = sink.wait();
    let st = agent
        .events("stopped")
        .first()
        .cloned()
        .cloned()
        .unwrap_or_default();
    Ok(json!({
        "agent_frozen_during_burst": frozen,
        "connections": made,
        "generation_s": generated.as_secs_f64(),
        "connections_per_s": f64::from(made) / generated.as_secs_f64(),
        "verdicts_logged": logged,
        "verdicts_per_s": logged as f64 / last.as_secs_f64(),
        "events_lost": st["events_lost"],
        "early_talkers_in_kernel": st["early_talkers"],
        "target_per_s": 20000,
    }))
}

fn run() -> Result<()> {
    let started = Instant::now();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = vm_total_gib();
    eprintln!("bench: per-packet cost...");
    let cost = per_packet_cost()?;
    eprintln!("bench: session rate...");
    let rate = session_rate()?;
    eprintln!("bench: hold precision...");
    let hold = hold_precision()?;
    eprintln!("bench: concurrent holds...");
    let n: u32 = std::env::var("ET_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let conc = concurrent(n)?;
    eprintln!("bench: verdict throughput...");
    let burst: u32 = std::env::var("ET_BENCH_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let thru = verdict_throughput(burst, false)?;
    eprintln!("bench: verdict drain rate...");
    let drain = verdict_throughput(burst, true)?;
    let report = json!({
        "machine": {"kernel": kernel, "cpus": cpus, "memory_gib": mem_gib},
        "per_packet": cost,
        "session_rate": rate,
        "hold_precision": hold,
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
    row(
        "per-packet, other traffic: ours (ns)",
        f(&p["other_traffic"]["ours_ns"]),
        "",
    );
    row(
        "per-packet, other traffic: empty prog (ns)",
        f(&p["other_traffic"]["floor_ns"]),
        "",
    );
    row(
        "per-packet, other traffic: ratio",
        f(&p["other_traffic"]["ratio"]),
        "<= 2",
    );
    row(
        "per-packet, port 25: ours (ns)",
        f(&p["port25_traffic"]["ours_ns"]),
        "",
    );
    row(
        "per-packet, port 25: empty prog (ns)",
        f(&p["port25_traffic"]["floor_ns"]),
        "",
    );
    row(
        "per-packet, port 25: ratio",
        f(&p["port25_traffic"]["ratio"]),
        "<= 4",
    );
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
    row("session rate ratio", f(&s["ratio"]), ">= 0.97");
    let h = &r["hold_precision"];
    row("hold lateness min (ms), wait 1 s", f(&h["late_min_ms"]), "");
    row("hold lateness median (ms)", f(&h["late_median_ms"]), "");
    row("hold lateness p99 (ms)", f(&h["late_p99_ms"]), "");
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
