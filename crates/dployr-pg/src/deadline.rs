//! A deadline of the client's own for every store call, so a call ends in
//! bounded time whatever the server or the network does.
//!
//! `statement_timeout` is enforced by the server: a server that does not
//! answer (frozen, partitioned away, behind a stuck proxy) cannot enforce
//! it, and libpq then waits on its socket for as long as the kernel keeps
//! the connection (minutes). So each call (a checkout and everything run on
//! the connection until it is returned, retries and whole transactions
//! included) gets a deadline: `statement_timeout` (or
//! [`DeadlineConfig::call_timeout`]) plus [`DeadlineConfig::margin`],
//! counted from the start of the call. One watchdog thread per process
//! keeps the deadlines of the calls in flight. When one passes:
//!
//! 1. it asks the server to cancel the call's statement, over a fresh
//!    connection, with `pg_cancel_backend(pid)`: diesel exposes neither
//!    libpq's `PGconn` nor its cancel key, so the backend's pid and start
//!    time (`pg_stat_activity.backend_start`), read once per connection,
//!    are what identifies the call. The pid alone is not enough: the fresh
//!    connection may reach another server than the call's (a multi-host
//!    URL, a DNS name that failed over), where the same pid is someone
//!    else's backend; the cancel names both, and cancels nothing there;
//! 2. if the call has not returned [`DeadlineConfig::grace`] later, it shuts
//!    the connection's socket down (`shutdown(2)`), which makes libpq's
//!    blocked read or write fail at once.
//!
//! Either way the caller gets `StoreError::Unavailable` naming the deadline
//! (unless the server answered before the cancel took effect: a result, or
//! a `NotFound`, `Conflict` or `Invalid` verdict, is returned as it is),
//! and the connection is discarded when it goes back to the pool
//! ([`PgConnectionManager::has_broken`]), even when the cancel worked: a
//! connection a cancel may still hit is never handed out again.
//!
//! The socket is found when the connection is made: of the process's socket
//! descriptors (`/proc/self/fd`), those that are new after libpq connected
//! and whose peer is a server port of the URL (TCP, or a Unix-domain
//! `.s.PGSQL.<port>`); when other connections opened meanwhile, the one
//! whose local port the server reports (`inet_client_port()`) is taken. Its
//! inode is checked again before the shutdown, so a descriptor number that
//! was reused is never touched. Where that fails (not Linux; or, through a
//! proxy or on a Unix-domain socket, another connection to the same server
//! opened at the same instant) only the cancel is available, and a server
//! that answers neither the call nor the cancel keeps the call until TCP
//! keepalives or `tcp_user_timeout` end it (see docs/operations.md).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{BuildHasher as _, RandomState};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, ManageConnection, Pool};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable};
use dployr_domain::StoreError;

use crate::affinity::Affinity;

/// How the client bounds each call (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineConfig {
    /// What a call may take before its deadline margin starts; `None`: the
    /// pool's `statement_timeout`, or 30 s when that is `None` (the
    /// server's). Set it behind PgBouncer, where the statement timeout is
    /// set on the role and unknown to the client. Default `None`.
    pub call_timeout: Option<Duration>,
    /// Added to the call timeout: room for the server's own
    /// `statement_timeout` error to arrive, so a server that answers is
    /// never cancelled by the client. Default 1 s.
    pub margin: Duration,
    /// How long after the cancel the connection's socket is shut down if the
    /// call has not returned. Default 1 s.
    pub grace: Duration,
    /// Send a cancel request when the deadline passes. Turn it off behind
    /// PgBouncer in transaction mode, where a backend pid read on one
    /// transaction may serve another client later. Default on.
    pub cancel: bool,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        Self { call_timeout: None, margin: Duration::from_secs(1), grace: Duration::from_secs(1), cancel: true }
    }
}

/// The call timeout when neither it nor `statement_timeout` is configured.
const UNCONFIGURED_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Most cancel requests in flight in the process at once; beyond, the
/// socket shutdown alone ends the call.
const MAX_CANCELS_IN_FLIGHT: usize = 8;

/// What the deadlines of a pool did, since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeadlineStats {
    /// Calls whose deadline passed before they returned.
    pub expired: u64,
    /// Cancel requests that reached the call's backend (`pg_cancel_backend`
    /// found it, by pid and start time, and signalled it); not those that
    /// found no such backend (it had exited, or the request reached another
    /// server).
    pub cancels_sent: u64,
    /// Sockets shut down because a call outlived its grace period.
    pub sockets_shut_down: u64,
    /// Connections the pool discarded instead of reusing: those of expired
    /// calls, and those diesel found broken (a lost connection, an
    /// unfinished transaction).
    pub discarded: u64,
    /// Connections made whose socket could not be told apart from others
    /// opened at the same moment: a call on one cannot be ended by a socket
    /// shutdown, only by the cancel request (when it is on).
    pub unidentified: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    expired: AtomicU64,
    cancels_sent: AtomicU64,
    sockets_shut_down: AtomicU64,
    discarded: AtomicU64,
    unidentified: AtomicU64,
}

/// A server process, as a cancel request names it: its pid is reused by
/// the server and repeated on every other server, the pid with the time
/// the process started is neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backend {
    pid: i32,
    /// `backend_start`, in µs since the Unix epoch.
    started_us: i64,
}

/// What the pool learnt about one connection when it was made.
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// The connection's backend, for the cancel request.
    backend: Option<Backend>,
    /// The connection's socket, for the shutdown.
    socket: Option<Socket>,
    /// Set when a call on it expired: the pool must not hand it out again.
    pub(crate) discard: AtomicBool,
    /// When it was made, for the lifetime of a connection kept by its thread.
    made: Option<Instant>,
    /// When a call last gave it back, in µs after [`clock_origin`], plus
    /// one; 0 while no call has.
    given_back_at: AtomicU64,
}

impl ConnInfo {
    /// Whether a call marked it to be discarded.
    pub(crate) fn discarded(&self) -> bool {
        self.discard.load(Ordering::Acquire)
    }

    /// How long since it was made; `None` for a connection the pool did
    /// not set up.
    pub(crate) fn age(&self) -> Option<Duration> {
        self.made.map(|made| made.elapsed())
    }

    /// Notes that a call gave it back at `now`.
    pub(crate) fn given_back(&self, now: Instant) {
        self.given_back_at.store(micros_since_origin(now) + 1, Ordering::Relaxed);
    }

    /// Whether it has been out of use for at least `at_least` at `now`
    /// (true for one no call has given back yet).
    pub(crate) fn unused_for(&self, at_least: Duration, now: Instant) -> bool {
        let given_back = self.given_back_at.load(Ordering::Relaxed);
        given_back == 0 || (micros_since_origin(now) + 1).saturating_sub(given_back) >= at_least.as_micros() as u64
    }

    /// Whether the server has closed it, as far as its socket tells without
    /// a round trip: at the end of a session (a restart, a terminated
    /// backend, a pooler that went away) the server sends its last message
    /// and closes, and an idle connection, which expects nothing, finds
    /// something to read. False when the socket is not known.
    pub(crate) fn closed_by_server(&self) -> bool {
        self.socket.is_some_and(Socket::closed_by_peer)
    }

    /// Whether it was made before `mark` (µs after the clock origin, plus
    /// one; 0: no mark).
    pub(crate) fn made_before(&self, mark: u64) -> bool {
        mark != 0 && self.made.is_some_and(|made| micros_since_origin(made) + 1 < mark)
    }
}

/// The origin of the pool's coarse clock ([`ConnInfo::given_back`]).
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

pub(crate) fn micros_since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock_origin()).as_micros()).unwrap_or(u64::MAX - 1)
}

/// A socket descriptor of this process and the inode it had when found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Socket {
    fd: RawFd,
    inode: u64,
}

impl Socket {
    /// Whether `fd` still is the socket found (not a reused number).
    fn still_there(self) -> bool {
        socket_inode(self.fd) == Some(self.inode)
    }

    /// Whether the peer closed the socket or sent something unasked, for
    /// a connection at rest (nothing is in flight on it): a peek that does
    /// not wait and takes nothing from the socket, so libpq's reading is
    /// undisturbed. End of stream, pending bytes (the server's last error
    /// message) and a reset all count; only "nothing to read" does not.
    fn closed_by_peer(self) -> bool {
        use nix::errno::Errno;
        use nix::sys::socket::{MsgFlags, recv};
        let mut byte = [0_u8; 1];
        match recv(self.fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN | Errno::EINTR) => false,
            Ok(_) | Err(_) => true,
        }
    }
}

/// The inode of the socket behind descriptor `fd`, from `/proc/self/fd`.
fn socket_inode(fd: RawFd) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let target = target.to_str()?;
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Every socket descriptor of this process; empty where `/proc` is missing.
fn sockets() -> Vec<Socket> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
        .filter_map(|fd| Some(Socket { fd, inode: socket_inode(fd)? }))
        .collect()
}

/// The TCP port of an address, if it is one.
fn tcp_port(address: &nix::sys::socket::SockaddrStorage) -> Option<u16> {
    address.as_sockaddr_in().map(|a| a.port()).or_else(|| address.as_sockaddr_in6().map(|a| a.port()))
}

/// The local TCP port of socket `fd`, if it is one.
fn local_port(fd: RawFd) -> Option<u16> {
    tcp_port(&nix::sys::socket::getsockname(fd).ok()?)
}

/// Whether socket `fd` is connected to one of the server `ports`: a TCP
/// peer on that port, or a Unix-domain peer `.../.s.PGSQL.<port>`.
fn peer_is_server(fd: RawFd, ports: &[u16]) -> bool {
    let Ok(peer) = nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(fd) else { return false };
    if let Some(port) = tcp_port(&peer) {
        return ports.contains(&port);
    }
    let path = peer.as_unix_addr().and_then(|unix| unix.path().map(|path| path.to_string_lossy().into_owned()));
    path.is_some_and(|path| ports.iter().any(|port| path.ends_with(&format!(".s.PGSQL.{port}"))))
}

thread_local! {
    /// What [`PgConnectionManager::connect`] learnt, for the customizer that
    /// runs next on the same thread (r2d2 calls both in one task).
    static IDENTIFIED: RefCell<Option<Arc<ConnInfo>>> = const { RefCell::new(None) };
}

/// The [`ConnInfo`] of the connection this thread just made.
pub(crate) fn take_identified() -> Arc<ConnInfo> {
    IDENTIFIED.with(|identified| identified.borrow_mut().take()).unwrap_or_default()
}

/// The pid, client port and start time (µs since the epoch) of the
/// session's backend, in the one statement [`identify`] sends.
const IDENTIFY: &str = "pg_backend_pid(), inet_client_port(), \
     (SELECT (extract(epoch FROM backend_start) * 1000000)::bigint FROM pg_stat_activity \
     WHERE pid = pg_backend_pid())";

/// Reads which backend serves a connection just made (pid and start time)
/// and finds its socket: of the sockets opened since `before`, the one
/// connected to a server port of the URL (`ports`); when several are, the
/// one whose local port the server reports as the client's. One statement,
/// once per connection.
fn identify(conn: &mut PgConnection, before: &[Socket], ports: &[u16]) -> ConnInfo {
    let ids = diesel::select(diesel::dsl::sql::<(Integer, Nullable<Integer>, Nullable<BigInt>)>(IDENTIFY))
        .get_result::<(i32, Option<i32>, Option<i64>)>(conn)
        .ok();
    let new: Vec<Socket> =
        sockets().into_iter().filter(|socket| !before.contains(socket) && peer_is_server(socket.fd, ports)).collect();
    let socket = match new.as_slice() {
        [only] => Some(*only),
        _ => {
            let port = ids.and_then(|(_, port, _)| port).and_then(|port| u16::try_from(port).ok());
            let mut matching = new.iter().filter(|socket| port.is_some() && local_port(socket.fd) == port);
            match (matching.next(), matching.next()) {
                (Some(socket), None) => Some(*socket),
                _ => None,
            }
        }
    };
    if socket.is_none() {
        tracing::debug!(candidates = new.len(), "dployr.store: the socket of a new connection was not found");
    }
    ConnInfo {
        // Without its start time a pid could name another server's backend:
        // no cancel then, the socket shutdown alone ends an expired call.
        backend: ids.and_then(|(pid, _, started_us)| Some(Backend { pid, started_us: started_us? })),
        socket,
        discard: AtomicBool::new(false),
        made: Some(Instant::now()),
        given_back_at: AtomicU64::new(0),
    }
}

/// The lock of `database_url`, shared by every pool of this process on
/// that URL: a pool opens a connection holding it, so the one new socket to
/// the URL's server is the connection's own. Two opened at once leave two
/// new sockets, which only the client port the server reports tells apart,
/// and behind a proxy (PgBouncer, a cloud SQL proxy) that port is the
/// proxy's: through a proxy, 6 of 8 connections opened together went
/// unidentified, so their calls had no socket shutdown to end them. The
/// cost: a pool's connections are opened one at a time (a few ms each on a
/// LAN; a host that does not answer holds the others of its URL up to its
/// `connect_timeout`). Keyed by URL, not port, so the pools of other
/// servers (replicas on the same port) never wait on it: a connection one
/// of those opens at the same instant, to the same port, can still leave
/// one unidentified (counted in [`DeadlineStats::unidentified`]).
///
/// The map keeps no URL (which may hold a password) but its hash under a
/// key random to this process (two URLs whose hashes meet only share a
/// lock), and no lock longer than a pool holds it.
fn connect_lock(database_url: &str) -> Arc<Mutex<()>> {
    /// Each URL's lock, by the URL's hash.
    type Locks = Mutex<BTreeMap<u64, Weak<Mutex<()>>>>;
    static LOCKS: OnceLock<(RandomState, Locks)> = OnceLock::new();
    let (hasher, locks) = LOCKS.get_or_init(Default::default);
    let mut locks = locks.lock().unwrap_or_else(PoisonError::into_inner);
    locks.retain(|_, lock| lock.strong_count() > 0);
    let key = hasher.hash_one(database_url);
    if let Some(lock) = locks.get(&key).and_then(Weak::upgrade) {
        return lock;
    }
    let lock = Arc::new(Mutex::new(()));
    locks.insert(key, Arc::downgrade(&lock));
    lock
}

/// diesel's r2d2 connection manager, plus what the deadlines need: it
/// identifies each new connection, and discards a connection whose call
/// expired.
#[derive(Debug)]
pub struct PgConnectionManager {
    inner: ConnectionManager<PgConnection>,
    /// The server ports of the URL, to recognise a connection's socket.
    ports: Vec<u16>,
    /// Held while a connection is opened and identified ([`connect_lock`]).
    connecting: Arc<Mutex<()>>,
    counters: Arc<Counters>,
}

impl PgConnectionManager {
    pub(crate) fn new(database_url: &str, counters: Arc<Counters>) -> Self {
        let ports = crate::conninfo::server_ports(database_url);
        let connecting = connect_lock(database_url);
        Self { inner: ConnectionManager::new(database_url), ports, connecting, counters }
    }
}

impl ManageConnection for PgConnectionManager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, Self::Error> {
        let _alone = self.connecting.lock().unwrap_or_else(PoisonError::into_inner);
        let before = sockets();
        let mut conn = self.inner.connect()?;
        let info = identify(&mut conn, &before, &self.ports);
        if info.socket.is_none() {
            self.counters.unidentified.fetch_add(1, Ordering::Relaxed);
        }
        IDENTIFIED.with(|identified| *identified.borrow_mut() = Some(Arc::new(info)));
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), Self::Error> {
        self.inner.is_valid(conn)
    }

    /// diesel's test (an unfinished transaction), a call on the connection
    /// that expired, or one that found the connection lost.
    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        let broken = self.inner.has_broken(conn) || crate::pool::conn_info(conn).is_some_and(|info| info.discarded());
        if broken {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
        }
        broken
    }
}

/// The deadlines of one pool: its configuration, the URL its cancel
/// requests connect to, and its counters.
#[derive(Debug)]
pub(crate) struct Deadlines {
    /// The call timeout, resolved.
    base: Duration,
    margin: Duration,
    grace: Duration,
    /// Where cancel requests connect; `None` when cancels are off.
    cancel_url: Option<Arc<str>>,
    /// The pool's URL, to redact from r2d2's checkout errors.
    database_url: Arc<str>,
    connection_timeout: Duration,
    pub(crate) counters: Arc<Counters>,
}

impl Deadlines {
    pub(crate) fn new(
        config: DeadlineConfig,
        statement_timeout: Option<Duration>,
        connection_timeout: Duration,
        database_url: &str,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            base: config.call_timeout.or(statement_timeout).unwrap_or(UNCONFIGURED_CALL_TIMEOUT),
            margin: config.margin,
            grace: config.grace,
            cancel_url: config.cancel.then(|| Arc::from(database_url)),
            database_url: Arc::from(database_url),
            connection_timeout,
            counters,
        }
    }

    /// The error of a checkout that got no connection within `wait`:
    /// `Unavailable` whatever libpq said last. The pool's URL worked when it
    /// opened, so a cause that reads as permanent at open may pass now (a
    /// host name that does not resolve while its container restarts, an
    /// LDAP outage, a database renamed during a switch); r2d2's text, which
    /// carries libpq's last error and may echo the URL, is kept redacted as
    /// the source.
    ///
    /// r2d2 gives libpq's last error to the first checkout that times out
    /// only; the others get `timed out waiting for connection` alone. So
    /// `last_connect_error`, the pool's own copy (see
    /// [`PoolEvents`](crate::metrics::PoolEvents)), stands in for it, and
    /// the reason names it too (redacted, on one line), so that
    /// `health()`, which shows reasons, tells a changed password from a
    /// pool busy with slow calls.
    pub(crate) fn checkout_failed(&self, text: &str, last_connect_error: Option<String>, wait: Duration) -> StoreError {
        const TIMED_OUT: &str = "timed out waiting for connection";
        let told =
            text.strip_prefix(TIMED_OUT).and_then(|rest| rest.strip_prefix(": ")).filter(|cause| !cause.is_empty());
        let cause = told.map(str::to_owned).or(last_connect_error);
        let text = match (&cause, told) {
            (Some(cause), None) => format!("{TIMED_OUT}: {cause}"),
            _ => text.to_owned(),
        };
        let redacted = dployr_domain::connection::redact(&text, &self.database_url);
        let reason = match redacted.strip_prefix(TIMED_OUT).and_then(|rest| rest.strip_prefix(": ")) {
            Some(cause) if !cause.trim().is_empty() => format!(
                "no PostgreSQL connection within {wait:?}; the last attempt to connect failed: {}",
                cause.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
            _ => format!("no PostgreSQL connection within {wait:?}"),
        };
        StoreError::Unavailable { reason: reason.into(), source: Some(Box::new(crate::pool::Redacted(redacted))) }
    }

    /// The longest a call may take: the call timeout, the margin and the grace.
    pub(crate) fn bound(&self) -> Duration {
        self.base + self.margin + self.grace
    }

    /// When a call that `started` then is cancelled.
    fn cancel_at(&self, started: Instant) -> Instant {
        started + self.base + self.margin
    }

    /// Whether the deadline of a call that `started` then has passed (it
    /// would be refused before it ran).
    pub(crate) fn passed(&self, started: Instant) -> bool {
        Instant::now() >= self.cancel_at(started)
    }

    pub(crate) fn stats(&self) -> DeadlineStats {
        let c = &self.counters;
        DeadlineStats {
            expired: c.expired.load(Ordering::Relaxed),
            cancels_sent: c.cancels_sent.load(Ordering::Relaxed),
            sockets_shut_down: c.sockets_shut_down.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
            unidentified: c.unidentified.load(Ordering::Relaxed),
        }
    }

    /// Checks a connection out of `pool` and runs `work` on it, within the
    /// deadline of a call that `started` then (now, or earlier for a call
    /// run again): the checkout waits at most the connection timeout and
    /// never past the deadline; `work` is cancelled, then cut off, when it
    /// passes.
    pub(crate) fn bounded<T>(
        &self,
        pool: &Pool<PgConnectionManager>,
        affinity: &Affinity,
        started: Instant,
        work: impl FnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let cancel_at = self.cancel_at(started);
        let wait = self.connection_timeout.min(cancel_at.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Err(StoreError::Unavailable {
                reason: format!("the call deadline of {:?} passed before the call could run", self.base + self.margin)
                    .into(),
                source: None,
            });
        }
        let (mut conn, info) = affinity
            .check_out(pool, wait)
            .map_err(|e| self.checkout_failed(&e.to_string(), affinity.last_connect_error(), wait))?;
        let call = Arc::new(Call {
            id: NEXT_CALL.fetch_add(1, Ordering::Relaxed),
            conn: Arc::clone(&info),
            phase: Mutex::new(Phase::Running),
            cancel_url: self.cancel_url.clone(),
            counters: Arc::clone(&self.counters),
            cancel_at,
            shutdown_at: cancel_at + self.grace,
        });
        let guard = CallGuard::new(Arc::clone(&call));
        watchdog().watch(&call, cancel_at, Step::Cancel);
        let result = work(&mut conn);
        match &result {
            Err(error) if crate::errors::lost_connection(error) || crate::errors::stale_statement(error) => {
                info.discard.store(true, Ordering::Release);
            }
            Err(error) if crate::errors::read_only_server(error) => affinity.saw_read_only(Instant::now()),
            _ => {}
        }
        let expired = guard.finish();
        // Given back (and, if expired, discarded) before the caller sees the result.
        affinity.give_back(conn, &info, pool.max_lifetime());
        match expired {
            None => result,
            Some(shut_down) => {
                let reason = format!(
                    "PostgreSQL did not answer within the call deadline of {:?} (call timeout {:?} + margin {:?}); \
                     the call was cancelled{} and its connection discarded",
                    self.base + self.margin,
                    self.base,
                    self.margin,
                    if shut_down { format!(" and cut off after a grace of {:?}", self.grace) } else { String::new() },
                );
                match result {
                    Ok(value) => {
                        tracing::debug!("dployr.store: {reason}; the answer came in time to be used");
                        Ok(value)
                    }
                    // The server's own verdict on the input or the data,
                    // come before the cancel took effect: the caller must
                    // see it as such, not as a reason to try again.
                    Err(
                        error
                        @ (StoreError::NotFound { .. } | StoreError::Conflict { .. } | StoreError::Invalid { .. }),
                    ) => {
                        tracing::debug!("dployr.store: {reason}; its answer, {error}, came in time to be used");
                        Err(error)
                    }
                    Err(error) => Err(StoreError::Unavailable { reason: reason.into(), source: Some(Box::new(error)) }),
                }
            }
        }
    }
}

static NEXT_CALL: AtomicU64 = AtomicU64::new(0);

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// The deadline passed; the socket was shut down or not yet.
    Expired {
        shut_down: bool,
    },
    Done,
}

/// One call in flight, as the watchdog sees it.
#[derive(Debug)]
struct Call {
    id: u64,
    conn: Arc<ConnInfo>,
    /// Changed under this lock by the watchdog and the caller, so the
    /// socket is never shut down after the caller returned the connection.
    phase: Mutex<Phase>,
    cancel_url: Option<Arc<str>>,
    counters: Arc<Counters>,
    cancel_at: Instant,
    shutdown_at: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value guarded here is valid at every step; a panic elsewhere
    // cannot leave it half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Call {
    /// The deadline passed: mark the call expired and send the cancel.
    fn expire(self: &Arc<Self>) {
        {
            let mut phase = lock(&self.phase);
            if *phase != Phase::Running {
                return;
            }
            *phase = Phase::Expired { shut_down: false };
        }
        self.counters.expired.fetch_add(1, Ordering::Relaxed);
        watchdog().watch(self, self.shutdown_at, Step::ShutDown);
        if let (Some(url), Some(backend)) = (&self.cancel_url, self.conn.backend) {
            send_cancel(Arc::clone(self), Arc::clone(url), backend);
        }
    }

    /// The grace period passed: shut the socket down if the call is still out.
    fn shut_down(&self) {
        let mut phase = lock(&self.phase);
        if *phase != (Phase::Expired { shut_down: false }) {
            return;
        }
        let Some(socket) = self.conn.socket.filter(|socket| socket.still_there()) else { return };
        // Holding the phase lock: the caller cannot return (and close) the
        // connection meanwhile, so the descriptor is still the socket.
        if nix::sys::socket::shutdown(socket.fd, nix::sys::socket::Shutdown::Both).is_ok() {
            *phase = Phase::Expired { shut_down: true };
            self.counters.sockets_shut_down.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Ends a call when dropped (a panic in the call included), once.
struct CallGuard {
    call: Arc<Call>,
    ended: bool,
}

impl CallGuard {
    fn new(call: Arc<Call>) -> Self {
        Self { call, ended: false }
    }

    /// Ends the call; `Some(shut_down)` if its deadline had passed, in which
    /// case the connection is marked to be discarded.
    fn finish(mut self) -> Option<bool> {
        self.end()
    }

    fn end(&mut self) -> Option<bool> {
        if std::mem::replace(&mut self.ended, true) {
            // `finish`, then the drop: the watchdog forgot the call once already.
            return None;
        }
        watchdog().forget(&self.call);
        let previous = std::mem::replace(&mut *lock(&self.call.phase), Phase::Done);
        match previous {
            Phase::Expired { shut_down } => {
                self.call.conn.discard.store(true, Ordering::Release);
                Some(shut_down)
            }
            Phase::Running | Phase::Done => None,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.end();
    }
}

static CANCELS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Asks the server, over a new connection, to cancel what `backend` runs,
/// unless the call ended first. Runs on a thread of its own: a server
/// that does not answer holds that thread (up to libpq's `connect_timeout`
/// for the connection), never the watchdog.
fn send_cancel(call: Arc<Call>, url: Arc<str>, backend: Backend) {
    if CANCELS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_CANCELS_IN_FLIGHT {
        CANCELS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let spawned = std::thread::Builder::new().name("dployr-pg-cancel".into()).spawn(move || {
        cancel(&call, &url, backend);
        CANCELS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    });
    if spawned.is_err() {
        CANCELS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends the cancel of `call` to `backend` over a new connection to `url`,
/// and counts it if it reached that backend. The server looks the backend
/// up by pid and start time: where the connection reached another server
/// than the call's, or the backend has exited, nothing is cancelled.
fn cancel(call: &Call, url: &str, backend: Backend) {
    let cancelled = PgConnection::establish(url).ok().and_then(|mut conn| {
        if *lock(&call.phase) == Phase::Done {
            return None;
        }
        diesel::select(
            diesel::dsl::sql::<Bool>("coalesce((SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = ")
                .bind::<Integer, _>(backend.pid)
                .sql(" AND (extract(epoch FROM backend_start) * 1000000)::bigint = ")
                .bind::<BigInt, _>(backend.started_us)
                .sql("), false)"),
        )
        .get_result::<bool>(&mut conn)
        .ok()
    });
    if cancelled == Some(true) {
        call.counters.cancels_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the watchdog does to a call at a given time.
#[derive(Debug, Clone, Copy)]
enum Step {
    Cancel,
    ShutDown,
}

/// Calls in flight by the time of their next step (and their id, so two
/// calls due at the same instant both fit), and until when the watchdog
/// sleeps.
#[derive(Default)]
struct Due {
    calls: BTreeMap<(Instant, u64), (Arc<Call>, Step)>,
    /// When the watchdog wakes by itself; `None` while it is awake (it
    /// looks at `calls` again before it sleeps). A call due before this
    /// instant wakes it; any other does not need to: the watchdog does not
    /// wake for every call that starts, only for one it would otherwise be
    /// late for (every call of an idle process woke it before, one more
    /// thread switch per call).
    sleeping_until: Option<Instant>,
}

/// How long the watchdog sleeps when no call is in flight: calls due later
/// than that (every call, unless its deadline is shorter) start without
/// waking it.
const IDLE_NAP: Duration = Duration::from_secs(1);

/// The process's one watchdog: the calls due, and a thread that sleeps
/// until the earliest.
struct Watchdog {
    due: Mutex<Due>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let watchdog: &'static Watchdog =
            Box::leak(Box::new(Watchdog { due: Mutex::new(Due::default()), wake: Condvar::new() }));
        let started = std::thread::Builder::new().name("dployr-pg-watchdog".into()).spawn(|| watchdog.run());
        if let Err(error) = started {
            // Calls then run without a client deadline, as before; said once.
            tracing::error!("dployr.store: cannot start the deadline watchdog thread: {error}");
        }
        watchdog
    })
}

impl Watchdog {
    fn watch(&self, call: &Arc<Call>, at: Instant, step: Step) {
        let mut due = lock(&self.due);
        due.calls.insert((at, call.id), (Arc::clone(call), step));
        let sooner = due.sleeping_until.is_some_and(|until| at < until);
        drop(due);
        if sooner {
            self.wake.notify_one();
        }
    }

    fn forget(&self, call: &Call) {
        let mut due = lock(&self.due);
        // A call has at most one pending step, at one of its two times.
        if due.calls.remove(&(call.cancel_at, call.id)).is_none() {
            due.calls.remove(&(call.shutdown_at, call.id));
        }
    }

    fn run(&self) {
        let mut due = lock(&self.due);
        loop {
            let now = Instant::now();
            let ready: Vec<(Arc<Call>, Step)> = {
                let later = due.calls.split_off(&(now, u64::MAX));
                std::mem::replace(&mut due.calls, later).into_values().collect()
            };
            if !ready.is_empty() {
                drop(due);
                for (call, step) in ready {
                    match step {
                        Step::Cancel => call.expire(),
                        Step::ShutDown => call.shut_down(),
                    }
                }
                due = lock(&self.due);
                continue;
            }
            let until = due.calls.keys().next().map_or(now + IDLE_NAP, |(at, _)| *at);
            due.sleeping_until = Some(until);
            due = self
                .wake
                .wait_timeout(due, until.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            due.sleeping_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_pools_of_one_url_share_its_connect_lock_and_others_do_not() {
        let url = "postgres://app:s3cret@db-connect-lock-test/app";
        let (first, again) = (connect_lock(url), connect_lock(url));
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &connect_lock("postgres://app:s3cret@other-connect-lock-test/app")));
        let weak = Arc::downgrade(&first);
        drop((first, again));
        // Held by no pool, the lock is gone: the map keeps nothing of it.
        connect_lock("postgres://app@third-connect-lock-test/app");
        assert!(weak.upgrade().is_none());
    }

    fn socket_of(stream: &UnixStream) -> Socket {
        Socket { fd: stream.as_raw_fd(), inode: socket_inode(stream.as_raw_fd()).unwrap_or(0) }
    }

    #[test]
    fn a_socket_at_rest_is_open_until_its_peer_writes_or_closes() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        assert!(!socket_of(&ours).closed_by_peer(), "nothing to read: open");
        theirs.write_all(b"E").unwrap();
        assert!(socket_of(&ours).closed_by_peer(), "a message unasked: the server's last");
        assert!(socket_of(&ours).closed_by_peer(), "the peek took nothing from the socket");

        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(socket_of(&ours).closed_by_peer(), "end of stream");
    }

    /// A call on a connection served by `backend`, its deadline passed.
    fn an_expired_call_aimed_at(backend: Backend) -> Call {
        let now = Instant::now();
        Call {
            id: NEXT_CALL.fetch_add(1, Ordering::Relaxed),
            conn: Arc::new(ConnInfo { backend: Some(backend), ..ConnInfo::default() }),
            phase: Mutex::new(Phase::Expired { shut_down: false }),
            cancel_url: None,
            counters: Arc::default(),
            cancel_at: now,
            shutdown_at: now,
        }
    }

    /// `conn`'s backend, as the pool identifies it when it connects.
    fn backend_of(conn: &mut PgConnection) -> Backend {
        identify(conn, &sockets(), &[]).backend.unwrap()
    }

    /// Polls, for up to 10 s, until backend `pid` is in `pg_stat_activity`
    /// with `condition` true (`wanted`), or is not.
    fn wait_until_backend(url: &str, pid: i32, condition: &str, wanted: bool) {
        let mut observer = PgConnection::establish(url).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        let seen = format!("EXISTS (SELECT 1 FROM pg_stat_activity WHERE {condition} AND pid = ");
        while diesel::select(diesel::dsl::sql::<Bool>(&seen).bind::<Integer, _>(pid).sql(")"))
            .get_result::<bool>(&mut observer)
            .unwrap()
            != wanted
        {
            assert!(Instant::now() < until, "backend {pid}: never {condition} = {wanted}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_cancel_aimed_at_a_pid_whose_backend_started_at_another_time_cancels_nothing_and_is_not_counted() {
        let db = dployr_testkit::database();
        let mut conn = PgConnection::establish(db.url()).unwrap();
        let backend = backend_of(&mut conn);
        let sleeping = std::thread::spawn(move || diesel::sql_query("SELECT pg_sleep(30)").execute(&mut conn));
        wait_until_backend(db.url(), backend.pid, "state = 'active' AND query LIKE 'SELECT pg_sleep%'", true);

        // The same pid, another backend start: what a pid read on one
        // server names on another (a multi-host URL, a DNS failover).
        let elsewhere = an_expired_call_aimed_at(Backend { started_us: backend.started_us + 1, ..backend });
        cancel(&elsewhere, db.url(), elsewhere.conn.backend.unwrap());
        assert_eq!(elsewhere.counters.cancels_sent.load(Ordering::Relaxed), 0, "nothing was cancelled");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!sleeping.is_finished(), "the backend's statement runs on: {:?}", sleeping.join());

        let here = an_expired_call_aimed_at(backend);
        cancel(&here, db.url(), here.conn.backend.unwrap());
        assert_eq!(here.counters.cancels_sent.load(Ordering::Relaxed), 1);
        let outcome = sleeping.join().unwrap();
        assert!(outcome.as_ref().is_err_and(|e| e.to_string().contains("canceling statement")), "{outcome:?}");
    }

    #[test]
    fn a_cancel_that_finds_no_backend_is_not_counted() {
        let db = dployr_testkit::database();
        let mut conn = PgConnection::establish(db.url()).unwrap();
        let backend = backend_of(&mut conn);
        drop(conn);
        wait_until_backend(db.url(), backend.pid, "true", false);

        let gone = an_expired_call_aimed_at(backend);
        cancel(&gone, db.url(), gone.conn.backend.unwrap());
        assert_eq!(gone.counters.cancels_sent.load(Ordering::Relaxed), 0, "pg_cancel_backend found no such backend");
    }

    #[test]
    fn a_connection_counts_as_unused_from_when_a_call_gave_it_back() {
        let info = ConnInfo::default();
        let now = clock_origin() + Duration::from_secs(1);
        assert!(info.unused_for(Duration::from_secs(3600), now), "never given back: unused");
        info.given_back(now);
        assert!(!info.unused_for(Duration::from_millis(1), now));
        assert!(!info.unused_for(Duration::from_millis(1), now + Duration::from_micros(999)));
        assert!(info.unused_for(Duration::from_millis(1), now + Duration::from_millis(1)));
        assert!(!ConnInfo::default().closed_by_server(), "no known socket: nothing to tell");
    }
}
