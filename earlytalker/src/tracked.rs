//! The keeper of the kernel's TRACKED filter (see earlytalker-common): a thread
//! that every `sweep_every`
//!
//! * deletes entries the kernel never deletes itself: handshakes that never
//!   completed (scans, SYN floods, lost clients), denied connections whose
//!   client has long stopped retransmitting, and anything older than an SMTP
//!   session lasts. Without this, the LRU maps fill with them and every bucket
//!   of the filter ends up in use;
//! * lowers the counts that entries evicted by the LRU maps left too high.
//!
//! The kernel keeps each count at or above the entries it covers (it adds before
//! it inserts, subtracts after it removes). A count too high only costs two
//! look-ups; one too low would skip a tracked connection. So this thread
//! subtracts only for entries it removed itself, and lowers a count only with a
//! compare-and-swap that fails if the bucket changed while the maps were read.

use crate::{
    counts::{AgentStat, Counts},
    release::monotonic_ns,
    status,
};
use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use earlytalker_common::{
    Conn, ConnFlags, ConnKey, Handshake, TRACKED_ADD, TRACKED_BUCKETS, TRACKED_SUB,
};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::{
    collections::{HashMap as StdMap, HashSet},
    num::NonZeroUsize,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// When an entry is surely dead.
#[derive(Clone, Copy, Debug)]
pub struct Stale {
    /// A handshake entry unchanged this long: a SYN-ACK is retransmitted for at
    /// most ~63 s and a SYN cookie is honoured for about two minutes.
    pub handshake: Duration,
    /// A denied connection this old: its client's retransmissions (dropped
    /// while the entry lasts) end within tcp_retries2, ~15 minutes.
    pub denied: Duration,
    /// Any connection this old: longer than any SMTP session earlytalker
    /// tracks (early talkers kept for defer-reject until their connection ends).
    pub any: Duration,
}

impl Stale {
    pub const DEFAULT: Stale = Stale {
        handshake: Duration::from_secs(180),
        denied: Duration::from_secs(16 * 60),
        any: Duration::from_secs(3600),
    };

    /// One age for every kind (tests).
    pub fn after(d: Duration) -> Stale {
        Stale {
            handshake: d,
            denied: d,
            any: d,
        }
    }
}
/// Longer than any program run: a count read before it is final once this has
/// passed, and a removal made during the walk has been subtracted.
const SETTLE: Duration = Duration::from_millis(10);

/// The TRACKED array, mapped into this process.
pub struct Filter {
    base: NonNull<std::ffi::c_void>,
    len: NonZeroUsize,
}

// SAFETY: the mapping is shared memory touched only through atomics.
unsafe impl Send for Filter {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Filter {}

impl Filter {
    pub fn map(fd: BorrowedFd<'_>) -> Result<Self> {
        let len = NonZeroUsize::new(TRACKED_BUCKETS as usize * 8).context("empty filter")?;
        // SAFETY: a shared mapping of the kernel's BPF_F_MMAPABLE array of
        // exactly this size; it is unmapped only in Drop.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .context("mapping the TRACKED filter")?;
        Ok(Filter { base, len })
    }

    /// Entries of CONNS and HANDSHAKES, as counted (at least the truth).
    pub fn counted(&self) -> u64 {
        self.buckets()
            .iter()
            .map(|c| u64::from(count(c.load(Ordering::Relaxed))))
            .sum()
    }

    pub fn buckets(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds TRACKED_BUCKETS aligned u64s and lives as
        // long as self; the kernel and this thread change them only atomically.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast(), TRACKED_BUCKETS as usize) }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        let _ = unsafe { munmap(self.base, self.len.get()) };
    }
}

fn count(v: u64) -> u32 {
    v as u32
}

/// After this process removed an entry of `bucket`.
pub fn removed(buckets: &[AtomicU64], bucket: u32) {
    buckets[bucket as usize].fetch_add(TRACKED_SUB, Ordering::SeqCst);
}

/// Lowers to `truth` each count above it whose bucket has not changed since
/// `before` was read (every change moves the upper half). Returns how many.
pub fn repair(buckets: &[AtomicU64], before: &[u64], truth: &[u32]) -> u64 {
    let mut n = 0;
    for ((cell, &v), &t) in buckets.iter().zip(before).zip(truth) {
        if count(v) <= t {
            continue;
        }
        let lowered = ((v >> 32).wrapping_add(1) << 32) | u64::from(t);
        if cell
            .compare_exchange(v, lowered, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// What the last round found, for `status` and the metrics.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// Entries in CONNS and HANDSHAKES.
    pub entries: u64,
    /// Sum of the filter's counts (equal to `entries` unless evictions left
    /// some too high, or the maps changed during the round).
    pub counted: u64,
    /// Buckets whose count is not zero: the share of segments that still need
    /// a hash look-up.
    pub in_use: u64,
}

pub struct Parts {
    pub conns: HashMap<MapData, ConnKey, Conn>,
    pub handshakes: HashMap<MapData, ConnKey, Handshake>,
    pub filter: std::sync::Arc<Filter>,
    pub counts: Counts,
    pub snap: status::Shared,
    pub every: Duration,
    pub stale: Stale,
}

/// The thread; it ends when dropped.
pub struct Keeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    pub fn start(parts: Parts) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sweep".into())
            .spawn(move || run(parts, &rx))
            .context("starting the sweep thread")?;
        Ok(Keeper {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut p: Parts, stop: &mpsc::Receiver<()>) {
    let mut seen = StdMap::new();
    loop {
        match stop.recv_timeout(p.every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let fill = round(&mut p, &mut seen, stop);
        p.snap.lock().expect("snapshot lock").filter = fill;
    }
}

/// One sweep and repair. `seen`: handshake entries from earlier rounds, with
/// the server ISN and when first seen with it.
fn round(
    p: &mut Parts,
    seen: &mut StdMap<ConnKey, (u32, Instant)>,
    stop: &mpsc::Receiver<()>,
) -> Fill {
    let buckets = p.filter.buckets();
    let before: Vec<u64> = buckets.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    if before.iter().all(|v| count(*v) == 0) {
        // Both maps are empty: nothing to sweep or repair.
        seen.clear();
        return Fill::default();
    }
    if stop.recv_timeout(SETTLE).is_ok() {
        return Fill::default();
    }
    let mut truth = vec![0u32; buckets.len()];
    let mut swept = 0;

    // A walk restarts when the key it stands on is deleted: keys are counted once.
    let entries: Vec<(ConnKey, Handshake)> = p.handshakes.iter().filter_map(Result::ok).collect();
    let mut walked = HashSet::with_capacity(entries.len());
    let mut still = StdMap::with_capacity(entries.len());
    for (k, h) in entries {
        if !walked.insert(k) {
            continue;
        }
        let since = match seen.get(&k) {
            Some(&(isn, t)) if isn == h.server_isn => t,
            _ => Instant::now(),
        };
        if since.elapsed() >= p.stale.handshake && p.handshakes.remove(&k).is_ok() {
            removed(buckets, k.bucket());
            swept += 1;
            continue;
        }
        still.insert(k, (h.server_isn, since));
        truth[k.bucket() as usize] += 1;
    }
    *seen = still;

    let now = monotonic_ns();
    let entries: Vec<(ConnKey, Conn)> = p.conns.iter().filter_map(Result::ok).collect();
    walked.clear();
    for (k, c) in entries {
        if !walked.insert(k) {
            continue;
        }
        let age = Duration::from_nanos(now.saturating_sub(c.established_ns));
        let stale = age > p.stale.any || (c.has(ConnFlags::DENY) && age > p.stale.denied);
        if stale && p.conns.remove(&k).is_ok() {
            removed(buckets, k.bucket());
            swept += 1;
            continue;
        }
        truth[k.bucket() as usize] += 1;
    }

    // Removals the kernel made during the walk are subtracted by now.
    let _ = stop.recv_timeout(SETTLE);
    let repaired = repair(buckets, &before, &truth);
    for _ in 0..swept {
        p.counts.add(AgentStat::StaleSwept);
    }
    for _ in 0..repaired {
        p.counts.add(AgentStat::FilterRepairs);
    }
    if swept + repaired > 0 {
        log::debug!("swept {swept} stale kernel entries, repaired {repaired} filter counts");
    }
    // Counts after the repair (`now` above is the clock's).
    let counts: Vec<u32> = buckets
        .iter()
        .map(|c| count(c.load(Ordering::Relaxed)))
        .collect();
    Fill {
        entries: truth.iter().map(|&t| u64::from(t)).sum(),
        counted: counts.iter().map(|&c| u64::from(c)).sum(),
        in_use: counts.iter().filter(|&&c| c != 0).count() as u64,
    }
}

// The layout the kernel relies on: an add moves both halves up.
const _: () = assert!(TRACKED_ADD == (1 << 32) + 1 && TRACKED_SUB == (1 << 32) - 1);

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(v: &[u64]) -> Vec<AtomicU64> {
        v.iter().map(|&x| AtomicU64::new(x)).collect()
    }

    #[test]
    fn kernel_arithmetic_keeps_count_and_changes() {
        let c = cells(&[0]);
        c[0].fetch_add(TRACKED_ADD, Ordering::SeqCst);
        c[0].fetch_add(TRACKED_ADD, Ordering::SeqCst);
        removed(&c, 0);
        let v = c[0].load(Ordering::SeqCst);
        assert_eq!((v >> 32, count(v)), (3, 1));
    }

    #[test]
    fn repair_lowers_only_unchanged_buckets_and_never_below_truth() {
        let before = [(5 << 32) | 3, (7 << 32) | 2, (1 << 32) | 1, 0];
        let c = cells(&before);
        // Bucket 1 changes while the maps are read (the kernel adds an entry).
        c[1].fetch_add(TRACKED_ADD, Ordering::SeqCst);
        let truth = [1, 0, 1, 0];
        assert_eq!(repair(&c, &before, &truth), 1);
        let now: Vec<u64> = c.iter().map(|x| x.load(Ordering::SeqCst)).collect();
        // Lowered to the truth, and marked changed.
        assert_eq!(now[0], (6 << 32) | 1);
        // Changed under us: left as it is (too high is harmless).
        assert_eq!(now[1], (8 << 32) | 3);
        // Already right, or empty: untouched.
        assert_eq!(now[2], before[2]);
        assert_eq!(now[3], 0);
    }
}
