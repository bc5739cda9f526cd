//! A TCP proxy that can turn into a black hole, for tests of what the pool
//! does when the network silently stops delivering: it accepts and forwards
//! like a wire, and on [`BlackholeProxy::blackhole`] stops forwarding in
//! both directions without closing anything, as a dropped link or a
//! failed-over virtual IP does. New connections are still accepted then,
//! and go nowhere. [`BlackholeProxy::restore`] resumes forwarding what was
//! held back.
//!
//! The peers' kernels still acknowledge what they send to the proxy, so TCP
//! keepalives cannot notice the black hole; only the pool's own deadline
//! can, which is what the tests check.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::TestkitError;

/// How often a stalled pump looks at the flags again.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Flags {
    blackholed: AtomicBool,
    stopped: AtomicBool,
    accepted: AtomicU64,
}

/// A forwarding proxy on a loopback port; stopped when dropped.
#[derive(Debug)]
pub struct BlackholeProxy {
    port: u16,
    flags: Arc<Flags>,
}

impl BlackholeProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    ///
    /// # Errors
    /// [`TestkitError::Io`] if no port can be bound.
    pub fn start(target: SocketAddr) -> Result<Self, TestkitError> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| TestkitError::io("binding the proxy's port".into(), e))?;
        let port = listener.local_addr().map_err(|e| TestkitError::io("reading the proxy's port".into(), e))?.port();
        let flags = Arc::new(Flags::default());
        let accepting = Arc::clone(&flags);
        thread::Builder::new()
            .name("blackhole-accept".into())
            .spawn(move || accept(&listener, target, &accepting))
            .map_err(|e| TestkitError::io("starting the proxy thread".into(), e))?;
        Ok(Self { port, flags })
    }

    /// A proxy in front of the server of a `postgres://user@host:port/db`
    /// URL, and the same URL through the proxy.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] for a URL without a host and port that
    /// resolve; as [`start`](Self::start).
    pub fn in_front_of(url: &str) -> Result<(Self, String), TestkitError> {
        let mut parsed = url::Url::parse(url).map_err(|e| TestkitError::Setup(format!("not a URL: {e}")))?;
        let target = parsed
            .socket_addrs(|| Some(5432))
            .ok()
            .and_then(|addrs| addrs.into_iter().next())
            .ok_or_else(|| TestkitError::Setup("the URL names no reachable host and port".into()))?;
        let proxy = Self::start(target)?;
        parsed.set_port(Some(proxy.port)).map_err(|()| TestkitError::Setup("cannot set the URL's port".into()))?;
        Ok((proxy, parsed.to_string()))
    }

    /// The loopback port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding, in both directions, on every connection, new ones
    /// included; nothing is closed.
    pub fn blackhole(&self) {
        self.flags.blackholed.store(true, Ordering::SeqCst);
    }

    /// Forwards again, starting with what was held back.
    pub fn restore(&self) {
        self.flags.blackholed.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.flags.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.flags.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ignored = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept(listener: &TcpListener, target: SocketAddr, flags: &Arc<Flags>) {
    for client in listener.incoming() {
        if flags.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        flags.accepted.fetch_add(1, Ordering::SeqCst);
        let flags = Arc::clone(flags);
        let _detached = thread::Builder::new().name("blackhole-conn".into()).spawn(move || {
            // A connection accepted in the black hole connects nowhere until restored.
            while flags.blackholed.load(Ordering::SeqCst) {
                if flags.stopped.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(POLL);
            }
            let Ok(server) = TcpStream::connect(target) else { return };
            let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone()) else { return };
            let upstream = Arc::clone(&flags);
            let _detached =
                thread::Builder::new().name("blackhole-up".into()).spawn(move || pump(&client_in, &server, &upstream));
            pump(&server_in, &client, &flags);
        });
    }
}

/// Copies `from` to `to` while the proxy forwards; holds still while it is
/// a black hole; ends when either side closes or the proxy stops.
fn pump(mut from: &TcpStream, mut to: &TcpStream, flags: &Flags) {
    let _ignored = from.set_read_timeout(Some(POLL));
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        if flags.stopped.load(Ordering::SeqCst) {
            break;
        }
        if flags.blackholed.load(Ordering::SeqCst) {
            thread::sleep(POLL);
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                // Read just before the black hole opened: held back too.
                while flags.blackholed.load(Ordering::SeqCst) {
                    if flags.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    thread::sleep(POLL);
                }
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ignored = to.shutdown(Shutdown::Write);
    let _ignored = from.shutdown(Shutdown::Read);
}
