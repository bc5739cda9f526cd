//! A server that accepts TCP connections and never says a word, as a hung
//! server (or one frozen behind a live kernel) does: for tests of what a
//! client does when a connection opens and no answer ever comes.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::TestkitError;

/// How often the accepting thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(10);

/// A silent server on a loopback port; every connection it accepted is
/// held open, unanswered, until it is dropped.
#[derive(Debug)]
pub struct SilentServer {
    port: u16,
    stopped: Arc<AtomicBool>,
}

impl SilentServer {
    /// Starts one on a free loopback port.
    ///
    /// ```
    /// let silent = dployr_testkit::SilentServer::start().unwrap();
    /// let stream = std::net::TcpStream::connect(("127.0.0.1", silent.port())).unwrap();
    /// # drop(stream);
    /// ```
    ///
    /// # Errors
    /// [`TestkitError::Io`] if no port can be bound or the thread not started.
    pub fn start() -> Result<Self, TestkitError> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| TestkitError::io("binding a silent server".into(), e))?;
        let port = listener.local_addr().map_err(|e| TestkitError::io("reading its port".into(), e))?.port();
        listener.set_nonblocking(true).map_err(|e| TestkitError::io("making its listener non-blocking".into(), e))?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopped);
        thread::Builder::new()
            .name("silent-server".into())
            .spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => held.push(stream),
                        Err(_) => thread::sleep(POLL),
                    }
                }
            })
            .map_err(|e| TestkitError::io("starting a silent server's thread".into(), e))?;
        Ok(Self { port, stopped })
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for SilentServer {
    /// Stops accepting and closes every connection held (within 10 ms).
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}
