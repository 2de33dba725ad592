//! Least privilege: once the programs are attached and the sockets bound, the
//! agent keeps only CAP_NET_ADMIN (SOCK_DESTROY is checked when the request is
//! sent). Map reads and updates go through file descriptors it already holds,
//! and the raw reply sockets are already open.
//!
//! Capabilities are per thread: this must run before any thread is spawned.

use anyhow::{Context, Result};
use caps::{CapSet, Capability, CapsHashSet};

pub const KEEP: &[Capability] = &[Capability::CAP_NET_ADMIN];

pub fn drop_privileges() -> Result<()> {
    let keep: CapsHashSet = KEEP.iter().copied().collect();
    // The bounding set first, while CAP_SETPCAP is still held. Without it (the
    // shipped systemd unit does not grant it) the bounding set cannot shrink, and
    // need not: the unit's CapabilityBoundingSet already bounds the agent, and
    // no_new_privs (below, and in the unit) keeps exec from regaining anything.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::all() {
            if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c)
                    .with_context(|| format!("dropping {c} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
    Ok(())
}
