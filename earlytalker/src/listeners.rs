//! The MTA's listening sockets on the watched ports, looked at once at start-up
//! for an option that defeats the hold: TCP_DEFER_ACCEPT makes the kernel ignore
//! a bare ACK (the release) until the defer period has passed, so a held client
//! is only served at a later SYN-ACK retransmission, as it would be without
//! earlytalker (a polite SMTP client sends nothing first). Named, so the
//! operator can remove it; SMTP servers speak first and never need it.
//!
//! The listener is found by its socket inode in /proc/net/tcp{,6} (this network
//! namespace) and /proc/*/fd, and a copy of its descriptor is taken with
//! pidfd_getfd to read the option (needs CAP_SYS_PTRACE, which root has).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// A listener on a watched port that defers accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferring {
    pub addr: SocketAddr,
    pub pid: u32,
    pub process: String,
    /// TCP_DEFER_ACCEPT as read back (seconds, rounded up by the kernel).
    pub seconds: u32,
}

/// Listeners on `ports` that set TCP_DEFER_ACCEPT. Best effort: a listener
/// that cannot be inspected is skipped (logged at debug level).
pub fn deferring(ports: &[u16]) -> Vec<Deferring> {
    let mut out = Vec::new();
    for (addr, inode) in listening(ports) {
        let Some((pid, fd)) = owner(inode) else {
            log::debug!("listener {addr}: no process holds socket inode {inode}");
            continue;
        };
        match defer_accept(pid, fd) {
            Ok(0) => {}
            Ok(seconds) => out.push(Deferring {
                addr,
                pid,
                process: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                seconds,
            }),
            Err(e) => log::debug!("listener {addr} (pid {pid}): {e}"),
        }
    }
    out
}

/// Local addresses of the LISTEN sockets on `ports` (this network namespace).
pub fn addresses(ports: &[u16]) -> Vec<SocketAddr> {
    listening(ports).into_iter().map(|(a, _)| a).collect()
}

/// (local address, socket inode) of LISTEN sockets on `ports`.
fn listening(ports: &[u16]) -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for l in text.lines().skip(1) {
            if let Some(x) = parse_line(l, v6).filter(|(a, _)| ports.contains(&a.port())) {
                out.push(x);
            }
        }
    }
    out
}

/// One /proc/net/tcp line: LISTEN (state 0A) sockets only.
fn parse_line(l: &str, v6: bool) -> Option<(SocketAddr, u64)> {
    let cols: Vec<&str> = l.split_whitespace().collect();
    if cols.len() < 10 || cols[3] != "0A" {
        return None;
    }
    let (a, p) = cols[1].split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    // The kernel prints each 32-bit word of the address in host byte order.
    let words: Vec<u32> = (0..a.len() / 8)
        .map(|i| u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = if v6 {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate().take(4) {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::from(words.first()?.to_be_bytes()))
    };
    Some((SocketAddr::new(ip, port), cols[9].parse().ok()?))
}

/// The process and descriptor holding socket `inode`.
fn owner(inode: u64) -> Option<(u32, i32)> {
    let want = format!("socket:[{inode}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                let fd = f.file_name().to_str()?.parse().ok()?;
                return Some((pid, fd));
            }
        }
    }
    None
}

/// TCP_DEFER_ACCEPT of descriptor `fd` of process `pid`.
fn defer_accept(pid: u32, fd: i32) -> std::io::Result<u32> {
    use nix::libc;
    // SAFETY: plain syscalls with integer arguments; each result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above; pidfd_getfd copies descriptor `fd` of that process.
    let sock = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock as i32) };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, an int-sized buffer.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v.max(0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_parse() {
        let v4 = "   0: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(v4, false),
            Some(("127.0.0.1:25".parse().unwrap(), 12345))
        );
        let v6 = "   0: 00000000000000000000000000000000:0019 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(v6, true),
            Some(("[::]:25".parse().unwrap(), 777))
        );
        // Not listening.
        assert_eq!(parse_line(&v4.replace(" 0A ", " 01 "), false), None);
    }
}
