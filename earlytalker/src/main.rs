//! earlytalker: catches SMTP clients that talk before the greeting, in the kernel,
//! in front of any unmodified MTA.

mod actions;
mod config;
mod events;
mod iface;
mod listen;
mod loader;
mod metrics;
mod milter;
mod output;
mod passcache;
mod policy;
mod privs;
mod shared;
mod status;
mod store;

use actions::Enforcer;
use anyhow::{Context, Result};
use clap::{error::ErrorKind, CommandFactory, Parser};
use config::{Cli, Command, RunArgs, Settings};
use events::{client_of, server_of, Dedupe, End, Kind, Tracker};
use loader::{Features, Guard};
use output::Out;
use shared::{Event, EV_CLOSED, EV_EARLY, F_DENY};
use std::{
    net::{IpAddr, Ipv6Addr},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use store::Store;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

/// How long after the end of the hold the agent waits for a greeting before it
/// reports an early talker on its own (the MTA may be stuck or never greet).
const NO_GREETING_GRACE: Duration = Duration::from_secs(5);
/// The pass cache is saved this often (and at exit and on SIGHUP).
const SAVE_EVERY: Duration = Duration::from_secs(600);

/// Exit status for bad flags, bad configuration and missing privileges/features.
const EXIT_USAGE: u8 = 2;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("earlytalker: error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the problem; the rest is usage boilerplate.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
    };
    match cli.command {
        Some(Command::Status {
            json,
            control_socket,
        }) => match status::client(&control_socket, json) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("{e:#}")),
        },
        Some(Command::Generate { dir }) => match generate(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{e:#}")),
        },
        None => agent(cli.run),
    }
}

/// Man page and shell completions from the CLI definition (for packaging).
fn generate(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut man)?;
    std::fs::write(dir.join("earlytalker.8"), man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "earlytalker", dir)?;
    }
    Ok(())
}

fn agent(run: RunArgs) -> ExitCode {
    let level = if run.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .target(env_logger::Target::Stderr)
        .init();

    let settings = match Settings::load(&run, iface::default_iface) {
        Ok(s) => s,
        Err(e) => return fail(format!("{e:#}")),
    };
    let features = match loader::detect() {
        Ok(f) => f,
        Err(e) => return fail(format!("{e:#}")),
    };
    let why = format!("net.ipv4.tcp_retries2 = {}", features.tcp_retries2);
    if let Err(e) = settings.check_wait(features.max_wait, &why) {
        return fail(e);
    }
    // Opened before anything is attached, so a missing capability fails cleanly;
    // opened in every mode, so that a reload to deny needs no privilege later.
    let mut enforcer = match Enforcer::new() {
        Ok(e) => e,
        Err(e) => return fail(format!("{e:#}")),
    };
    if settings.enforce() {
        if let Err(e) = enforcer.probe_destroy() {
            return fail(format!("{e:#}"));
        }
    }
    let enforcer = Some(enforcer);
    let guard = match Guard::load(&settings) {
        Ok(g) => g,
        // Whatever was attached is detached when the partial Guard drops.
        Err(e) => return fail(format!("{e:#}")),
    };

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let out = Out::new(settings.log_format);
    let store = Arc::new(Mutex::new(Store::new(settings.max_connections as usize)));
    let snap: status::Shared = Arc::default();
    let services = async {
        let group = settings.socket_group.as_deref();
        let store = store.clone();
        listen::start(
            "policy",
            settings.policy_socket.clone(),
            settings.policy_listen,
            group,
            policy::Policy {
                store: store.clone(),
                out,
            },
        )
        .await?;
        listen::start(
            "milter",
            settings.milter_socket.clone(),
            settings.milter_listen,
            group,
            milter::MilterService { store, out },
        )
        .await?;
        status::serve(settings.control_socket.clone(), snap.clone()).await?;
        anyhow::Ok(())
    };
    if let Err(e) = rt.block_on(services) {
        // The Guard drops on return: nothing stays attached.
        return fail(format!("{e:#}"));
    }
    // Everything privileged is done: attached, sockets bound and handed over.
    if let Err(e) = privs::drop_privileges() {
        return fail(format!("dropping privileges: {e:#}"));
    }
    // Threads only after the drop: capabilities are per thread.
    if let Some(addr) = settings.metrics_listen {
        if let Err(e) = metrics::serve(addr, snap.clone()) {
            return fail(format!("{e:#}"));
        }
    }
    let ctx = Ctx {
        out,
        // Racing duplicates are reserved in the ring microseconds apart, so a few
        // thousand recent records cover them; a small table also stays in cache.
        dedupe: Dedupe::new(4096),
        store,
        enforcer,
        counts: Counts::default(),
        snap,
        run,
        s: settings,
    };
    match rt.block_on(event_loop(guard, features, ctx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("earlytalker: fatal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn monotonic_ns() -> u64 {
    // Same clock as bpf_ktime_get_ns.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What the agent did, beside the kernel's counters.
#[derive(Default)]
struct Counts {
    deny: u64,
    denysoft: u64,
    defer: u64,
    log: u64,
    teardown_failures: u64,
}

impl Counts {
    fn count(&mut self, taken: &str) {
        match taken {
            "deny" => self.deny += 1,
            "denysoft" => self.denysoft += 1,
            "defer" => self.defer += 1,
            _ => self.log += 1,
        }
    }

    fn by_action(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("deny", self.deny),
            ("denysoft", self.denysoft),
            ("defer", self.defer),
            ("log", self.log),
        ]
    }

    fn list(&self) -> [(&'static str, u64); 5] {
        [
            ("action_deny", self.deny),
            ("action_denysoft", self.denysoft),
            ("action_defer", self.defer),
            ("action_log", self.log),
            ("teardown_failures", self.teardown_failures),
        ]
    }
}

struct Ctx {
    out: Out,
    dedupe: Dedupe,
    store: Arc<Mutex<Store>>,
    enforcer: Option<Enforcer>,
    counts: Counts,
    snap: status::Shared,
    /// The command line, re-applied over the file on every reload.
    run: RunArgs,
    s: Settings,
}

impl Ctx {
    /// Acts on one kernel record.
    fn handle(&mut self, ev: &Event, tracker: &mut Tracker) {
        // One early event (one reply) and one verdict per connection.
        if !self.dedupe.first(ev) {
            return;
        }
        let client = client_of(&ev.key);
        match ev.kind {
            EV_EARLY => {
                let bytes = ev.conn.client_end.wrapping_sub(ev.conn.client_base);
                self.store.lock().expect("store lock").insert(
                    client,
                    server_of(&ev.key),
                    self.s.action,
                    self.s.defer_reject,
                    bytes,
                    Instant::now(),
                );
                if ev.conn.flags & F_DENY != 0 {
                    self.enforce(ev);
                    return;
                }
            }
            EV_CLOSED => {
                self.store
                    .lock()
                    .expect("store lock")
                    .closed(&client, Instant::now());
                return;
            }
            _ => {}
        }
        if let Some(v) = tracker.on_event(ev) {
            self.report(&v);
        }
    }

    fn report(&mut self, v: &events::Verdict) {
        if v.kind == Kind::EarlyTalker {
            self.counts.count(v.action);
            self.store
                .lock()
                .expect("store lock")
                .update_bytes(&v.client, v.bytes);
        }
        self.out.verdict(v);
        self.snap.lock().expect("snapshot lock").push_recent(v);
    }

    /// deny/denysoft: reply in place of the greeting, tear the MTA's socket down.
    fn enforce(&mut self, ev: &Event) {
        let v = events::verdict(&ev.key, &ev.conn, End::Denied, ev.now_ns, self.s.taken());
        let Some(enforcer) = self.enforcer.as_mut() else {
            log::error!("kernel condemned {} but enforcement is off", v.client);
            return;
        };
        let outcome = enforcer.deny(&ev.key, &ev.conn, self.s.action);
        self.report(&v);
        for (step, err) in [
            ("reply", outcome.reply_error),
            ("destroy", outcome.destroy_error),
        ] {
            if let Some(e) = err {
                self.counts.teardown_failures += 1;
                self.out.teardown_failed(v.client, v.server, step, &e);
            }
        }
    }

    /// SIGHUP: re-reads the file, re-applies the flags, and changes what can be
    /// changed live. An invalid configuration is refused whole.
    fn reload(&mut self, guard: &mut Guard, f: &Features, tracker: &mut Tracker) {
        let cur_iface = self.s.ifaces.clone();
        let res = Settings::load(&self.run, || Ok(cur_iface[0].clone())).and_then(|mut new| {
            let why = format!("net.ipv4.tcp_retries2 = {}", f.tcp_retries2);
            new.check_wait(f.max_wait, &why)?;
            let fixed = self.s.restart_only_changes(&new);
            if !fixed.is_empty() {
                log::warn!(
                    "reload: {} change(s) need a restart; keeping the running value(s)",
                    fixed.join(", ")
                );
                new.ifaces.clone_from(&self.s.ifaces);
                new.log_format = self.s.log_format;
                new.max_connections = self.s.max_connections;
                new.state_dir.clone_from(&self.s.state_dir);
                new.policy_socket.clone_from(&self.s.policy_socket);
                new.policy_listen = self.s.policy_listen;
                new.milter_socket.clone_from(&self.s.milter_socket);
                new.milter_listen = self.s.milter_listen;
                new.socket_group.clone_from(&self.s.socket_group);
                new.metrics_listen = self.s.metrics_listen;
                new.control_socket.clone_from(&self.s.control_socket);
            }
            if new.enforce() && !self.s.enforce() {
                if let Some(e) = self.enforcer.as_mut() {
                    e.probe_destroy()?;
                }
            }
            guard.configure(&new)?;
            Ok(new)
        });
        match res {
            Ok(new) => {
                tracker.set_action(new.taken());
                self.s = new;
                self.out.reloaded(&self.s, None);
                self.save_passes(guard);
            }
            Err(e) => {
                log::error!("reload refused, the old configuration stays: {e:#}");
                self.out.reloaded(&self.s, Some(&format!("{e:#}")));
            }
        }
    }

    /// Refreshes what status and metrics show; `conns` also walks the connection
    /// table, `passes` counts the pass cache (both a syscall per entry).
    fn refresh(&mut self, guard: &Guard, conns: bool, passes: bool) {
        let mut counters: Vec<(String, u64)> = guard
            .counters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        counters.extend(self.counts.list().iter().map(|(k, v)| (k.to_string(), *v)));
        let store_len = self.store.lock().expect("store lock").live();
        let mut snap = self.snap.lock().expect("snapshot lock");
        snap.counters = counters;
        snap.by_action = self.counts.by_action();
        snap.config = output::config_json(&self.s);
        snap.allow = self.s.allow.len() as u64;
        snap.conns_capacity = u64::from(self.s.max_connections);
        snap.passed_capacity = u64::from(shared::DEFAULT_MAX_PASSED);
        snap.verdict_store = store_len as u64;
        drop(snap);
        if conns {
            let (n, held) = guard.conn_fill(monotonic_ns());
            let mut snap = self.snap.lock().expect("snapshot lock");
            snap.conns = n;
            snap.held_now = held;
        }
        if passes {
            let n = guard.passed_count();
            self.snap.lock().expect("snapshot lock").passed = n;
        }
    }

    fn save_passes(&self, guard: &Guard) {
        if self.s.pass_ttl.is_zero() {
            return;
        }
        let now = monotonic_ns();
        let entries: Vec<(IpAddr, Duration)> = guard
            .passed()
            .into_iter()
            .map(|(a, t)| {
                (
                    Ipv6Addr::from(a).to_canonical(),
                    Duration::from_nanos(now.saturating_sub(t)),
                )
            })
            .filter(|(_, age)| *age < self.s.pass_ttl)
            .collect();
        if let Err(e) = passcache::save(&self.s.state_dir, &entries, SystemTime::now()) {
            log::warn!("pass cache not saved: {e:#}");
        }
    }

    fn restore_passes(&self, guard: &mut Guard) {
        if self.s.pass_ttl.is_zero() {
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&self.s.state_dir) {
            log::warn!(
                "state directory {}: {e}; the pass cache will not survive a restart",
                self.s.state_dir.display()
            );
            return;
        }
        match passcache::load(&self.s.state_dir, self.s.pass_ttl, SystemTime::now()) {
            Ok(entries) => {
                let now = monotonic_ns();
                let kernel: Vec<([u8; 16], u64)> = entries
                    .iter()
                    .filter(|(_, age)| (age.as_nanos() as u64) < now)
                    .map(|(ip, age)| (loader::mapped(*ip), now - age.as_nanos() as u64))
                    .collect();
                match guard.restore_passed(&kernel) {
                    Ok(n) if n > 0 => log::info!("pass cache: {n} address(es) restored"),
                    Ok(_) => {}
                    Err(e) => log::warn!("pass cache not restored: {e:#}"),
                }
            }
            Err(e) => log::warn!("pass cache not restored: {e:#}"),
        }
    }
}

async fn event_loop(mut guard: Guard, f: Features, mut ctx: Ctx) -> Result<()> {
    let out = ctx.out;
    // SAFETY: RingBuf and EbpfLogger own their map fd until dropped, which only
    // happens together with the AsyncFd wrapping them.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(guard.take_events()?, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    let mut klog = match guard.logger.take() {
        // SAFETY: as above.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the kernel log: {e}"))?,
        ),
        None => None,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Most records are submitted without waking us (see the kernel's emit()).
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let grace = u64::try_from(NO_GREETING_GRACE.as_nanos()).unwrap_or(u64::MAX);
    let mut tracker = Tracker::new(ctx.s.taken(), grace, ctx.s.max_connections as usize);

    ctx.restore_passes(&mut guard);
    ctx.snap.lock().expect("snapshot lock").started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ctx.refresh(&guard, true, true);
    out.started(&ctx.s, &f);
    log::info!(
        "watching {} on port(s) {:?}; greeting held {} s (this kernel allows up to {} s)",
        ctx.s.ifaces.join(", "),
        ctx.s.ports,
        config::secs(ctx.s.wait),
        config::secs(f.max_wait)
    );

    let drain = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
                 tracker: &mut Tracker,
                 ctx: &mut Ctx| {
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Some(ev) => ctx.handle(&ev, tracker),
                None => log::warn!("ignoring a malformed kernel record of {} bytes", item.len()),
            }
        }
    };

    let mut ticks: u64 = 0;
    let mut lost_seen: u64 = 0;
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            r = ring.readable_mut() => {
                let mut g = r.context("event ring buffer")?;
                drain(g.get_inner_mut(), &mut tracker, &mut ctx);
                g.clear_ready();
                out.flush();
            }
            _ = poll.tick() => {
                drain(ring.get_mut(), &mut tracker, &mut ctx);
                out.flush();
            }
            r = async { klog.as_mut().expect("guarded").readable_mut().await }, if klog.is_some() => {
                let mut g = r.context("kernel log ring buffer")?;
                g.get_inner_mut().flush();
                g.clear_ready();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => ctx.reload(&mut guard, &f, &mut tracker),
            _ = tick.tick() => {
                ticks += 1;
                for v in tracker.sweep(monotonic_ns(), |k| guard.lookup(k)) {
                    ctx.report(&v);
                }
                out.flush();
                ctx.store.lock().expect("store lock").expire(Instant::now());
                // Walking a map costs a syscall per entry: the connection table
                // (small: pre-greeting entries) every 5 s, the pass cache (up
                // to 131,072 addresses) every 30 s.
                ctx.refresh(&guard, ticks.is_multiple_of(10), ticks.is_multiple_of(60));
                // Never silent: verdicts the kernel could not hand over
                // (counted by the kernel, just read into the snapshot).
                let lost = ctx
                    .snap
                    .lock()
                    .expect("snapshot lock")
                    .counters
                    .iter()
                    .find(|(k, _)| k == "events_lost")
                    .map_or(0, |(_, v)| *v);
                if lost > lost_seen {
                    log::warn!("{} verdict events lost (ring buffer full)", lost - lost_seen);
                    out.lost(lost - lost_seen, lost);
                    lost_seen = lost;
                }
                if last_save.elapsed() >= SAVE_EVERY {
                    ctx.save_passes(&guard);
                    last_save = Instant::now();
                }
            }
        }
    }

    // Verdicts already in the ring are still reported.
    drain(ring.get_mut(), &mut tracker, &mut ctx);
    out.flush();
    if let Some(k) = klog.as_mut() {
        k.get_mut().flush();
    }
    ctx.save_passes(&guard);
    let mut counters = guard.counters();
    counters.extend(ctx.counts.list());
    out.stopped(&counters);
    for p in [&ctx.s.policy_socket, &ctx.s.milter_socket]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(&ctx.s.control_socket);
    drop(ring);
    guard.detach();
    log::info!("detached; exiting");
    Ok(())
}
