//! Listening sockets of the MTA-facing services (policy, milter) and the control
//! socket: binding unix sockets safely, and one accept loop that bounds how many
//! peers are served at once.

use anyhow::Context;
use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};

/// Peers served at once by one service. An MTA opens one connection per smtpd
/// process (Postfix's default_process_limit is 100), so this is only reached by
/// a runaway or hostile client; past it, new connections are closed at once.
pub const MAX_PEERS: usize = 1024;

/// How long a listener rests after a failed accept (EMFILE, ENFILE, ENOMEM)
/// rather than spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Makes `path` free for bind: a socket file left by an earlier run is removed,
/// but one that a live process still answers on is refused, so that a second
/// agent cannot silently take over the first one's sockets. Anything that is
/// not a socket is left alone (bind then reports it).
pub fn claim_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use by a running process (another earlytalker?)",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Mode 0660, and the MTA's group when given, so that only it (and root) connect.
pub fn socket_permissions(path: &Path, group: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .with_context(|| format!("looking up group {g}"))?
            .with_context(|| format!("no such group: {g}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {g} {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))
}

/// Binds a unix socket for an MTA-facing service: frees a stale path (never a
/// live one), binds, then mode 0660 and the MTA's group.
pub fn bind_unix(path: &Path, group: Option<&str>, what: &str) -> anyhow::Result<UnixListener> {
    claim_socket(path)?;
    let l =
        UnixListener::bind(path).with_context(|| format!("{what} socket {}", path.display()))?;
    socket_permissions(path, group)?;
    Ok(l)
}

/// A bound on the peers one service serves at once, shared by its listeners.
#[derive(Clone)]
pub struct Peers {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl Peers {
    pub fn new(limit: usize) -> Self {
        Peers {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

/// A listener the accept loop can serve: unix or TCP.
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and how to name its peer in logs.
    fn next(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "unix".into()))
    }
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, peer.to_string()))
    }
}

/// Serves `l` until the runtime stops: each connection gets its own task running
/// `serve(stream, peer)` while it holds one of `peers`' permits. A connection
/// beyond the limit is closed at once, which the MTA treats as the service being
/// unavailable.
pub fn spawn_accept_loop<L, F, Fut>(what: &'static str, l: L, peers: Peers, serve: F)
where
    L: Listener,
    F: Fn(L::Stream, String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        // Refusals are logged once per burst, not once per connection.
        let mut refusing = false;
        loop {
            let (s, peer) = match l.next().await {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("{what}: accept failed: {e}; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = peers.permits.clone().try_acquire_owned() else {
                if !refusing {
                    log::warn!(
                        "{what}: {} clients connected; refusing {peer} and others until one leaves",
                        peers.limit
                    );
                    refusing = true;
                }
                drop(s);
                continue;
            };
            refusing = false;
            let task = serve(s, peer);
            tokio::spawn(async move {
                task.await;
                drop(permit);
            });
        }
    });
}

/// What an MTA-facing service does with one connection, whichever socket it came in
/// on.
pub trait Service: Clone + Send + Sync + 'static {
    fn serve<S>(&self, stream: S, peer: String) -> impl Future<Output = ()> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

/// Binds a service's configured listeners (a unix socket for `group`, a TCP
/// address) and serves `svc` on them until the runtime stops, with one peer limit
/// shared by both.
pub async fn start<V: Service>(
    what: &'static str,
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    group: Option<&str>,
    svc: V,
) -> anyhow::Result<()> {
    let peers = Peers::new(MAX_PEERS);
    if let Some(path) = unix {
        let l = bind_unix(&path, group, what)?;
        let svc = svc.clone();
        spawn_accept_loop(what, l, peers.clone(), move |s, peer| {
            let svc = svc.clone();
            async move { svc.serve(s, peer).await }
        });
    }
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{what} listener {addr}"))?;
        spawn_accept_loop(what, l, peers, move |s, peer| {
            let svc = svc.clone();
            async move { svc.serve(s, peer).await }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The limit holds: with every permit taken, a new peer is closed unserved,
    /// and once a peer leaves the next one is served again.
    #[tokio::test(flavor = "current_thread")]
    async fn peers_beyond_the_limit_are_closed_until_one_leaves() {
        let dir = std::env::temp_dir().join(format!("et-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let l = bind_unix(&path, None, "test").unwrap();
        // A limit of 2 stands in for MAX_PEERS.
        let peers = Peers::new(2);
        spawn_accept_loop(
            "test",
            l,
            peers,
            |mut s: tokio::net::UnixStream, _| async move {
                // Echo one byte per read until the peer leaves.
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b).await {
                    if s.write_all(&b).await.is_err() {
                        break;
                    }
                }
            },
        );
        let served = |mut s: tokio::net::UnixStream| async move {
            let mut b = [0u8; 1];
            let io = async {
                s.write_all(b"x").await?;
                s.read(&mut b).await
            };
            let n = tokio::time::timeout(Duration::from_secs(5), io).await;
            (matches!(n, Ok(Ok(1))), s)
        };
        let connect = || tokio::net::UnixStream::connect(&path);
        let (ok1, a) = served(connect().await.unwrap()).await;
        let (ok2, _b) = served(connect().await.unwrap()).await;
        assert!(ok1 && ok2, "the first two peers are served");
        let (ok3, _) = served(connect().await.unwrap()).await;
        assert!(!ok3, "a third peer is closed unserved");
        drop(a);
        // The first peer's task ends when it sees EOF; bounded wait for the permit.
        let mut ok4 = false;
        for _ in 0..50 {
            let (ok, s) = served(connect().await.unwrap()).await;
            if ok {
                ok4 = true;
                drop(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok4, "a peer is served again once one left");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
