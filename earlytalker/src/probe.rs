//! Does the MTA behind a watched port advertise PIPECONNECT? Asked as a client
//! would learn it: over loopback, greeting, EHLO, QUIT. Probing (rather than
//! watching the MTA's EHLO replies in the kernel) keeps payload parsing out of
//! the programs and answers before any client has connected; it runs at
//! start-up, on reload, and every few minutes, in case the MTA's configuration
//! changed or it was not up yet.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

/// The whole exchange, per address tried.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Some(true/false) if the MTA on `port` answered; None if none could be asked.
/// `proxied`: the port expects a PROXY header first (`--proxy-protocol`); the
/// probe sends one naming itself.
pub fn advertises_pipeconnect(port: u16, proxied: bool) -> Option<bool> {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
    .iter()
    .find_map(|a| ask(a, proxied).ok())
}

/// Any of `ports` advertising it counts: the kernel's allowance is one flag.
pub fn any_advertises(ports: &[u16], proxied: &[u16]) -> Option<bool> {
    let answers: Vec<Option<bool>> = ports
        .iter()
        .map(|p| advertises_pipeconnect(*p, proxied.contains(p)))
        .collect();
    if answers.contains(&Some(true)) {
        Some(true)
    } else if answers.iter().any(Option::is_some) {
        Some(false)
    } else {
        None
    }
}

fn ask(addr: &SocketAddr, proxied: bool) -> std::io::Result<bool> {
    let s = TcpStream::connect_timeout(addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut w = s.try_clone()?;
    if proxied {
        w.write_all(proxy_v1(&s.local_addr()?, addr).as_bytes())?;
    }
    let mut r = BufReader::new(s);
    let greeting = reply(&mut r)?;
    if !greeting.first().is_some_and(|l| l.starts_with("220")) {
        return Err(std::io::Error::other("no 220 greeting"));
    }
    w.write_all(b"EHLO earlytalker.invalid\r\n")?;
    let ehlo = reply(&mut r)?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(offers_pipeconnect(&ehlo))
}

/// A PROXY v1 header for this very connection.
fn proxy_v1(from: &SocketAddr, to: &SocketAddr) -> String {
    let family = if from.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        from.ip(),
        to.ip(),
        from.port(),
        to.port()
    )
}

/// The lines of one SMTP reply (bounded: at most 100 lines).
fn reply(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    for _ in 0..100 {
        let mut l = String::new();
        if std::io::Read::take(&mut *r, 1024).read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let last = l.as_bytes().get(3) != Some(&b'-');
        lines.push(l.trim_end().to_string());
        if last {
            return Ok(lines);
        }
    }
    Err(std::io::Error::other("reply too long"))
}

/// Whether an EHLO reply lists the PIPECONNECT keyword.
pub fn offers_pipeconnect(ehlo: &[String]) -> bool {
    ehlo.iter()
        .filter(|l| l.starts_with("250"))
        .filter_map(|l| l.get(4..))
        .any(|kw| {
            kw.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("PIPECONNECT"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn reads_the_keyword_from_an_ehlo_reply() {
        let exim = "250-mx.lab.example Hello x [127.0.0.1]\n250-SIZE 52428800\n250-PIPELINING\n250-PIPECONNECT\n250 HELP";
        assert!(offers_pipeconnect(&lines(exim)));
        let postfix = "250-mx.lab.example\n250-PIPELINING\n250-SIZE 10240000\n250 CHUNKING";
        assert!(!offers_pipeconnect(&lines(postfix)));
        // Not a keyword in the greeting line's text, nor a prefix of one.
        assert!(!offers_pipeconnect(&lines(
            "250-PIPECONNECTX\n250 mx PIPECONNECT"
        )));
        assert!(offers_pipeconnect(&lines("250 pipeconnect")));
    }

    #[test]
    fn multi_line_replies_end_at_the_space() {
        let mut r = std::io::Cursor::new(b"220-a\r\n220-b\r\n220 c\r\n250 d\r\n".to_vec());
        assert_eq!(reply(&mut r).unwrap(), ["220-a", "220-b", "220 c"]);
        assert_eq!(reply(&mut r).unwrap(), ["250 d"]);
        assert!(reply(&mut r).is_err());
    }
}
