//! Enforcement against a denied early talker (deny, denysoft):
//!
//! 1. the client gets one SMTP reply line and a FIN in place of the greeting
//!    (`forge::reply`), starting at the server's ISN + 1 and acknowledging all
//!    its bytes;
//! 2. the server forgets the connection: a connection still held before the MTA
//!    accepted it loses its request socket to a RST forged from the client (the
//!    MTA never hears of it); one the MTA already has is torn down with sock_diag
//!    SOCK_DESTROY, freeing its process (its next read fails with ECONNABORTED).
//!
//! The kernel programs already drop everything else on the connection, both ways.

use crate::config::Action;
use crate::diag::Diag;
use crate::events::{client_of, server_of};
use crate::forge::{self, Raw};
use anyhow::{anyhow, Result};
use earlytalker_common::{Conn, ConnFlags, ConnKey};

/// qpsmtpd's text, with RFC 3463 enhanced status codes.
pub const REPLY_TEXT: &str = "Connecting host started transmitting before SMTP greeting";

pub fn reply_line(action: Action) -> String {
    let code = match action {
        Action::Deny => "554 5.7.1",
        _ => "421 4.7.1",
    };
    format!("{code} {REPLY_TEXT}\r\n")
}

pub struct Enforcer {
    raw: Raw,
    diag: Diag,
}

/// What went wrong in one step of a teardown (the others still ran).
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply_error: Option<String>,
    pub destroy_error: Option<String>,
}

impl Enforcer {
    pub fn new() -> Result<Self> {
        Ok(Enforcer {
            raw: Raw::new().map_err(|e| anyhow!("replies: {e:#}"))?,
            diag: Diag::new()?,
        })
    }

    /// Whether this kernel can destroy sockets (see `Diag::probe_destroy`).
    pub fn probe_destroy(&mut self) -> Result<()> {
        self.diag.probe_destroy()
    }

    /// Replies to the client, and has the server forget the connection.
    pub fn deny(&mut self, key: &ConnKey, conn: &Conn, action: Action) -> Outcome {
        let reply =
            forge::reply(key, conn, action).and_then(|p| self.raw.send(&p, client_of(key).ip()));
        Outcome {
            reply_error: reply.err().map(|e| format!("sending the reply: {e:#}")),
            destroy_error: self.forget(key, conn).err().map(|e| format!("{e:#}")),
        }
    }

    /// A held client hung up before its greeting: the request socket goes, and
    /// the client gets a RST for its FIN. The MTA never hears of it.
    pub fn abort(&mut self, key: &ConnKey, conn: &Conn) -> Result<()> {
        self.reset_request(key, conn)?;
        let rst = forge::client_reset(key, conn)?;
        self.raw.send(&rst, client_of(key).ip())
    }

    fn reset_request(&mut self, key: &ConnKey, conn: &Conn) -> Result<()> {
        if conn.has(ConnFlags::COOKIE) {
            // A cookie leaves no state to drop.
            return Ok(());
        }
        let rst = forge::server_reset(key, conn)?;
        self.raw.send(&rst, server_of(key).ip())
    }

    /// Drops the server's side of a denied connection.
    fn forget(&mut self, key: &ConnKey, conn: &Conn) -> Result<()> {
        let (client, server) = (client_of(key), server_of(key));
        if conn.before_accept() {
            self.reset_request(key, conn)
                .map_err(|e| anyhow!("resetting the request socket: {e:#}"))?;
            // Racing the release, the MTA may have it already: tear that down too.
            self.diag.destroy(client, server)?;
            return Ok(());
        }
        if !self.diag.destroy(client, server)? {
            return Err(anyhow!("the MTA's socket is already gone"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_follow_rfc5321() {
        assert_eq!(
            reply_line(Action::Deny),
            "554 5.7.1 Connecting host started transmitting before SMTP greeting\r\n"
        );
        assert!(reply_line(Action::Denysoft).starts_with("421 4.7.1 Connecting host"));
        // RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with CRLF.
        assert!(reply_line(Action::Deny).len() <= 512);
    }
}
