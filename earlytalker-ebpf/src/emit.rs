//! Records for the agent, through the EVENTS ring buffer.

use crate::maps::{stat, EVENTS};
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use earlytalker_common::{Conn, ConnFlags, ConnKey, Event, EventKind, Reason, Stat};

/// Wake the agent each time this much more is waiting in the ring buffer; below
/// it, records wait for the agent's next poll (every 50 ms), sparing a wakeup per
/// connection under load.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// Ring-buffer space one Event takes: the record plus its 8-byte header, rounded
/// to 8 bytes as the kernel does.
const EVENT_RECORD_BYTES: u64 = (core::mem::size_of::<Event>() as u64 + 8 + 7) & !7;

#[inline(always)]
pub fn emit(kind: EventKind, reason: Reason, key: &ConnKey, conn: &Conn, now_ns: u64, wake: bool) {
    // Enforcement waits for the agent (it sends the reply), and so does a
    // held connection (its release is timed there): wake it now.
    let urgent = wake
        || kind == EventKind::Held
        || kind == EventKind::Early && conn.has(ConnFlags::DENY)
        || kind == EventKind::Verdict
            && matches!(reason, Reason::ClientFin | Reason::BadProxyHeader)
            && conn.before_accept();
    // Otherwise only when this record takes the backlog past a multiple of
    // WAKEUP_BYTES: a wakeup is an interrupt, and one per record while the agent
    // lags cost 14 % of the machine's CPU with the agent stopped.
    let pending = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let crossing = pending / WAKEUP_BYTES != (pending + EVENT_RECORD_BYTES) / WAKEUP_BYTES;
    let wake = if urgent || crossing {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.reserve::<Event>(0) {
        Some(mut e) => {
            let ev = e.as_mut_ptr();
            // SAFETY: the reserved slot is exactly one Event and ours until submit.
            unsafe {
                (*ev).kind = kind as u32;
                (*ev).reason = reason as u32;
                (*ev).now_ns = now_ns;
                (*ev).key = *key;
                (*ev).conn = *conn;
            }
            e.submit(u64::from(wake));
        }
        None => stat(Stat::EventsLost),
    }
}
