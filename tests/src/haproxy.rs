//! A real HAProxy (Debian's package) in the lab's client namespace, in front of
//! the server's port 25: a balancer that sends a PROXY header, v1 on one port
//! and v2 on another. Killed on drop.

use crate::lab::Lab;
use anyhow::{bail, Context, Result};
use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// HAProxy's own address, the source of its connections to the MTA.
pub const BALANCER: &str = crate::lab::CLIENT_V4;
pub const V1_PORT: u16 = 2525;
pub const V2_PORT: u16 = 2526;

pub struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    pub fn start(lab: &Lab) -> Result<Self> {
        let dir = lab.dir().join("haproxy");
        std::fs::create_dir_all(&dir)?;
        let server = crate::lab::SERVER_V4;
        let cfg = format!(
            "global
    maxconn 200
defaults
    mode tcp
    timeout connect 10s
    timeout client 60s
    timeout server 60s
frontend v1
    bind {BALANCER}:{V1_PORT}
    default_backend mx_v1
backend mx_v1
    server mx {server}:25 send-proxy source {BALANCER}
frontend v2
    bind {BALANCER}:{V2_PORT}
    default_backend mx_v2
backend mx_v2
    server mx {server}:25 send-proxy-v2 source {BALANCER}
"
        );
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, cfg)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.client_ns, "haproxy", "-db", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy (Debian package haproxy)")?;
        let h = Haproxy { child, dir };
        // Listening: a connect to its v1 port succeeds (and is closed unused).
        let addr = h.v1();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = crate::lab::join(lab.in_client(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            }))?;
            if ok {
                return Ok(h);
            }
            if Instant::now() > end {
                bail!("haproxy did not listen within 10 s ({})", h.dir.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn v1(&self) -> SocketAddr {
        SocketAddr::new(BALANCER.parse().expect("literal"), V1_PORT)
    }

    pub fn v2(&self) -> SocketAddr {
        SocketAddr::new(BALANCER.parse().expect("literal"), V2_PORT)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
