//! The kernel/agent ABI, defined once in the eBPF crate and included here.

#[path = "../../earlytalker-ebpf/src/shared.rs"]
#[allow(dead_code)] // the kernel side uses the rest
mod defs;
pub use defs::*;

// SAFETY (all four): plain #[repr(C)] data with explicit padding, any bit pattern valid.
unsafe impl aya::Pod for ConnKey {}
unsafe impl aya::Pod for Conn {}
unsafe impl aya::Pod for Handshake {}
unsafe impl aya::Pod for Config {}
