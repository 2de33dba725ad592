//! earlytalker: catches SMTP clients that talk before the greeting, in the kernel,
//! in front of any unmodified MTA.
//!
//! The agent's modules, by concern. A library so that the test suite takes its
//! constants (reply text, the embedded kernel object) from the agent itself.
//!
//! * start-up and the event loop: `daemon`; what a kernel record leads to:
//!   `pipeline` (with `events`, `store`, `actions`, `output`, `counts`);
//! * the hold before accept: `release` (a thread that completes held handshakes
//!   on time), with `forge` (segments the agent writes) and `diag` (sock_diag);
//! * the kernel side: `loader` (load, configure, attach), `iface`, `privs`;
//!   the MTA's listeners (an option that defeats the hold): `listeners`;
//! * the journal's line priorities: `journal`;
//! * what the MTA and the operator ask: `policy`, `milter`, `opensmtpd` (a
//!   filter OpenSMTPD runs), `listen`, `status`,
//!   `metrics`; settings: `config`; the pass cache on disk: `passcache`;
//! * stale kernel entries and the filter in front of the maps: `tracked`; the
//!   wait under load: `stress`; the penalty box's bookkeeping: `penalty`.

pub mod actions;
pub mod config;
pub mod counts;
pub mod daemon;
pub mod diag;
pub mod events;
pub mod fleet;
pub mod forge;
pub mod iface;
pub mod journal;
pub mod listen;
pub mod listeners;
pub mod loader;
pub mod metrics;
pub mod milter;
pub mod opensmtpd;
pub mod output;
pub mod passcache;
pub mod penalty;
pub mod pipeline;
pub mod policy;
pub mod privs;
pub mod probe;
pub mod proxy;
pub mod release;
pub mod status;
pub mod store;
pub mod stress;
pub mod tracked;
