//! A milter (Postfix `smtpd_milters`, Sendmail `INPUT_MAIL_FILTER`) that refuses
//! early talkers' MAIL and RCPT for defer-reject: 554 5.7.1 (deny) or 451 4.7.1
//! (denysoft) with qpsmtpd's text; everyone else continues. The client's
//! address:port comes from the milter CONNECT command.

use crate::actions::REPLY_TEXT;
use crate::config::Action as Act;
use crate::listen::Service;
use crate::output::Out;
use crate::store::Store;
use async_trait::async_trait;
use miltr_common::{
    actions::{Action, Continue, Replycode},
    commands::{Connect, Mail, Recipient},
};
use miltr_server::{Milter, Server};
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// The milter's answer for an early talker with `action`, or None to continue.
pub fn reply_for(action: Act) -> Option<(u16, [u16; 3])> {
    match action {
        Act::Log => None,
        Act::Deny => Some((554, [5, 7, 1])),
        Act::Denysoft => Some((451, [4, 7, 1])),
    }
}

/// Parses the address of a milter CONNECT: Sendmail writes IPv6 as "IPv6:addr",
/// some MTAs bracket it.
pub fn parse_connect_addr(addr: &str, port: Option<u16>) -> Option<SocketAddr> {
    let a = addr.trim();
    let a = a.strip_prefix("IPv6:").unwrap_or(a);
    let a = a.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = a.parse().ok()?;
    Some(SocketAddr::new(ip.to_canonical(), port?))
}

struct EarlyMilter {
    store: Arc<Mutex<Store>>,
    out: Out,
    client: Option<SocketAddr>,
}

impl EarlyMilter {
    fn check(&self, state: &str, arg: &str) -> Action {
        let Some(client) = self.client else {
            return Continue.into();
        };
        let action = {
            let store = self.store.lock().expect("store lock");
            match store.lookup(&client, Instant::now()) {
                Some(e) => e.action,
                None => return Continue.into(),
            }
        };
        let (sender, rcpt) = if state == "MAIL" {
            (arg, "")
        } else {
            ("", arg)
        };
        match reply_for(action) {
            Some((code, x)) => {
                self.out.policy(
                    client,
                    state,
                    sender,
                    rcpt,
                    &format!("milter {code} {}.{}.{}", x[0], x[1], x[2]),
                );
                Replycode::new(code_digits(code), x, REPLY_TEXT).into()
            }
            None => {
                self.out
                    .policy(client, state, sender, rcpt, "milter continue (action log)");
                Continue.into()
            }
        }
    }
}

fn code_digits(code: u16) -> [u8; 3] {
    [
        (code / 100) as u8,
        (code / 10 % 10) as u8,
        (code % 10) as u8,
    ]
}

#[async_trait]
impl Milter for EarlyMilter {
    type Error = String;

    async fn connect(&mut self, c: Connect) -> Result<Action, Self::Error> {
        self.client = parse_connect_addr(&c.address(), c.port);
        if self.client.is_none() {
            log::debug!(
                "milter: connect without a usable address ({:?})",
                c.address()
            );
        }
        Ok(Continue.into())
    }

    async fn mail(&mut self, m: Mail) -> Result<Action, Self::Error> {
        Ok(self.check("MAIL", &m.sender()))
    }

    async fn rcpt(&mut self, r: Recipient) -> Result<Action, Self::Error> {
        Ok(self.check("RCPT", &r.recipient()))
    }

    // Abort ends a message, not the SMTP session: the client stays the same.
    async fn abort(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn quit(&mut self) -> Result<(), Self::Error> {
        self.client = None;
        Ok(())
    }

    async fn quit_nc(&mut self) -> Result<(), Self::Error> {
        self.client = None;
        Ok(())
    }
}

async fn session<S>(stream: S, store: Arc<Mutex<Store>>, out: Out)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut m = EarlyMilter {
        store,
        out,
        client: None,
    };
    let mut server = Server::default_postfix(&mut m);
    if let Err(e) = server.handle_connection(stream.compat()).await {
        // A broken milter conversation: the MTA applies milter_default_action.
        log::warn!("milter session ended: {e:?}");
    }
}

/// The milter service: one milter conversation per connection.
#[derive(Clone)]
pub struct MilterService {
    pub store: Arc<Mutex<Store>>,
    pub out: Out,
}

impl Service for MilterService {
    fn serve<S>(&self, stream: S, _peer: String) -> impl Future<Output = ()> + Send
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        session(stream, self.store.clone(), self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_addresses() {
        assert_eq!(
            parse_connect_addr("10.0.0.2", Some(4000)),
            Some("10.0.0.2:4000".parse().unwrap())
        );
        assert_eq!(
            parse_connect_addr("IPv6:fd00::2", Some(4000)),
            Some("[fd00::2]:4000".parse().unwrap())
        );
        assert_eq!(
            parse_connect_addr("::ffff:10.0.0.2", Some(1)),
            Some("10.0.0.2:1".parse().unwrap())
        );
        assert_eq!(parse_connect_addr("10.0.0.2", None), None);
        assert_eq!(parse_connect_addr("localhost", Some(1)), None);
    }

    #[test]
    fn replies() {
        assert_eq!(reply_for(Act::Deny), Some((554, [5, 7, 1])));
        assert_eq!(reply_for(Act::Denysoft), Some((451, [4, 7, 1])));
        assert_eq!(reply_for(Act::Log), None);
        assert_eq!(code_digits(554), [5, 5, 4]);
    }
}
