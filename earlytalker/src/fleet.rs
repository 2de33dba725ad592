//! Fleet-shared state on Redis or Valkey (`--shared-cache URL`): passes and
//! early talks of every relay reach every other relay's kernel pass cache and
//! penalty box. Redis is never on a packet's path: the kernel maps stay the
//! fast path, and this task only feeds them, off the event loop's hot path.
//!
//! Layout (prefix `earlytalker:`): `pass:ADDR` holds a pass as JSON with a
//! PXAT expiry at its end; channels `pass` and `talk` carry each new pass and
//! early talk as they happen; a resync every RESYNC_EVERY (and after each
//! reconnection) reads every `pass:*` key back, for what pub/sub missed.
//!
//! Redis down, slow or restarted: one line when it goes, one when it returns,
//! reconnection with bounded backoff, and what this relay learnt meanwhile is
//! published once it is back (bounded), then the whole local pass cache.

use crate::counts::{AgentStat, Counts};
use anyhow::{anyhow, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tokio::sync::mpsc;

const PREFIX: &str = "earlytalker:";
const PASS_CHANNEL: &str = "earlytalker:pass";
const TALK_CHANNEL: &str = "earlytalker:talk";
/// Every pass key is read back this often, for what pub/sub missed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// A PING this often tells a hung server from a quiet fleet.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Connecting and each command: longer counts as an outage.
const TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// News kept while Redis is away, published when it returns (oldest dropped).
const PENDING_MAX: usize = 10_000;
/// Keys read per SCAN/MGET round of a resync.
const SCAN_BATCH: usize = 1000;
/// Unreadable messages or values logged at most this often (all are counted).
const GARBAGE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The operator's URL, and the same with any password masked for logs and status.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheUrl {
    url: String,
    shown: String,
}

impl std::fmt::Debug for CacheUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for CacheUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Only the masked form is ever serialized (status, the reload's comparison).
impl Serialize for CacheUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown)
    }
}

impl CacheUrl {
    /// `redis://[user:pass@]HOST:PORT/DB`, `rediss://…` (TLS), `unix:///PATH` or
    /// `redis+unix:///PATH?db=N&pass=…`. Errors never repeat the URL (it may
    /// hold a password).
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
        match u.scheme() {
            "redis" | "rediss" | "valkey" | "valkeys" | "unix" | "redis+unix" | "valkey+unix" => {}
            other => {
                return Err(format!(
                    "scheme '{other}' is not redis://, rediss://, unix:// or redis+unix://"
                ))
            }
        }
        redis::Client::open(s).map_err(|e| format!("not usable ({:?})", e.kind()))?;
        let mut m = u.clone();
        if m.password().is_some() {
            let _ = m.set_password(Some("****"));
        }
        if m.query_pairs().any(|(k, _)| k == "pass" || k == "password") {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "pass" || k == "password" {
                        "****".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            m.query_pairs_mut().clear().extend_pairs(pairs);
        }
        Ok(CacheUrl {
            url: s.to_string(),
            shown: m.to_string(),
        })
    }

    fn tls(&self) -> bool {
        self.url.starts_with("rediss:") || self.url.starts_with("valkeys:")
    }
}

/// A pass or an early talk, as it travels between relays.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Wire {
    pub addr: IpAddr,
    /// When it happened, ms since the Unix epoch.
    pub at_ms: u64,
    /// Which relay saw it (`host/pid`).
    pub relay: String,
}

impl Wire {
    fn json(&self) -> String {
        serde_json::to_string(self).expect("plain struct")
    }
}

/// What the event loop hands to the fleet task.
#[derive(Debug)]
pub enum Note {
    /// A client passed a real hold here; the pass lasts `ttl`.
    Pass {
        addr: IpAddr,
        at_ms: u64,
        ttl: Duration,
    },
    /// A client talked early here: it loses its pass fleet-wide.
    Talk { addr: IpAddr, at_ms: u64 },
    /// This relay's whole pass cache, asked for after a (re)connection.
    Snapshot {
        passes: Vec<(IpAddr, u64)>,
        ttl: Duration,
    },
}

/// What the fleet task hands to the event loop.
#[derive(Debug, PartialEq)]
pub enum Heard {
    /// Another relay's pass (or one read back by a resync).
    Pass(Wire),
    /// Another relay's early talker.
    Talk(Wire),
    /// Connected (again): send a Snapshot.
    Connected,
}

/// Shown by `status` and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub url: String,
    /// "connecting", "up" or "down".
    pub state: &'static str,
    pub since_unix: u64,
    pub relay: String,
    pub last_error: Option<String>,
    pub last_resync_unix: u64,
    pub pending: u64,
    /// The latest early talkers other relays reported (newest last).
    pub recent_talks: VecDeque<Wire>,
}

/// Early talkers of other relays kept for `status`.
const RECENT_TALKS: usize = 20;

/// The event loop's end for news out: never blocks.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Note>,
    counts: Counts,
}

impl Publisher {
    /// Hands `n` to the fleet task; if it is that far behind, `n` is dropped
    /// and counted.
    pub fn send(&self, n: Note) {
        if self.tx.try_send(n).is_err() {
            self.counts.add(AgentStat::SharedDropped);
        }
    }
}

/// The fleet task's own state.
struct Task {
    url: CacheUrl,
    relay: String,
    counts: Counts,
    status: Arc<Mutex<Status>>,
    rx: mpsc::Receiver<Note>,
    tx: mpsc::Sender<Heard>,
    /// News that could not be published yet.
    pending: VecDeque<Note>,
    last_garbage_log: Option<Instant>,
}

/// Starts the fleet task on the current tokio runtime: news goes out through
/// the Publisher, the other relays' news comes in on the receiver.
pub fn start(
    url: CacheUrl,
    counts: Counts,
    status: Arc<Mutex<Status>>,
) -> (Publisher, mpsc::Receiver<Heard>) {
    if url.tls() {
        // rustls needs one crypto provider per process; ours is ring. Another
        // one already installed is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let relay = format!(
        "{}/{}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into()),
        std::process::id()
    );
    {
        let mut s = status.lock().expect("fleet status lock");
        s.url = url.to_string();
        s.state = "connecting";
        s.relay = relay.clone();
    }
    let (note_tx, note_rx) = mpsc::channel(4096);
    let (heard_tx, heard_rx) = mpsc::channel(4096);
    let task = Task {
        url,
        relay,
        counts: counts.clone(),
        status,
        rx: note_rx,
        tx: heard_tx,
        pending: VecDeque::new(),
        last_garbage_log: None,
    };
    tokio::spawn(task.run());
    (
        Publisher {
            tx: note_tx,
            counts,
        },
        heard_rx,
    )
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads a pass or talk; None for anything else (counted and logged by the caller).
pub fn parse_wire(bytes: &[u8]) -> Option<Wire> {
    serde_json::from_slice(bytes).ok()
}

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        loop {
            let client = match redis::Client::open(self.url.url.as_str()) {
                Ok(c) => c,
                // Checked at start-up; cannot happen.
                Err(e) => {
                    log::error!("shared cache {}: {:?}", self.url, e.kind());
                    return;
                }
            };
            let err = match self.serve(&client, &mut down_since).await {
                Ok(()) => return, // the event loop is gone
                Err(e) => e,
            };
            if down_since.is_none() {
                down_since = Some(Instant::now());
                self.counts.add(AgentStat::SharedOutages);
                // Never connected yet: it was not lost, it was never there.
                if self.state() == "connecting" {
                    log::warn!(
                        "shared cache {} unreachable: {err:#}; working on local state, retrying",
                        self.url
                    );
                } else {
                    log::warn!(
                        "shared cache {} lost: {err:#}; working on local state, reconnecting",
                        self.url
                    );
                }
                backoff = BACKOFF_MIN;
            }
            self.set_state("down", Some(format!("{err:#}")));
            // Wait, but keep taking news so the event loop never blocks.
            let until = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    n = self.rx.recv() => match n {
                        Some(n) => self.keep(n),
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn state(&self) -> &'static str {
        self.status.lock().expect("fleet status lock").state
    }

    fn set_state(&self, state: &'static str, err: Option<String>) {
        let mut s = self.status.lock().expect("fleet status lock");
        if s.state != state {
            s.since_unix = unix_ms(SystemTime::now()) / 1000;
        }
        s.state = state;
        if err.is_some() {
            s.last_error = err;
        }
        s.pending = self.pending.len() as u64;
    }

    /// Keeps `n` for when Redis is back (the oldest dropped beyond
    /// PENDING_MAX). A snapshot is not kept: one is asked for after every
    /// connection anyway.
    fn keep(&mut self, n: Note) {
        if matches!(n, Note::Snapshot { .. }) {
            return;
        }
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
            self.counts.add(AgentStat::SharedDropped);
        }
        self.pending.push_back(n);
    }

    /// One connection's life: Err when it ends, Ok when the agent stops.
    async fn serve(
        &mut self,
        client: &redis::Client,
        down_since: &mut Option<Instant>,
    ) -> Result<()> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(failed)?;
        let mut sub = tokio::time::timeout(TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| anyhow!("subscribing timed out"))?
            .map_err(failed)?;
        tokio::time::timeout(TIMEOUT, sub.subscribe(&[PASS_CHANNEL, TALK_CHANNEL]))
            .await
            .map_err(|_| anyhow!("subscribing timed out"))?
            .map_err(failed)?;
        let mut messages = sub.into_on_message();
        match down_since.take() {
            Some(t) => log::info!(
                "shared cache {} back after {:.1} s; resynchronising",
                self.url,
                t.elapsed().as_secs_f64()
            ),
            None => log::info!("shared cache {} connected as {}", self.url, self.relay),
        }
        self.set_state("up", None);
        // What happened while away, then our whole cache, then theirs.
        while let Some(n) = self.pending.pop_front() {
            if let Err(e) = self.publish(&mut con, &n).await {
                self.pending.push_front(n);
                return Err(e);
            }
        }
        if self.tx.send(Heard::Connected).await.is_err() {
            return Ok(());
        }
        self.resync(&mut con).await?;
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.reset();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else { return Err(anyhow!("connection closed")) };
                    let talk = m.get_channel_name() == TALK_CHANNEL;
                    self.heard(m.get_payload_bytes(), talk, m.get_channel_name()).await?;
                }
                n = self.rx.recv() => {
                    let Some(n) = n else { return Ok(()) };
                    if let Err(e) = self.publish(&mut con, &n).await {
                        self.keep(n);
                        return Err(e);
                    }
                }
                _ = resync.tick() => self.resync(&mut con).await?,
                _ = ping.tick() => {
                    redis::cmd("PING")
                        .query_async::<()>(&mut con)
                        .await
                        .map_err(failed)?;
                }
            }
        }
    }

    /// One published message or read-back value, passed on if readable.
    /// Err only when the event loop is gone.
    async fn heard(&mut self, bytes: &[u8], talk: bool, whence: &str) -> Result<()> {
        let Some(w) = parse_wire(bytes) else {
            self.garbage(whence, bytes);
            return Ok(());
        };
        if w.relay == self.relay {
            return Ok(());
        }
        self.counts.add(AgentStat::SharedReceived);
        if talk {
            let mut s = self.status.lock().expect("fleet status lock");
            if s.recent_talks.len() == RECENT_TALKS {
                s.recent_talks.pop_front();
            }
            s.recent_talks.push_back(w.clone());
        }
        let h = if talk { Heard::Talk(w) } else { Heard::Pass(w) };
        self.tx
            .send(h)
            .await
            .map_err(|_| anyhow!("the agent is stopping"))
    }

    fn garbage(&mut self, whence: &str, bytes: &[u8]) {
        self.counts.add(AgentStat::SharedIgnored);
        if self
            .last_garbage_log
            .is_some_and(|t| t.elapsed() < GARBAGE_LOG_EVERY)
        {
            return;
        }
        self.last_garbage_log = Some(Instant::now());
        let shown: String = String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect();
        log::warn!(
            "shared cache: ignoring an unreadable value in {whence}: '{shown}' (counted in shared_cache_ignored; logged at most once a minute)"
        );
    }

    async fn publish(
        &mut self,
        con: &mut redis::aio::MultiplexedConnection,
        n: &Note,
    ) -> Result<()> {
        let mut p = redis::pipe();
        let mut count = 0;
        match n {
            Note::Pass { addr, at_ms, ttl } => {
                let w = self.wire(*addr, *at_ms);
                pass_set(&mut p, &w, *ttl);
                p.cmd("PUBLISH").arg(PASS_CHANNEL).arg(w.json()).ignore();
                count += 1;
            }
            Note::Talk { addr, at_ms } => {
                let w = self.wire(*addr, *at_ms);
                // An early talker loses its pass, fleet-wide as here.
                p.cmd("EVAL")
                    .arg(TALK_SCRIPT)
                    .arg(1)
                    .arg(pass_key(*addr))
                    .arg(*at_ms)
                    .ignore();
                p.cmd("PUBLISH").arg(TALK_CHANNEL).arg(w.json()).ignore();
                count += 1;
            }
            Note::Snapshot { passes, ttl } => {
                // In rounds, so that one reply never holds the whole cache.
                for chunk in passes.chunks(SCAN_BATCH) {
                    let mut p = redis::pipe();
                    for (addr, at_ms) in chunk {
                        pass_set(&mut p, &self.wire(*addr, *at_ms), *ttl);
                    }
                    p.query_async::<()>(con).await.map_err(failed)?;
                }
                self.counts
                    .add_n(AgentStat::SharedPublished, passes.len() as u64);
                return Ok(());
            }
        }
        p.query_async::<()>(con).await.map_err(failed)?;
        self.counts.add_n(AgentStat::SharedPublished, count);
        Ok(())
    }

    fn wire(&self, addr: IpAddr, at_ms: u64) -> Wire {
        Wire {
            addr,
            at_ms,
            relay: self.relay.clone(),
        }
    }

    /// Reads every pass key back (SCAN, then MGET in rounds).
    async fn resync(&mut self, con: &mut redis::aio::MultiplexedConnection) -> Result<()> {
        let mut cursor: u64 = 0;
        // Bounded: SCAN ends at cursor 0; the round cap guards a server that
        // never says so.
        for _ in 0..100_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}pass:*"))
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .query_async(con)
                .await
                .map_err(failed)?;
            if !keys.is_empty() {
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(con)
                    .await
                    .map_err(failed)?;
                for (k, v) in keys.iter().zip(values) {
                    // Gone between SCAN and MGET: expired.
                    let Some(v) = v else { continue };
                    match parse_wire(&v) {
                        // The key must name the address its value holds.
                        Some(w) if pass_key(w.addr) == *k => {
                            self.heard(&v, false, k).await?;
                        }
                        _ => self.garbage(k, &v),
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.status
            .lock()
            .expect("fleet status lock")
            .last_resync_unix = unix_ms(SystemTime::now()) / 1000;
        Ok(())
    }
}

pub fn pass_key(addr: IpAddr) -> String {
    format!("{PREFIX}pass:{addr}")
}

/// News may arrive late (published after an outage), so each change is
/// ordered by when it happened, not when it reached Redis: a pass replaces
/// only an older pass (or garbage); an early talk deletes only an older pass.
/// KEYS[1] the pass key; ARGV[1] the time; ARGV[2] the pass; ARGV[3] its end.
const PASS_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  local ok, p = pcall(cjson.decode, v)
  if ok and type(p) == 'table' and tonumber(p.at_ms) and tonumber(p.at_ms) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
return 1
"#;
const TALK_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  local ok, p = pcall(cjson.decode, v)
  if not (ok and type(p) == 'table' and tonumber(p.at_ms) and tonumber(p.at_ms) > tonumber(ARGV[1])) then
    redis.call('DEL', KEYS[1])
  end
end
return 0
"#;

/// Records the pass with its expiry at the pass's own end (already over: skipped).
fn pass_set(p: &mut redis::Pipeline, w: &Wire, ttl: Duration) {
    let end = w.at_ms.saturating_add(ms(ttl));
    if end <= unix_ms(SystemTime::now()) {
        return;
    }
    p.cmd("EVAL")
        .arg(PASS_SCRIPT)
        .arg(1)
        .arg(pass_key(w.addr))
        .arg(w.at_ms)
        .arg(w.json())
        .arg(end)
        .ignore();
}

/// A Redis error in one line, never with the URL (it may hold a password).
fn failed(e: redis::RedisError) -> anyhow::Error {
    let s = e.to_string();
    anyhow!("{}", s.lines().next().unwrap_or("error"))
}

/// `at_ms` (Unix) as CLOCK_MONOTONIC ns, given both clocks now; a time in the
/// future counts as now.
pub fn mono_of(at_ms: u64, now_unix_ms: u64, now_mono_ns: u64) -> u64 {
    let age_ns = now_unix_ms.saturating_sub(at_ms).saturating_mul(1_000_000);
    now_mono_ns.saturating_sub(age_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_errors_do_not_echo() {
        let u = CacheUrl::parse("redis://:s3cret@127.0.0.1:6379/2").unwrap();
        assert_eq!(u.to_string(), "redis://:****@127.0.0.1:6379/2");
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            "\"redis://:****@127.0.0.1:6379/2\""
        );
        let u = CacheUrl::parse("redis+unix:///run/redis.sock?db=1&pass=s3cret").unwrap();
        assert!(!u.to_string().contains("s3cret"), "{u}");
        assert!(u.to_string().contains("db=1"), "{u}");
        assert_eq!(
            CacheUrl::parse("unix:///run/redis.sock")
                .unwrap()
                .to_string(),
            "unix:///run/redis.sock"
        );
        for bad in ["http://:s3cret@h/", "redis//:s3cret@h", "s3cret"] {
            let e = CacheUrl::parse(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn wire_round_trip_and_garbage() {
        let w = Wire {
            addr: "2001:db8::1".parse().unwrap(),
            at_ms: 1_800_000_000_000,
            relay: "mx1/7".into(),
        };
        let s = serde_json::to_vec(&w).unwrap();
        assert_eq!(parse_wire(&s), Some(w));
        assert_eq!(parse_wire(b"garbage"), None);
        assert_eq!(
            parse_wire(br#"{"addr":"nonsense","at_ms":1,"relay":"x"}"#),
            None
        );
        assert_eq!(
            parse_wire(br#"{"addr":"192.0.2.1","at_ms":-1,"relay":"x"}"#),
            None
        );
    }

    #[test]
    fn unix_times_become_monotonic() {
        // 1.5 s ago, with the monotonic clock at 10 s.
        assert_eq!(mono_of(8_500, 10_000, 10_000_000_000), 8_500_000_000);
        // From the future: now.
        assert_eq!(mono_of(20_000, 10_000, 10_000_000_000), 10_000_000_000);
        // Older than the monotonic clock: 0 (and then older than any TTL).
        assert_eq!(mono_of(0, 100_000_000, 5), 0);
    }
}
