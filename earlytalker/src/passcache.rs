//! Saving and restoring the kernel's pass cache across restarts, so that a
//! restart does not re-delay every known sender. The kernel keeps monotonic
//! times; the file keeps wall-clock times, valid across reboots.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub const FILE_NAME: &str = "pass-cache.json";
/// Bound on entries read back (the kernel map is bounded the same way).
const MAX_ENTRIES: usize = earlytalker_common::DEFAULT_MAX_PASSED as usize;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Saved {
    version: u32,
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Entry {
    addr: IpAddr,
    /// When the address passed, in ms since the Unix epoch.
    passed_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `(address, age)` pairs atomically (temporary file, then rename).
pub fn save(dir: &Path, entries: &[(IpAddr, Duration)], now: SystemTime) -> Result<()> {
    let now_ms = unix_ms(now);
    let saved = Saved {
        version: 1,
        entries: entries
            .iter()
            .map(|(addr, age)| Entry {
                addr: *addr,
                passed_ms: now_ms.saturating_sub(age.as_millis() as u64),
            })
            .collect(),
    };
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&saved)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(FILE_NAME)).context("replacing the pass cache file")
}

/// Reads back the entries still younger than `ttl`, as `(address, age)`.
pub fn load(dir: &Path, ttl: Duration, now: SystemTime) -> Result<Vec<(IpAddr, Duration)>> {
    let path = dir.join(FILE_NAME);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: Saved =
        serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?;
    let now_ms = unix_ms(now);
    Ok(saved
        .entries
        .into_iter()
        // A pass from the future (clock stepped back) counts as fresh.
        .map(|e| {
            (
                e.addr,
                Duration::from_millis(now_ms.saturating_sub(e.passed_ms)),
            )
        })
        .filter(|(_, age)| *age < ttl)
        .take(MAX_ENTRIES)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_drops_expired() {
        let dir = std::env::temp_dir().join(format!("et-pc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        save(
            &dir,
            &[(a, Duration::from_secs(10)), (b, Duration::from_secs(3000))],
            t0,
        )
        .unwrap();
        // One hour later with a 1 h ttl: b (passed 3000 s before t0) is gone.
        let back = load(
            &dir,
            Duration::from_secs(3600 + 60),
            t0 + Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(back, vec![(a, Duration::from_secs(3610))]);
        assert!(load(&dir, Duration::from_secs(1), t0).unwrap().is_empty());
        std::fs::write(dir.join(FILE_NAME), b"garbage").unwrap();
        assert!(load(&dir, Duration::from_secs(1), t0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(load(&dir, Duration::from_secs(1), t0).unwrap().is_empty());
    }
}
