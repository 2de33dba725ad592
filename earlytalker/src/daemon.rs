//! The running agent: start-up (every failure one `StartError`, exit status 2,
//! nothing left attached), then an event loop with one method per wake-up
//! source: kernel records, the periodic tick, SIGHUP, and the stop signals.

use crate::{
    actions::Enforcer,
    config::{self, RunArgs, Settings},
    counts::Counts,
    diag::Diag,
    fleet,
    forge::Raw,
    iface, listen, listeners,
    loader::{self, Features, Guard},
    metrics, milter,
    output::{self, Out},
    passcache,
    penalty::PenaltyBox,
    pipeline::{Hands, Pipeline},
    policy, privs, probe,
    release::{self, monotonic_ns, Releaser},
    status,
    store::Store,
    stress::{self, Stress},
    tracked,
};
use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use earlytalker_common::{Stat, DEFAULT_MAX_PASSED};
use std::{
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

/// How long after the end of the hold the agent waits for a greeting before it
/// reports an early talker on its own (the MTA may be stuck or never greet).
const NO_GREETING_GRACE: Duration = Duration::from_secs(5);
/// The pass cache is saved this often (and at exit and on SIGHUP).
const SAVE_EVERY: Duration = Duration::from_secs(600);
/// Records the kernel submits without a wakeup wait at most this long.
const POLL_EVERY: Duration = Duration::from_millis(50);
const TICK_EVERY: Duration = Duration::from_millis(500);
/// How often the MTA is asked again whether it advertises PIPECONNECT.
const PROBE_EVERY: Duration = Duration::from_secs(60);

/// Why the agent could not start. Each maps to exit status 2 with one line, in
/// `main`; whatever was attached is detached as the partial state drops.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0:#}")]
    Config(anyhow::Error),
    #[error("{0:#}")]
    Kernel(anyhow::Error),
    #[error("{0:#}")]
    Privilege(anyhow::Error),
    #[error("{0:#}")]
    Attach(anyhow::Error),
    #[error("{0:#}")]
    Service(anyhow::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("dropping privileges: {0:#}")]
    DropPrivileges(anyhow::Error),
}

impl StartError {
    /// Bad flags, configuration, privilege or kernel feature.
    pub const EXIT_STATUS: u8 = 2;
}

fn retries_why(f: &Features) -> String {
    format!(
        "net.ipv4.tcp_synack_retries = {}; a SYN cookie lasts at least 60 s",
        f.tcp_synack_retries
    )
}

/// Starts the agent; returns when it was told to stop (Ok) or a fatal error
/// stopped it after start-up (Err of the outer Ok).
pub fn run(args: RunArgs) -> Result<Result<()>, StartError> {
    let level = if args.verbose { "debug" } else { "info" };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    logger.target(env_logger::Target::Stderr);
    if crate::journal::is_journal(2) {
        // journald reads the priority and keeps its own time and our name.
        logger.format(|buf, r| {
            use std::io::Write;
            let p = crate::journal::Prio::of(r.level()).prefix();
            writeln!(buf, "{p}{}: {}", r.target(), r.args())
        });
    }
    logger.init();

    let settings = Settings::load(&args, iface::default_iface).map_err(StartError::Config)?;
    let features = loader::detect().map_err(StartError::Kernel)?;
    settings
        .check_wait(features.max_wait, &retries_why(&features))
        .map_err(StartError::Kernel)?;
    // Opened before anything is attached, so a missing capability fails cleanly;
    // opened in every mode, so that a reload to deny needs no privilege later.
    let mut enforcer = Enforcer::new().map_err(StartError::Privilege)?;
    if settings.live.enforce() {
        enforcer.probe_destroy().map_err(StartError::Kernel)?;
    }
    // Asked before anything is attached, so the probe is never held.
    let advertised = probe::any_advertises(&settings.live.ports, &settings.live.proxy_ports);
    // Looked at while privileged (pidfd_getfd).
    for d in listeners::deferring(&settings.live.ports) {
        log::warn!(
            "the listener on {} (pid {}, {}) sets TCP_DEFER_ACCEPT ({} s): it ignores the release, so a held client is served only at a SYN-ACK retransmission after the defer period, as without earlytalker; SMTP servers speak first and should not set it",
            d.addr, d.pid, d.process, d.seconds
        );
    }
    let guard = Guard::load(
        &settings.fixed,
        &settings.live,
        settings.live.pipeconnect_allowed(advertised),
    )
    .map_err(StartError::Attach)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let out = Out::new(settings.fixed.log_format);
    let store = Arc::new(Mutex::new(Store::new(
        settings.fixed.max_connections as usize,
        settings.fixed.close_grace,
    )));
    let snap: status::Shared = Arc::default();
    rt.block_on(services(&settings, &store, out, &snap))
        .map_err(StartError::Service)?;
    // Shared by the pipeline and the release thread.
    let counts = Counts::default();
    // The release thread's map handle and sockets, opened while privileged.
    let release_parts = release::Parts {
        conns: guard.conns_handle().map_err(StartError::Attach)?,
        raw: Raw::new().map_err(StartError::Privilege)?,
        diag: Diag::new().map_err(StartError::Privilege)?,
        counts: counts.clone(),
    };
    // Read by the sweep thread and, for the stress wait, by the event loop.
    let filter = Arc::new(guard.filter().map_err(StartError::Attach)?);
    let sweep_parts = tracked::Parts {
        conns: guard.conns_handle().map_err(StartError::Attach)?,
        handshakes: guard.handshakes_handle().map_err(StartError::Attach)?,
        filter: filter.clone(),
        counts: counts.clone(),
        snap: snap.clone(),
        every: settings.fixed.sweep_every,
        stale: settings
            .fixed
            .stale_after
            .map_or(tracked::Stale::DEFAULT, tracked::Stale::after),
    };
    let penalty = match settings.fixed.penalty {
        Some(rule) => Some(PenaltyBox::new(
            rule,
            Some(guard.penalty_handle().map_err(StartError::Attach)?),
        )),
        None => None,
    };
    // Written for clients behind a PROXY protocol balancer.
    let passed = Some(guard.passed_handle().map_err(StartError::Attach)?);
    // The MTA's listen queues, for the stress wait.
    let queues = Diag::new().map_err(StartError::Privilege)?;
    // Everything privileged is done: attached, sockets bound and handed over.
    privs::drop_privileges().map_err(StartError::DropPrivileges)?;
    // Threads only after the drop: capabilities are per thread.
    if let Some(addr) = settings.fixed.metrics_listen {
        metrics::serve(addr, snap.clone()).map_err(StartError::Service)?;
    }
    // The fleet task runs on the event loop's runtime, from its first await.
    let fleet = settings.fixed.shared_cache.clone().map(|url| {
        let _rt = rt.enter();
        let status = Arc::new(Mutex::new(fleet::Status::default()));
        let (publisher, heard) = fleet::start(url, counts.clone(), status.clone());
        Fleet {
            publisher,
            heard,
            status,
        }
    });
    let grace = u64::try_from(NO_GREETING_GRACE.as_nanos()).unwrap_or(u64::MAX);
    let releaser = Releaser::start(release_parts).map_err(StartError::Service)?;
    let keeper = tracked::Keeper::start(sweep_parts).map_err(StartError::Service)?;
    let pipeline = Pipeline::new(
        out,
        store,
        Hands {
            enforcer: Some(enforcer),
            releaser: Some(releaser),
            counts,
            penalty,
            fleet: fleet.as_ref().map(|f| f.publisher.clone()),
            passed,
        },
        snap.clone(),
        &settings.live,
        grace,
        settings.fixed.max_connections as usize,
    );
    let prober = Prober::start(
        (
            settings.live.ports.clone(),
            settings.live.proxy_ports.clone(),
        ),
        advertised,
    );
    let daemon = Daemon {
        prober,
        advertised,
        guard,
        features,
        pipeline,
        out,
        snap,
        args,
        s: settings,
        _keeper: keeper,
        filter,
        queues,
        listeners: Vec::new(),
        stress: Stress::default(),
        fleet,
        ticks: 0,
        lost_seen: 0,
        last_save: Instant::now(),
    };
    Ok(rt.block_on(daemon.event_loop()))
}

/// The policy service, the milter and the control socket, bound before the
/// privileges are dropped.
async fn services(
    s: &Settings,
    store: &Arc<Mutex<Store>>,
    out: Out,
    snap: &status::Shared,
) -> Result<()> {
    let f = &s.fixed;
    let group = f.socket_group.as_deref();
    listen::start(
        "policy",
        f.policy_socket.clone(),
        f.policy_listen,
        group,
        policy::Policy {
            store: store.clone(),
            out,
        },
    )
    .await?;
    listen::start(
        "milter",
        f.milter_socket.clone(),
        f.milter_listen,
        group,
        milter::MilterService {
            store: store.clone(),
            out,
        },
    )
    .await?;
    status::serve(f.control_socket.clone(), snap.clone()).await
}

struct Fleet {
    publisher: fleet::Publisher,
    heard: tokio::sync::mpsc::Receiver<fleet::Heard>,
    status: Arc<Mutex<fleet::Status>>,
}

struct Daemon {
    /// Asks the MTA about PIPECONNECT now and then, off the event loop.
    prober: Prober,
    /// What the MTA last said (None: it could not be asked).
    advertised: Option<bool>,
    guard: Guard,
    features: Features,
    pipeline: Pipeline,
    out: Out,
    snap: status::Shared,
    /// The command line, re-applied over the file on every reload.
    args: RunArgs,
    s: Settings,
    /// The sweep thread, stopped with the daemon.
    _keeper: tracked::Keeper,
    /// What the stress wait looks at: the tables' fill (the filter's counts)
    /// and the accept queues of the MTA's listeners on the watched ports.
    filter: Arc<tracked::Filter>,
    queues: Diag,
    listeners: Vec<std::net::SocketAddr>,
    stress: Stress,
    /// `--shared-cache`: the fleet task's ends and what it reports.
    fleet: Option<Fleet>,
    ticks: u64,
    lost_seen: u64,
    last_save: Instant,
}

impl Daemon {
    async fn event_loop(mut self) -> Result<()> {
        // SAFETY: RingBuf and EbpfLogger own their map fd until dropped, which only
        // happens together with the AsyncFd wrapping them.
        let mut ring = unsafe {
            AsyncFd::register_with_interest(self.guard.take_events()?, Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
        let mut klog = match self.guard.logger.take() {
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
        let mut tick = tokio::time::interval(TICK_EVERY);
        // Most records are submitted without waking us (see the kernel's emit()).
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        self.on_start();
        loop {
            tokio::select! {
                r = ring.readable_mut() => {
                    let mut g = r.context("event ring buffer")?;
                    self.on_records(g.get_inner_mut());
                    g.clear_ready();
                }
                _ = poll.tick() => self.on_records(ring.get_mut()),
                r = async { klog.as_mut().expect("guarded").readable_mut().await }, if klog.is_some() => {
                    let mut g = r.context("kernel log ring buffer")?;
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => self.on_reload(),
                h = async { self.fleet.as_mut().expect("guarded").heard.recv().await }, if self.fleet.is_some() => {
                    match h {
                        Some(h) => self.on_heard(h),
                        // The fleet task ended (it logged why): local state only.
                        None => self.fleet = None,
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        // Verdicts already in the ring are still reported.
        self.on_records(ring.get_mut());
        if let Some(k) = klog.as_mut() {
            k.get_mut().flush();
        }
        drop(ring);
        self.on_stop();
        Ok(())
    }

    fn on_start(&mut self) {
        self.restore_passes();
        self.snap.lock().expect("snapshot lock").started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.refresh(true, true);
        self.out.started(
            &self.s,
            &self.features,
            self.advertised,
            self.guard.xdp_mode,
        );
        log::info!(
            "watching {} on port(s) {:?}; new connections held {} s before the MTA may accept them (this kernel allows up to {} s)",
            self.s.fixed.ifaces.join(", "),
            self.s.live.ports,
            config::secs(self.s.live.wait),
            config::secs(self.features.max_wait)
        );
    }

    /// Kernel records waiting in the ring buffer, then their lines out at once.
    fn on_records(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.pipeline.record(&item);
        }
        self.out.flush();
    }

    /// Every 500 ms: early talkers whose greeting never came, expired verdicts,
    /// the status snapshot, lost records, and the periodic pass-cache save.
    fn on_tick(&mut self) {
        self.ticks += 1;
        self.on_probe();
        self.on_stress();
        if let Some(b) = self.pipeline.penalty.as_mut() {
            b.expire(monotonic_ns());
            self.snap.lock().expect("snapshot lock").penalty_box = Some(b.len() as u64);
        }
        let guard = &self.guard;
        self.pipeline.sweep(monotonic_ns(), |k| guard.lookup(k));
        self.out.flush();
        // Walking a map costs a syscall per entry: the connection table (small:
        // pre-greeting entries) every 5 s, the pass cache (up to 131,072
        // addresses) every 30 s.
        let lost = self.refresh(self.ticks.is_multiple_of(10), self.ticks.is_multiple_of(60));
        // Never silent: verdicts the kernel could not hand over.
        if lost > self.lost_seen {
            log::warn!(
                "{} verdict events lost (ring buffer full)",
                lost - self.lost_seen
            );
            self.out.lost(lost - self.lost_seen, lost);
            self.lost_seen = lost;
        }
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.save_passes();
            self.last_save = Instant::now();
        }
    }

    /// SIGHUP: re-reads the file, re-applies the flags, and applies the live
    /// settings whole; restart-only changes are named and left as they run. An
    /// invalid configuration is refused whole.
    fn on_reload(&mut self) {
        let cur_iface = self.s.fixed.ifaces.clone();
        let res = Settings::load(&self.args, || Ok(cur_iface[0].clone())).and_then(|new| {
            new.check_wait(self.features.max_wait, &retries_why(&self.features))?;
            if new.live.enforce() && !self.s.live.enforce() {
                if let Some(e) = self.pipeline.enforcer() {
                    e.probe_destroy()?;
                }
            }
            self.guard.configure(
                &new.live,
                new.live.pipeconnect_allowed(self.advertised),
                self.stress.on(),
            )?;
            Ok(new)
        });
        match res {
            Ok(new) => {
                let ignored = self.s.fixed.changes(&new.fixed);
                if !ignored.is_empty() {
                    log::warn!(
                        "reload: {} changed but need(s) a restart; keeping the running value(s)",
                        ignored.join(", ")
                    );
                }
                self.s.live = new.live;
                self.pipeline.set_policy(&self.s.live);
                self.prober
                    .ask((self.s.live.ports.clone(), self.s.live.proxy_ports.clone()));
                self.out.reloaded(&self.s, self.advertised, &ignored, None);
                self.save_passes();
            }
            Err(e) => {
                log::error!("reload refused, the old configuration stays: {e:#}");
                self.out
                    .reloaded(&self.s, self.advertised, &[], Some(&format!("{e:#}")));
            }
        }
    }

    /// News from the fleet: another relay's pass goes into the kernel's pass
    /// cache, another relay's early talker loses its pass here and counts
    /// towards the penalty box; after a (re)connection, our passes go out.
    fn on_heard(&mut self, h: fleet::Heard) {
        let ttl = self.s.live.pass_ttl;
        let (now_ms, now_ns) = (fleet::unix_ms(SystemTime::now()), monotonic_ns());
        match h {
            fleet::Heard::Connected => {
                if ttl.is_zero() {
                    return;
                }
                let passes = self
                    .local_passes(now_ns)
                    .into_iter()
                    .map(|(a, age)| (a, now_ms.saturating_sub(age.as_millis() as u64)))
                    .collect();
                if let Some(f) = &self.fleet {
                    f.publisher.send(fleet::Note::Snapshot { passes, ttl });
                }
            }
            fleet::Heard::Pass(w) => {
                if ttl.is_zero() || now_ms.saturating_sub(w.at_ms) >= ttl.as_millis() as u64 {
                    return;
                }
                let t = fleet::mono_of(w.at_ms, now_ms, now_ns);
                match self.guard.learn_pass(&loader::mapped(w.addr), t) {
                    Ok(true) => log::debug!("pass of {} learnt from {}", w.addr, w.relay),
                    Ok(false) => {}
                    Err(e) => log::warn!("pass of {} from {} not recorded: {e:#}", w.addr, w.relay),
                }
            }
            fleet::Heard::Talk(w) => {
                log::debug!("{} talked early at {}", w.addr, w.relay);
                let t = fleet::mono_of(w.at_ms, now_ms, now_ns);
                if let Err(e) = self.guard.forget_pass_before(&loader::mapped(w.addr), t) {
                    log::warn!("pass of {} not dropped: {e:#}", w.addr);
                }
                let boxed = self
                    .pipeline
                    .penalty
                    .as_mut()
                    .and_then(|b| b.offend(w.addr, now_ns));
                if let Some(until) = boxed {
                    self.pipeline
                        .counts
                        .add(crate::counts::AgentStat::Penalties);
                    self.out
                        .penalty(w.addr, Duration::from_nanos(until.saturating_sub(now_ns)));
                    self.out.flush();
                }
            }
        }
    }

    /// Every tick: stress begins or ends with the tables' and the listen
    /// queues' fill; the kernel's wait for new connections follows.
    fn on_stress(&mut self) {
        if self.ticks % 60 == 1 {
            // The MTA's listeners change rarely; /proc/net/tcp can be long.
            self.listeners = listeners::addresses(&self.s.live.ports);
        }
        let cap = f64::from(self.s.fixed.max_connections);
        let mut fill = stress::Fill {
            table: (self.filter.counted() as f64 / cap).min(1.0),
            queue: 0.0,
        };
        for a in &self.listeners {
            if let Ok(Some((queued, size))) = self.queues.accept_queue(*a) {
                fill.queue = fill.queue.max(f64::from(queued) / f64::from(size.max(1)));
            }
        }
        let Some(on) = self.stress.update(fill, self.s.live.stress_threshold) else {
            return;
        };
        let pipeconnect = self.s.live.pipeconnect_allowed(self.advertised);
        if let Err(e) = self.guard.configure(&self.s.live, pipeconnect, on) {
            // Tried again at the next tick.
            log::error!("stress wait not applied: {e:#}");
            self.stress.set(!on);
            return;
        }
        self.snap.lock().expect("snapshot lock").stress = on;
        self.out.stress(on, fill, self.s.live.wait_now(on));
    }

    /// The prober's latest answer: when it differs, the kernel's allowance
    /// follows and the change is logged.
    fn on_probe(&mut self) {
        let now = self.prober.latest();
        if now == self.advertised {
            return;
        }
        let (before, after) = (
            self.s.live.pipeconnect_allowed(self.advertised),
            self.s.live.pipeconnect_allowed(now),
        );
        if before != after {
            if let Err(e) = self.guard.configure(&self.s.live, after, self.stress.on()) {
                // Tried again at the next tick: the answer still differs.
                log::error!("PIPECONNECT change not applied: {e:#}");
                return;
            }
        }
        self.advertised = now;
        self.out.pipeconnect(&self.s, now);
    }

    /// Detaches first, then releases every held client at once (their own
    /// segments flow again too), then reports.
    fn on_stop(mut self) {
        self.save_passes();
        let kernel = self.guard.counters();
        let releaser = self.pipeline.take_releaser();
        let Daemon {
            guard,
            pipeline,
            out,
            s,
            ..
        } = self;
        guard.detach();
        if let Some(r) = releaser {
            r.stop();
        }
        out.stopped(&counter_list(&kernel, &pipeline.counts));
        let f = &s.fixed;
        for p in [&f.policy_socket, &f.milter_socket].into_iter().flatten() {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&f.control_socket);
        log::info!("detached; exiting");
    }

    /// The kernel's counters (as read), then the agent's, by name.
    fn counters(&self, kernel: &[(Stat, u64)]) -> Vec<(&'static str, u64)> {
        counter_list(kernel, &self.pipeline.counts)
    }

    /// Refreshes what status and metrics show; `conns` also walks the connection
    /// table, `passes` counts the pass cache (both a syscall per entry). Returns
    /// the kernel's count of lost records.
    fn refresh(&mut self, conns: bool, passes: bool) -> u64 {
        let kernel = self.guard.counters();
        let lost = kernel
            .iter()
            .find(|(s, _)| *s == Stat::EventsLost)
            .map_or(0, |(_, v)| *v);
        let counters = self.counters(&kernel);
        let store_len = self.pipeline.store.lock().expect("store lock").live();
        let by_action = self
            .pipeline
            .counts
            .by_action()
            .into_iter()
            .map(|(t, n)| (t.as_str(), n))
            .collect();
        let (n_conns, held) = if conns {
            let (n, h) = self.guard.conn_fill(monotonic_ns());
            (Some(n), h)
        } else {
            (None, 0)
        };
        let n_passed = passes.then(|| self.guard.passed_count());
        let mut snap = self.snap.lock().expect("snapshot lock");
        snap.counters = counters;
        snap.by_action = by_action;
        snap.config = output::config_json(&self.s, self.advertised);
        snap.allow = self.s.live.allow.len() as u64;
        snap.conns_capacity = u64::from(self.s.fixed.max_connections);
        snap.passed_capacity = u64::from(DEFAULT_MAX_PASSED);
        snap.verdict_store = store_len as u64;
        snap.fleet = self
            .fleet
            .as_ref()
            .map(|f| f.status.lock().expect("fleet status lock").clone());
        if let Some(n) = n_conns {
            snap.conns = n;
            snap.held_now = held;
        }
        if let Some(n) = n_passed {
            snap.passed = n;
        }
        lost
    }

    /// The kernel's pass cache as (address, age), without expired entries.
    fn local_passes(&self, now_ns: u64) -> Vec<(IpAddr, Duration)> {
        self.guard
            .passed()
            .into_iter()
            .map(|(a, t)| {
                (
                    Ipv6Addr::from(a).to_canonical(),
                    Duration::from_nanos(now_ns.saturating_sub(t)),
                )
            })
            .filter(|(_, age)| *age < self.s.live.pass_ttl)
            .collect()
    }

    fn save_passes(&self) {
        if self.s.live.pass_ttl.is_zero() {
            return;
        }
        let entries = self.local_passes(monotonic_ns());
        if let Err(e) = passcache::save(&self.s.fixed.state_dir, &entries, SystemTime::now()) {
            log::warn!("pass cache not saved: {e:#}");
        }
    }

    fn restore_passes(&mut self) {
        let (dir, ttl) = (&self.s.fixed.state_dir, self.s.live.pass_ttl);
        if ttl.is_zero() {
            return;
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            log::warn!(
                "state directory {}: {e}; the pass cache will not survive a restart",
                dir.display()
            );
            return;
        }
        match passcache::load(dir, ttl, SystemTime::now()) {
            Ok(entries) => {
                let now = monotonic_ns();
                let kernel: Vec<([u8; 16], u64)> = entries
                    .iter()
                    .filter(|(_, age)| (age.as_nanos() as u64) < now)
                    .map(|(ip, age)| (loader::mapped(*ip), now - age.as_nanos() as u64))
                    .collect();
                match self.guard.restore_passed(&kernel) {
                    Ok(n) if n > 0 => log::info!("pass cache: {n} address(es) restored"),
                    Ok(_) => {}
                    Err(e) => log::warn!("pass cache not restored: {e:#}"),
                }
            }
            Err(e) => log::warn!("pass cache not restored: {e:#}"),
        }
    }
}

/// The kernel's counters (as read), then the agent's, by name.
fn counter_list(kernel: &[(Stat, u64)], agent: &Counts) -> Vec<(&'static str, u64)> {
    let mut c: Vec<(&'static str, u64)> = kernel.iter().map(|(s, v)| (s.name(), *v)).collect();
    c.extend(agent.list());
    c
}

/// The watched ports, and those of them behind a PROXY protocol balancer.
type Ports = (Vec<u16>, Vec<u16>);

/// A thread that asks the MTA whether it advertises PIPECONNECT every
/// PROBE_EVERY, or at once when given new ports (a reload). It ends when the
/// daemon drops it.
struct Prober {
    ports: std::sync::mpsc::Sender<Ports>,
    latest: Arc<Mutex<Option<bool>>>,
}

impl Prober {
    fn start(ports: Ports, first: Option<bool>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Ports>();
        let latest = Arc::new(Mutex::new(first));
        let out = latest.clone();
        let spawned = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let mut ports = ports;
                loop {
                    match rx.recv_timeout(PROBE_EVERY) {
                        Ok(p) => ports = p,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let answer = probe::any_advertises(&ports.0, &ports.1);
                    *out.lock().expect("probe lock") = answer;
                }
            });
        if let Err(e) = spawned {
            // The start-up answer stays in force.
            log::warn!("PIPECONNECT will not be re-checked: {e}");
        }
        Prober { ports: tx, latest }
    }

    fn ask(&self, ports: Ports) {
        let _ = self.ports.send(ports);
    }

    fn latest(&self) -> Option<bool> {
        *self.latest.lock().expect("probe lock")
    }
}
