//! A small lab for earlytalker's privileged tests, bench and demo: a client and
//! a server network namespace joined by a veth pair (`lab`), an SMTP responder
//! in the server namespace (`responder`), polite and rude clients in the client
//! namespace (`clients`), the real agent binary attached to the server's veth
//! (`agent`), a private Postfix (`postfix`), and the usual set-up of the three
//! (`Rig`). Everything is torn down on drop, and every wait is bounded.
//!
//! Constants the agent defines (its reply text, its kernel object) are taken
//! from the agent's own crate, never copied.

pub mod agent;
pub mod clients;
pub mod exim;
pub mod fuzz;
pub mod haproxy;
pub mod lab;
pub mod mta;
pub mod opensmtpd;
pub mod postfix;
pub mod redis;
pub mod responder;
mod rig;
pub mod sendmail;

pub use agent::*;
pub use clients::*;
pub use exim::*;
pub use lab::*;
pub use mta::*;
pub use opensmtpd::*;
pub use postfix::*;
pub use responder::*;
pub use rig::*;
pub use sendmail::*;

/// The text of the agent's refusals (qpsmtpd's wording).
pub use earlytalker::actions::REPLY_TEXT;

/// The reply line the agent sends a denied client in place of the greeting.
pub fn reply_line(action: &str) -> String {
    let action = match action {
        "deny" => earlytalker::config::Action::Deny,
        "denysoft" => earlytalker::config::Action::Denysoft,
        other => panic!("no reply for action {other}"),
    };
    earlytalker::actions::reply_line(action)
}

/// The kernel programs exactly as the agent embeds and loads them.
pub fn kernel_object() -> &'static [u8] {
    earlytalker::loader::OBJECT
}
