//! earlytalker: catches SMTP clients that talk before the greeting, in the kernel,
//! in front of any unmodified MTA.

mod actions;
mod config;
mod events;
mod iface;
mod loader;
mod milter;
mod output;
mod policy;
mod shared;
mod store;

use actions::Enforcer;
use anyhow::{Context, Result};
use clap::{error::ErrorKind, Parser};
use config::{Cli, Settings};
use events::{client_of, server_of, End, Kind, Tracker};
use loader::{Features, Guard};
use output::Out;
use shared::{Event, EV_CLOSED, EV_EARLY, F_DENY};
use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use store::Store;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

/// How long after the end of the hold the agent waits for a greeting before it
/// reports an early talker on its own (the MTA may be stuck or never greet).
const NO_GREETING_GRACE: Duration = Duration::from_secs(5);

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
    let level = if cli.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .target(env_logger::Target::Stderr)
        .init();

    let settings = match Settings::from_cli(cli, iface::default_iface) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let features = match loader::detect() {
        Ok(f) => f,
        Err(e) => return fail(format!("{e:#}")),
    };
    let why = format!("net.ipv4.tcp_retries2 = {}", features.tcp_retries2);
    if let Err(e) = settings.check_wait(features.max_wait, &why) {
        return fail(e);
    }
    // Opened before anything is attached, so a missing capability fails cleanly.
    let enforcer = if settings.enforce() {
        match Enforcer::new() {
            Ok(e) => Some(e),
            Err(e) => return fail(format!("{e:#}")),
        }
    } else {
        None
    };
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
    let services = async {
        policy::start(
            settings.policy_socket.clone(),
            settings.policy_listen,
            settings.socket_group.clone(),
            store.clone(),
            out,
        )
        .await?;
        milter::start(
            settings.milter_socket.clone(),
            settings.milter_listen,
            settings.socket_group.clone(),
            store.clone(),
            out,
        )
        .await
    };
    if let Err(e) = rt.block_on(services) {
        // The Guard drops on return: nothing stays attached.
        return fail(format!("{e:#}"));
    }
    let ctx = Ctx {
        out,
        store,
        enforcer,
        counts: Counts::default(),
    };
    match rt.block_on(run(guard, settings, features, ctx)) {
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
    store: Arc<Mutex<Store>>,
    enforcer: Option<Enforcer>,
    counts: Counts,
}

impl Ctx {
    /// Acts on one kernel record.
    fn handle(&mut self, ev: &Event, s: &Settings, tracker: &mut Tracker) {
        let client = client_of(&ev.key);
        match ev.kind {
            EV_EARLY => {
                let bytes = ev.conn.client_end.wrapping_sub(ev.conn.client_base);
                self.store.lock().expect("store lock").insert(
                    client,
                    server_of(&ev.key),
                    s.action,
                    s.defer_reject,
                    bytes,
                    Instant::now(),
                );
                if ev.conn.flags & F_DENY != 0 {
                    self.enforce(ev, s);
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
    }

    /// deny/denysoft: reply in place of the greeting, tear the MTA's socket down.
    fn enforce(&mut self, ev: &Event, s: &Settings) {
        let v = events::verdict(&ev.key, &ev.conn, End::Denied, ev.now_ns, s.taken());
        let Some(enforcer) = self.enforcer.as_mut() else {
            log::error!("kernel condemned {} but enforcement is off", v.client);
            return;
        };
        let outcome = enforcer.deny(&ev.key, &ev.conn, s.action);
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
}

async fn run(mut guard: Guard, s: Settings, f: Features, mut ctx: Ctx) -> Result<()> {
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
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let grace = u64::try_from(NO_GREETING_GRACE.as_nanos()).unwrap_or(u64::MAX);
    let mut tracker = Tracker::new(s.taken(), grace, s.max_connections as usize);

    out.started(&s, f.max_wait, &f.kernel);
    log::info!(
        "watching {} on port(s) {:?}; greeting held {} s (this kernel allows up to {} s)",
        s.ifaces.join(", "),
        s.ports,
        config::secs(s.wait),
        config::secs(f.max_wait)
    );

    let drain = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
                 tracker: &mut Tracker,
                 ctx: &mut Ctx| {
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Some(ev) => ctx.handle(&ev, &s, tracker),
                None => log::warn!("ignoring a malformed kernel record of {} bytes", item.len()),
            }
        }
    };

    loop {
        tokio::select! {
            r = ring.readable_mut() => {
                let mut g = r.context("event ring buffer")?;
                drain(g.get_inner_mut(), &mut tracker, &mut ctx);
                g.clear_ready();
            }
            r = async { klog.as_mut().expect("guarded").readable_mut().await }, if klog.is_some() => {
                let mut g = r.context("kernel log ring buffer")?;
                g.get_inner_mut().flush();
                g.clear_ready();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                for v in tracker.sweep(monotonic_ns(), |k| guard.lookup(k)) {
                    ctx.report(&v);
                }
                ctx.store.lock().expect("store lock").expire(Instant::now());
            }
        }
    }

    // Verdicts already in the ring are still reported.
    drain(ring.get_mut(), &mut tracker, &mut ctx);
    if let Some(k) = klog.as_mut() {
        k.get_mut().flush();
    }
    let mut counters = guard.counters();
    counters.extend(ctx.counts.list());
    out.stopped(&counters);
    for p in [&s.policy_socket, &s.milter_socket].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    drop(ring);
    guard.detach();
    log::info!("detached; exiting");
    Ok(())
}
