//! `AsyncDataLayer`: the data layer for tokio servers (feature `tokio`).
//!
//! The stores stay synchronous (diesel, r2d2 and the Cloudflare client
//! block); this facade runs each call on a thread of its own, so an axum
//! handler writes `data.users().get_by_email(&email).await?` instead of
//! wrapping every call in `spawn_blocking` by hand, and opening and dropping
//! the data layer inside a runtime are safe too.
//!
//! **Which threads.** The facade keeps one thread per connection its pools
//! may open (the primary's `DPLOYR_DB_POOL_SIZE`, plus each replica's), at
//! most 256 (a pool of thousands would otherwise start thousands of
//! threads, each with its stack, for more calls at once than a PostgreSQL
//! server serves well), all fed by one queue: a call beyond that many would
//! only wait for a connection, so it waits in the queue instead. A call
//! that waits there longer than the pool's checkout timeout
//! (`DPLOYR_DB_CONNECT_TIMEOUT_MS`) fails with [`StoreError::Unavailable`]
//! at that timeout, as a checkout that timed out does, and does not run
//! when a thread reaches it later: the back-pressure a server wants, with
//! the same error. One more thread of the facade keeps that timeout, so it
//! holds on a runtime built without tokio's timers too. Why not
//! tokio's blocking pool (`spawn_blocking`): measured with `cargo xtask
//! bench` and a no-op call on this project's 2-core machine, handing a call
//! to `spawn_blocking` and back costs about 17 µs of CPU at 16 concurrent
//! tasks against about 2 µs through a queue to a waiting thread, and
//! `users.get_by_email` through the facade went from 0.52–0.66 of the
//! synchronous store's throughput at 16 tasks to 0.76–0.91 (median 0.78;
//! the rest is the two thread wake-ups of every call: on a slower 2-core
//! machine, 0.70–0.95 over eleven runs, median 0.80, the facade's client
//! spending 42–66 µs of CPU and 3.3 context switches per call against
//! 28–40 µs and 1.0 for the synchronous store).
//!
//! Key-value calls on Cloudflare are the exception: they wait tens of
//! milliseconds on HTTP, not on a connection of the pool, so they run on
//! tokio's blocking pool and never hold a thread that a PostgreSQL call is
//! waiting for. Each key-value call goes by the backend it uses: the
//! session calls by the sessions' ([`DataLayer::kv_backend`]), OAuth
//! states and one-time codes by theirs
//! ([`DataLayer::one_time_kv_backend`]), so with `DPLOYR_KV=cloudflare`
//! and the one-time records on PostgreSQL (its default) only the session
//! calls leave the facade's threads. [`AsyncDataLayer::delete_user`] and
//! [`AsyncDataLayer::remove_users`], whose second step ends sessions, run
//! on the blocking pool when the sessions are on Cloudflare. A call there
//! waits for a thread of tokio's pool (`max_blocking_threads`, 512 unless
//! the runtime sets it) with no timeout of the facade's: size that pool for
//! the Cloudflare calls a process may have waiting at once.
//! [`AsyncDataLayer::health`], which reads a key from each key-value
//! backend, runs on a thread of its own when either of them is on
//! Cloudflare, so that a pool filled by slow Cloudflare calls never holds
//! up `/healthz`.
//!
//! **In place, on request.** [`AsyncDataLayer::in_place`] gives a facade
//! that runs each call on the thread of the task that awaits it, with
//! tokio's `block_in_place` (the worker hands its other tasks to another
//! thread while the call blocks). That saves both wake-ups: measured with
//! `cargo xtask bench` on the same 2-core machine, alternating, at 16
//! tasks, `users.get_by_email` in place ran at 0.86–1.18 of the
//! synchronous store's throughput (median 0.99 of five runs) where the
//! facade's threads gave 0.60–0.80 (median 0.69) in the same runs (on the
//! slower machine, in place 0.92–1.04 over eleven runs). What it costs,
//! and why it is not the default:
//! - a call in place cannot be left behind: a `tokio::time::timeout` (or
//!   tower's timeout layer) around it, or a `select!`, returns only when
//!   the call ends, which the data layer's own bounds limit (the call
//!   deadline, `DPLOYR_DB_CALL_TIMEOUT_MS`, 30 s unless set, per statement
//!   of a call of several statements);
//! - calls awaited together in one task (`join!`) run one after another;
//! - it needs the multi-thread runtime: on a current-thread runtime, or
//!   outside tokio, the call goes to the facade's threads as usual;
//! - it is for tasks on a multi-thread runtime's workers (`tokio::spawn`,
//!   `#[tokio::main]`'s `block_on`), **not** for tasks of a
//!   `tokio::task::LocalSet` (`spawn_local`, `run_until`): tokio refuses
//!   `block_in_place` there and panics ("can call blocking only when
//!   running on the multi-threaded runtime"), and offers no public way to
//!   tell such a task apart, so the facade cannot fall back by itself. In
//!   a `LocalSet`, use the facade itself, not its `in_place()`; the same
//!   for a current-thread runtime's task inside a multi-thread runtime's
//!   `Handle::enter` (the facade sees the entered runtime).
//!
//! At most as many calls run in place at once as the pools have
//! connections; a call beyond that goes to the facade's queue, under the
//! queue's rules, so that blocked workers never exceed what the pools can
//! serve. Key-value calls on Cloudflare stay on tokio's blocking pool.
//!
//! **Cancellation.** Dropping the future of a call (a client that hung up,
//! a `tokio::time::timeout`, a `select!`) does not cancel it once it has
//! started: the statement or request runs to its end, and a write commits
//! or rolls back exactly as the synchronous call would. A store's write is
//! one transaction, so it is never half done: the caller may assume only
//! that its effect happened entirely or not at all, and learns which only
//! by reading again. Three calls are several steps each, and may stop
//! between them: [`AsyncDataLayer::delete_user`] and
//! [`AsyncDataLayer::remove_users`] (the accounts, then their sessions)
//! and [`AsyncKvStore::delete_user_sessions`] (one session after
//! another). For them the caller may assume that what is done stays done
//! and that calling again with the same arguments finishes the rest (see
//! [`DataLayer::delete_user`] and [`DataLayer::remove_users`]). A call
//! whose future is dropped while it waits for a thread (in the facade's
//! queue, or on tokio's blocking pool) does not run. What bounds how long
//! a call runs is the data layer's own bounds: the call deadline
//! (`DPLOYR_DB_CALL_TIMEOUT_MS`) of each statement, so a call of several
//! statements (signing a user out everywhere, `delete_user`) may take one
//! deadline per statement, and a Cloudflare request's timeout and retries;
//! a closure given to [`AsyncDataLayer::run`] is bounded by what it does.
//!
//! **Outside tokio.** A future of the facade polled by another executor
//! works too: calls on the facade's threads as on a current-thread runtime,
//! and calls that would go to tokio's blocking pool (Cloudflare, `open`) on
//! a thread started for the call.
//!
//! **Open and drop.** [`AsyncDataLayer::open`] runs the blocking open
//! (connect, migrations, the key-value backend) on tokio's blocking pool.
//! When the last clone is dropped, the facade's threads finish the calls
//! already queued and stop, and the last of them drops the data layer
//! (closing connections and joining the purger's thread): a runtime's
//! thread never blocks on it, inside a runtime or outside one. Threads of
//! others may outlive it a while: r2d2's three per pool end at their next
//! wake-up (up to about 30 s later), and the pools' deadline watchdog and
//! sweeper are one thread each per process, for its life; a thread count
//! taken just after the drop is not a leak.
//!
//! ```no_run
//! use dployr_data::{AsyncDataLayer, Config, Email, NewUser, Provider};
//!
//! # async fn handler() -> Result<(), dployr_data::StoreError> {
//! let data = AsyncDataLayer::open(Config::from_env()?).await?;
//! let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io")?, Provider::Github)).await?;
//! let cluster = data.clusters().create_for_owner(&user.id).await?;
//! assert!(data.clusters().can_write(&user.id, &cluster.id).await?);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dployr_domain::{
    BootstrapToken, BootstrapTokenStore, Cluster, ClusterId, ClusterPatch, ClusterStore, ClusterSummary, Email,
    GitHubIntegration, Instance, InstanceId, InstanceStore, Integrations, Member, Metadata, NewInstance, NewUser,
    Nonce, Page, Paged, PendingInvite, Role, StoreError, StoreResult, Tag, User, UserId, UserPatch, UserStore,
};
use dployr_kv::{OAuthState, OtpCode, Session, SessionId};

use crate::{Config, DataLayer, Health, MigrationsProbe, Probe, ReplicaProbe};

/// The most threads a facade starts for its calls, however many
/// connections its pools may open: beyond a few hundred calls at once, a
/// PostgreSQL server is the bottleneck and more threads only cost stacks.
const MAX_THREADS: u32 = 256;

/// A call waiting in the queue, given the data layer by the thread that
/// runs it.
type Job = Box<dyn FnOnce(&DataLayer) + Send>;

/// Where a call's answer goes: its result, or the panic it raised.
type Reply<T> = tokio::sync::oneshot::Sender<std::thread::Result<StoreResult<T>>>;

/// Where a store's calls run (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The facade's threads, through the queue.
    Threads,
    /// tokio's blocking pool: calls that wait on a remote service, not on a
    /// connection (key-value calls on Cloudflare), and every call if no
    /// thread of the facade could be started.
    BlockingPool,
    /// The awaiting task's own thread, with `block_in_place`, while a
    /// connection's worth of room is free and the runtime is multi-thread;
    /// otherwise the facade's threads ([`AsyncDataLayer::in_place`]).
    InPlace,
}

impl Route {
    /// The route of a facade that runs calls in place: calls that would go
    /// to the facade's threads run in place instead.
    fn in_place(self) -> Self {
        match self {
            Route::Threads => Route::InPlace,
            other => other,
        }
    }
}

/// The route of each kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Routes {
    /// Calls of the PostgreSQL stores.
    stores: Route,
    /// Calls on the sessions' key-value backend.
    sessions: Route,
    /// Calls on the key-value backend of OAuth states and one-time codes.
    one_time: Route,
}

impl Routes {
    /// The routes of a facade that runs calls in place.
    fn in_place(self) -> Self {
        Self { stores: self.stores.in_place(), sessions: self.sessions.in_place(), one_time: self.one_time.in_place() }
    }

    /// The route of a call that writes to the stores, then ends sessions
    /// (`delete_user`, `remove_users`): the blocking pool when the sessions
    /// are remote, so that its HTTP requests never hold a thread a
    /// PostgreSQL call is waiting for; the stores' route otherwise.
    fn stores_then_sessions(self) -> Route {
        if self.sessions == Route::BlockingPool { Route::BlockingPool } else { self.stores }
    }

    /// The route of `health`, which probes the stores and both key-value
    /// backends: the blocking pool when either backend is remote, for the
    /// reason of [`stores_then_sessions`](Self::stores_then_sessions); the
    /// stores' route otherwise.
    fn health(self) -> Route {
        let remote = [self.sessions, self.one_time].contains(&Route::BlockingPool);
        if remote { Route::BlockingPool } else { self.stores }
    }
}

/// The data layer, the queue of the facade's threads and the routes.
struct Shared {
    data: Arc<DataLayer>,
    queue: crossbeam_channel::Sender<Job>,
    /// The facade's threads not taken by a call, running or queued: at
    /// zero or below, a new call waits behind others and the timer bounds
    /// its wait.
    free_threads: Arc<AtomicIsize>,
    /// The timer of calls that wait for a busy thread; `None` if its thread
    /// could not be started (a call's wait is then checked only when a
    /// thread takes it).
    timer: Option<crossbeam_channel::Sender<Expiry>>,
    /// How long a call may wait in the queue: the pool's checkout timeout.
    queue_timeout: Duration,
    routes: Routes,
    /// Room for calls in place: one per connection the pools may open.
    in_place: tokio::sync::Semaphore,
    /// The health check running on a thread of its own, if one is (see
    /// [`AsyncDataLayer::health`]): a check asked meanwhile waits for its
    /// answer instead of starting another.
    health_check: Arc<Mutex<Option<tokio::sync::broadcast::Sender<Health>>>>,
    /// Taken by each call before it counts itself against the free threads
    /// and until its job is queued, so that the queue's order is the
    /// count's: a call that counted a free thread is never queued behind
    /// one that counted none (and then left waiting with no timer).
    submit: Mutex<()>,
}

impl Shared {
    /// Starts one thread per connection the data layer's pools may open, at
    /// most [`MAX_THREADS`], and the timer of the queue.
    fn start(data: DataLayer) -> Self {
        let pool = data.pool();
        let replicas = pool.replicas().map_or(0, |set| set.pools().map(|(_, p)| p.pool_stats().max_size).sum());
        let connections = pool.pool_stats().max_size.saturating_add(replicas).max(1);
        let wanted = connections.min(MAX_THREADS);
        let queue_timeout = pool.connection_timeout();
        let sessions_remote = data.kv_backend() == "cloudflare";
        let one_time_remote = data.one_time_kv_backend() == "cloudflare";
        let data = Arc::new(data);
        let free_threads = Arc::new(AtomicIsize::new(0));
        let (queue, jobs) = crossbeam_channel::unbounded::<Job>();
        let mut started = 0_u32;
        for index in 0..wanted {
            let (data, jobs, free) = (Arc::clone(&data), jobs.clone(), Arc::clone(&free_threads));
            let spawned = std::thread::Builder::new().name(format!("dployr-call-{index}")).spawn(move || {
                // Ends when the last clone of the facade dropped the sender
                // and the queue is empty; the last thread to end drops the
                // data layer here, off every runtime.
                for job in jobs {
                    job(&data);
                    free.fetch_add(1, Ordering::AcqRel);
                }
            });
            match spawned {
                Ok(_) => {
                    started += 1;
                    free_threads.fetch_add(1, Ordering::AcqRel);
                }
                Err(error) => {
                    tracing::warn!(%error, started, wanted, "could not start a thread of the async facade");
                    break;
                }
            }
        }
        let timer = if started == 0 { None } else { start_timer() };
        let stores = if started == 0 { Route::BlockingPool } else { Route::Threads };
        let by_backend = |remote: bool| if remote { Route::BlockingPool } else { stores };
        let routes = Routes { stores, sessions: by_backend(sessions_remote), one_time: by_backend(one_time_remote) };
        let in_place = tokio::sync::Semaphore::new(usize::try_from(connections).unwrap_or(usize::MAX));
        let health_check = Arc::new(Mutex::new(None));
        Self { data, queue, free_threads, timer, queue_timeout, routes, in_place, health_check, submit: Mutex::new(()) }
    }
}

/// The error of a call that cannot run any more.
fn stopped(reason: &'static str) -> StoreError {
    StoreError::Unavailable { reason: reason.into(), source: None }
}

/// The error of a call that waited in the queue longer than `timeout`.
fn waited_too_long(timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        reason: format!("no connection within {timeout:?}: every thread of the async facade was busy").into(),
        source: None,
    }
}

/// The reply of a call queued for the facade's threads, taken once: by
/// the thread that runs the call, or by the timer when the call waited
/// too long, so that exactly one of them answers and a call answered by
/// the timer never runs.
struct QueuedReply<T> {
    reply: Mutex<Option<Reply<T>>>,
    /// The queue's timeout, for the timer's answer.
    timeout: Duration,
}

impl<T> QueuedReply<T> {
    fn take(&self) -> Option<Reply<T>> {
        // Nothing can panic while the lock is held, so it is never
        // poisoned; a poisoned one would still hold a valid `Option`.
        self.reply.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A queued call as the timer sees it, whatever its result's type.
trait Expiring: Send + Sync {
    /// Answers the caller [`StoreError::Unavailable`], unless a thread took
    /// the call first.
    fn expire(&self);

    /// Whether the call is answered for: taken by a thread, or expired.
    fn settled(&self) -> bool;
}

impl<T: Send> Expiring for QueuedReply<T> {
    fn expire(&self) {
        if let Some(reply) = self.take() {
            let _caller_gone = reply.send(Ok(Err(waited_too_long(self.timeout))));
        }
    }

    fn settled(&self) -> bool {
        self.reply.lock().unwrap_or_else(PoisonError::into_inner).is_none()
    }
}

/// Where a queued call's reply is: the job's own (a thread was free), or
/// shared with the timer (the call waits).
enum ReplySlot<T> {
    Own(Reply<T>),
    Shared(Arc<QueuedReply<T>>),
}

impl<T> ReplySlot<T> {
    /// The reply, unless the timer answered first.
    fn take(self) -> Option<Reply<T>> {
        match self {
            Self::Own(reply) => Some(reply),
            Self::Shared(queued) => queued.take(),
        }
    }
}

/// A call that waits behind busy threads, and when it may stop waiting.
struct Expiry {
    deadline: Instant,
    call: Arc<dyn Expiring>,
}

/// Starts the thread that answers queued calls at their deadline (see
/// [`expire_queued_calls`]); `None`, with a warning, if it cannot start.
fn start_timer() -> Option<crossbeam_channel::Sender<Expiry>> {
    let (timer, expiries) = crossbeam_channel::unbounded::<Expiry>();
    let builder = std::thread::Builder::new().name("dployr-queue-timer".into());
    match builder.spawn(move || expire_queued_calls(&expiries)) {
        Ok(_) => Some(timer),
        Err(error) => {
            tracing::warn!(
                %error,
                "could not start the async facade's queue timer: a queued call's wait is checked only when a \
                 thread takes it"
            );
            None
        }
    }
}

/// The timer's loop: answers `Unavailable` to each registered call that no
/// thread took by its deadline, so its caller does not wait behind long
/// calls. A thread of its own rather than tokio's timers, which panic on a
/// runtime built without `enable_time`. Ends when the facade is dropped.
fn expire_queued_calls(expiries: &crossbeam_channel::Receiver<Expiry>) {
    // In deadline order, nearly: every call waits the same timeout, so a
    // call registered later has a later deadline, but for the moment
    // between taking the time and registering, by which an expiry may come
    // late.
    let mut waiting = VecDeque::<Expiry>::new();
    loop {
        let next = match waiting.front() {
            Some(first) => expiries.recv_deadline(first.deadline),
            None => expiries.recv().map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(expiry) => {
                // Calls a thread already took need no expiry: dropped, so
                // that the list stays about as long as the queue.
                while waiting.front().is_some_and(|first| first.call.settled()) {
                    waiting.pop_front();
                }
                waiting.push_back(expiry);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // The facade is gone, and with it every caller.
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while waiting.front().is_some_and(|first| first.deadline <= now) {
            if let Some(expired) = waiting.pop_front() {
                expired.call.expire();
            }
        }
    }
}

/// Runs `call` with the data layer on `route`: a panic in it goes on in
/// the caller, as it would have in a synchronous call.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    route: Route,
    call: impl FnOnce(&DataLayer) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    match route {
        Route::Threads => on_threads(shared, call).await,
        Route::InPlace => {
            // A `LocalSet`'s task on a multi-thread runtime passes this
            // check, and `block_in_place` panics there: tokio offers no
            // public way to tell, so `in_place`'s documentation rules it out.
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|runtime| runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let room = if multi_thread { shared.in_place.try_acquire().ok() } else { None };
            match room {
                // A panic unwinds through here into the caller, as in a
                // synchronous call, and the room is given back with it.
                Some(_room) => tokio::task::block_in_place(|| call(&shared.data)),
                None => on_threads(shared, call).await,
            }
        }
        Route::BlockingPool => {
            let data = Arc::clone(&shared.data);
            on_blocking_pool(move || call(&data), "the runtime is shutting down; the call did not run").await
        }
    }
}

/// Runs `work` on tokio's blocking pool, or on a thread of its own when
/// the future is polled outside a tokio runtime (where `spawn_blocking`
/// panics): a panic in it goes on in the caller; a runtime shutting down
/// before it ran is `Unavailable` with `not_run` as the reason. A call
/// whose future is dropped before a thread takes it does not run, as a
/// call dropped in the facade's queue does not (tokio does not cancel a
/// blocking task that has not started).
async fn on_blocking_pool<T: Send + 'static>(
    work: impl FnOnce() -> StoreResult<T> + Send + 'static,
    not_run: &'static str,
) -> StoreResult<T> {
    // Closed when this future is dropped, which the thread sees.
    let (waiting, _caller) = tokio::sync::oneshot::channel::<()>();
    let work = move || {
        if waiting.is_closed() {
            return Err(stopped("the caller stopped waiting before the call started; it did not run"));
        }
        work()
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return on_a_thread_of_its_own(work).await;
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(StoreError::Unavailable { reason: not_run.into(), source: Some(Box::new(error)) }),
    }
}

/// [`DataLayer::health`] on a thread of its own, or the answer of the check
/// already running there: one thread however many ask at once. A check
/// asked while another runs gets that one's answer, which started before it
/// asked (a slow check's answer is every waiting caller's).
async fn health_on_a_thread_of_its_own(shared: &Shared) -> StoreResult<Health> {
    let mut answer = {
        let mut running = shared.health_check.lock().unwrap_or_else(PoisonError::into_inner);
        match running.as_ref() {
            Some(check) => check.subscribe(),
            None => {
                let (check, answer) = tokio::sync::broadcast::channel(1);
                let (data, slot, sender) = (Arc::clone(&shared.data), Arc::clone(&shared.health_check), check.clone());
                let spawned = std::thread::Builder::new().name("dployr-health".into()).spawn(move || {
                    let health = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| data.health()));
                    // Cleared before the answer is sent: a check asked from
                    // now on starts anew; those that subscribed get this one
                    // (or, after a panic, the channel's end: "not probed").
                    slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                    if let Ok(health) = health {
                        let _nobody_waits = sender.send(health);
                    }
                });
                if let Err(error) = spawned {
                    return Err(StoreError::Unavailable {
                        reason: "no thread could be started for the health check; it did not run".into(),
                        source: Some(Box::new(error)),
                    });
                }
                *running = Some(check);
                answer
            }
        }
    };
    answer.recv().await.map_err(|_| stopped("the health check's thread ended without answering"))
}

/// Runs `work` on a new thread, for a future polled outside tokio (another
/// executor): a panic in it goes on in the caller.
async fn on_a_thread_of_its_own<T: Send + 'static>(
    work: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("dployr-call".into()).spawn(move || {
        let _caller_gone = reply.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    });
    if let Err(error) = spawned {
        return Err(StoreError::Unavailable {
            reason: "no thread could be started for the call; it did not run".into(),
            source: Some(Box::new(error)),
        });
    }
    match answer.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(stopped("the call's thread ended without answering")),
    }
}

/// Runs `call` on one of the facade's threads; a call that waits for one
/// longer than the queue's timeout is answered `Unavailable` then, and does
/// not run.
async fn on_threads<T: Send + 'static>(
    shared: &Arc<Shared>,
    call: impl FnOnce(&DataLayer) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let timeout = shared.queue_timeout;
    let deadline = Instant::now() + timeout;
    // No thread is free: this call waits behind others, and the timer
    // answers it if none takes it in time, so the two share the reply. A
    // free thread takes the call at once: the reply stays the job's own,
    // with no timer to wake and nothing shared to lock.
    let submitting = shared.submit.lock().unwrap_or_else(PoisonError::into_inner);
    let waits = shared.free_threads.fetch_sub(1, Ordering::AcqRel) <= 0;
    let timer = shared.timer.as_ref().filter(|_| waits);
    let (slot, expiring) = match timer {
        Some(_) => {
            let queued = Arc::new(QueuedReply { reply: Mutex::new(Some(reply)), timeout });
            (ReplySlot::Shared(Arc::clone(&queued)), Some(queued))
        }
        None => (ReplySlot::Own(reply), None),
    };
    let job: Job = Box::new({
        move |data| {
            // The timer answered: the caller has stopped waiting for it.
            let Some(reply) = slot.take() else {
                return;
            };
            // The caller is gone: a call that has not started does not start.
            if reply.is_closed() {
                return;
            }
            // Late without the timer (not started, or not yet woken). Only
            // a call that waited behind others can be: one that found a
            // thread free is not refused for the time the system took to
            // wake that thread (tens of milliseconds on a loaded machine,
            // which refused calls with "every thread was busy" while one
            // was idle, where the synchronous store took a connection).
            let result = if waits && Instant::now() > deadline {
                Ok(Err(waited_too_long(timeout)))
            } else {
                // Caught so that the thread lives on; resumed in the caller.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(data)))
            };
            let _caller_gone = reply.send(result);
        }
    });
    let queued = shared.queue.send(job);
    drop(submitting);
    if queued.is_err() {
        shared.free_threads.fetch_add(1, Ordering::AcqRel);
        return Err(stopped("the async facade's threads have stopped"));
    }
    if let (Some(timer), Some(call)) = (timer, expiring) {
        let _timer_gone = timer.send(Expiry { deadline, call });
    }
    match answer.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // Only a thread that ended without answering drops the reply.
        Err(_) => Err(stopped("the async facade's thread ended without answering")),
    }
}

/// The [`Health`] of `data` when its probes did not run, for `not_run`
/// (every thread of the facade stayed busy, or the runtime shut down),
/// answered after `waited`: not ready, each probe saying why. The replicas'
/// sampler is read, which takes no connection.
fn unprobed(data: &DataLayer, not_run: &StoreError, waited: Duration) -> Health {
    let why = format!("not probed: {not_run}");
    let probe = || Probe { ok: false, duration: waited, error: Some(why.clone()) };
    let replicas = data.pool().replicas().map_or_else(Vec::new, |replicas| {
        replicas
            .status()
            .into_iter()
            .map(|status| ReplicaProbe {
                name: status.name,
                reachable: probe(),
                lag: status.lag,
                in_rotation: status.in_rotation,
                sample_failure: status.failure,
            })
            .collect()
    });
    let migrations = MigrationsProbe {
        up_to_date: false,
        pending: Vec::new(),
        newer: Vec::new(),
        duration: waited,
        error: Some(why.clone()),
    };
    Health { primary: probe(), replicas, kv: probe(), migrations }
}

/// The data layer for async code: every store method as an `async fn` run on
/// a thread of the facade (see the module documentation for the threads,
/// cancellation and drop). Cheap to clone; `Send + Sync`; the errors are the
/// synchronous stores' own [`StoreError`]s.
#[derive(Clone)]
pub struct AsyncDataLayer {
    shared: Arc<Shared>,
    /// Whether calls run in place ([`AsyncDataLayer::in_place`]).
    in_place: bool,
}

impl fmt::Debug for AsyncDataLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AsyncDataLayer").field(&self.shared.data).finish()
    }
}

impl DataLayer {
    /// This data layer for async code. Does not block: call it anywhere.
    pub fn into_async(self) -> AsyncDataLayer {
        AsyncDataLayer { shared: Arc::new(Shared::start(self)), in_place: false }
    }
}

impl AsyncDataLayer {
    /// Opens the data layer ([`DataLayer::open`]: connect, migrations, the
    /// key-value backends) on the blocking pool.
    ///
    /// # Errors
    /// As [`DataLayer::open`]; [`StoreError::Unavailable`] when the runtime
    /// shuts down meanwhile.
    pub async fn open(config: Config) -> StoreResult<Self> {
        let opened = on_blocking_pool(
            move || DataLayer::open(config),
            "the runtime is shutting down; the data layer was not opened",
        )
        .await?;
        Ok(opened.into_async())
    }

    /// Opens the data layer from the environment ([`Config::from_env`]).
    ///
    /// # Errors
    /// As [`Config::from_env`] and [`AsyncDataLayer::open`].
    pub async fn from_env() -> StoreResult<Self> {
        Self::open(Config::from_env()?).await
    }

    /// This facade, running each call on the thread of the task that
    /// awaits it (`block_in_place`) on a multi-thread runtime: fewer thread
    /// wake-ups per call, at the costs the [module
    /// documentation](crate::AsyncDataLayer) lists (a timeout around a call
    /// waits for its end; calls joined in one task run one after another).
    /// The facade's threads, pools and data layer are shared with `self`.
    ///
    /// Only for tasks on a multi-thread runtime's workers (`tokio::spawn`,
    /// `#[tokio::main]`): a task of a `tokio::task::LocalSet` (`spawn_local`,
    /// `run_until`) must not call through it, even on a multi-thread
    /// runtime, as tokio panics on `block_in_place` there ("can call
    /// blocking only when running on the multi-threaded runtime") and
    /// offers no public way for the facade to see it coming. The same holds
    /// for a task of a current-thread runtime that entered a multi-thread
    /// runtime's handle (`Handle::enter`, as a library holding a runtime
    /// of its own may do): the facade sees the entered runtime, tokio the
    /// task's, and panics. Otherwise, on a current-thread runtime or
    /// outside tokio, calls go to the facade's threads instead.
    ///
    /// ```no_run
    /// # async fn handler(data: dployr_data::AsyncDataLayer, email: dployr_data::Email) -> dployr_data::StoreResult<()> {
    /// let data = data.in_place();
    /// let user = data.users().get_by_email(&email).await?;
    /// # drop(user);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn in_place(&self) -> Self {
        Self { shared: Arc::clone(&self.shared), in_place: true }
    }

    /// The routes of this facade's calls.
    fn routes(&self) -> Routes {
        if self.in_place { self.shared.routes.in_place() } else { self.shared.routes }
    }

    /// The synchronous data layer, for what this facade does not cover
    /// (the pool's statistics, the backends' names). Its calls block: keep
    /// them off the runtime's workers.
    pub fn blocking(&self) -> &DataLayer {
        &self.shared.data
    }

    /// Runs `call` with the synchronous data layer on one of the facade's
    /// threads (or in place, for a facade from [`AsyncDataLayer::in_place`]),
    /// as every method of this facade does: for several calls that must share
    /// one thread, such as reads inside a read-your-writes scope (the scopes
    /// of [`PgPool::reads_after`](crate::PgPool::reads_after) and
    /// [`PgPool::reads_on_primary`](crate::PgPool::reads_on_primary) hold
    /// for the thread that opened them, and each call of this facade may
    /// run on another one).
    ///
    /// ```no_run
    /// # async fn page(data: dployr_data::AsyncDataLayer, cluster: dployr_data::ClusterId) -> dployr_data::StoreResult<()> {
    /// use dployr_data::{ClusterStore, Page};
    /// // After a write: the next page sees it, from a replica that has
    /// // replayed it or from the primary.
    /// let position = data.run(|data| data.pool().wal_position()).await?;
    /// let members = data
    ///     .run(move |data| {
    ///         let _fresh = data.pool().reads_after(position);
    ///         data.clusters().members(&cluster, &Page::first(20))
    ///     })
    ///     .await?;
    /// # drop(members);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// `call` holds its thread while it runs: keep it to store calls, as a
    /// long computation in it delays the calls queued behind it; key-value
    /// calls on Cloudflare, which wait on HTTP, belong in [`kv`](Self::kv).
    ///
    /// # Errors
    /// What `call` returns; [`StoreError::Unavailable`] when it waited in
    /// the queue longer than the pool's checkout timeout, or the runtime
    /// shut down before it ran.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&DataLayer) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        blocking(&self.shared, self.routes().stores, call).await
    }

    /// Deletes a user's account and ends every session of theirs, as
    /// [`DataLayer::delete_user`] (whose documentation says what a failure
    /// half-way leaves and how to finish it), on one of the facade's
    /// threads, or on tokio's blocking pool when the sessions are on
    /// Cloudflare.
    ///
    /// # Errors
    /// As [`DataLayer::delete_user`]; [`StoreError::Unavailable`] as for
    /// every call of this facade.
    pub async fn delete_user(&self, user: &UserId) -> StoreResult<usize> {
        let user = *user;
        blocking(&self.shared, self.routes().stores_then_sessions(), move |data| data.delete_user(&user)).await
    }

    /// Removes members from a cluster and ends the sessions of the accounts
    /// that deletes, as [`DataLayer::remove_users`] (whose documentation
    /// says how to finish a call that failed half-way), on one of the
    /// facade's threads, or on tokio's blocking pool when the sessions are
    /// on Cloudflare.
    ///
    /// # Errors
    /// As [`DataLayer::remove_users`]; [`StoreError::Unavailable`] as for
    /// every call of this facade.
    pub async fn remove_users(&self, cluster: &ClusterId, users: &[UserId]) -> StoreResult<usize> {
        let (cluster, users) = (*cluster, users.to_vec());
        let route = self.routes().stores_then_sessions();
        blocking(&self.shared, route, move |data| data.remove_users(&cluster, &users)).await
    }

    /// Primary, replicas, key-value backends and migrations, each probed
    /// now with its duration, as [`DataLayer::health`] (each probe bounded
    /// by the data layer's call deadline), off the runtime's threads: on
    /// one of the facade's threads (or in place, for a facade from
    /// [`AsyncDataLayer::in_place`]), or, when a key-value backend is on
    /// Cloudflare (whose probe is an HTTP request), on a thread of its own:
    /// not on tokio's blocking pool, which Cloudflare calls held up by
    /// retries may fill. One such check runs at a time: a check asked while
    /// one runs gets that one's answer.
    ///
    /// Never fails: a probe that fails says so in its answer. Nor does it
    /// wait in the facade's queue longer than a store call would: when
    /// every thread of the facade stays busy past the pool's checkout
    /// timeout (where a store call fails with [`StoreError::Unavailable`]),
    /// or the runtime shuts down before it runs, it answers then with a
    /// [`Health`] that is not ready, in which no probe ran: the primary,
    /// key-value and migrations probes each say why in their `error`, and
    /// each replica is listed as not reachable, with the lag and rotation
    /// its sampler last saw. A process whose calls would all fail so is not
    /// ready to serve, and a load balancer asking `/healthz` learns it
    /// without the check hanging.
    ///
    /// ```no_run
    /// # async fn healthz(data: dployr_data::AsyncDataLayer) -> u16 {
    /// let health = data.health().await;
    /// if health.is_ready() { 200 } else { 503 }
    /// # }
    /// ```
    pub async fn health(&self) -> Health {
        let asked = Instant::now();
        let route = self.routes().health();
        let answered = if route == Route::BlockingPool {
            // Not on tokio's blocking pool, where Cloudflare calls held up
            // by retries can take every thread and `/healthz` would wait
            // behind them without bound: on a thread of its own.
            health_on_a_thread_of_its_own(&self.shared).await
        } else {
            blocking(&self.shared, route, |data| Ok(data.health())).await
        };
        match answered {
            Ok(health) => health,
            Err(not_run) => unprobed(&self.shared.data, &not_run, asked.elapsed()),
        }
    }

    /// Users ([`UserStore`]).
    pub fn users(&self) -> AsyncUserStore {
        AsyncUserStore { shared: Arc::clone(&self.shared), routes: self.routes() }
    }

    /// Clusters and memberships ([`ClusterStore`]).
    pub fn clusters(&self) -> AsyncClusterStore {
        AsyncClusterStore { shared: Arc::clone(&self.shared), routes: self.routes() }
    }

    /// Instances ([`InstanceStore`]).
    pub fn instances(&self) -> AsyncInstanceStore {
        AsyncInstanceStore { shared: Arc::clone(&self.shared), routes: self.routes() }
    }

    /// Bootstrap tokens ([`BootstrapTokenStore`]).
    pub fn bootstrap_tokens(&self) -> AsyncBootstrapTokenStore {
        AsyncBootstrapTokenStore { shared: Arc::clone(&self.shared), routes: self.routes() }
    }

    /// Sessions, OAuth state and one-time codes ([`KvStore`](crate::KvStore)).
    pub fn kv(&self) -> AsyncKvStore {
        AsyncKvStore { shared: Arc::clone(&self.shared), routes: self.routes() }
    }
}

/// The type of an argument as the async method takes it: `&T` for `& T`,
/// `T` for `move T`.
macro_rules! arg_type {
    (& $ty:ty) => {
        &$ty
    };
    (move $ty:ty) => {
        $ty
    };
}

/// The argument as the blocking closure owns it.
macro_rules! owned_arg {
    (& $arg:ident) => {
        ToOwned::to_owned($arg)
    };
    (move $arg:ident) => {
        $arg
    };
}

/// The argument as the synchronous method takes it, from the owned one.
macro_rules! passed_arg {
    (& $arg:ident) => {
        &$arg
    };
    (move $arg:ident) => {
        $arg
    };
}

/// One async store: a struct named `$name` and, for each row of the table,
/// an `async fn` that runs the synchronous method of the same name on the
/// store `$getter` of [`DataLayer`], on the route (a field of [`Routes`])
/// that heads the group of rows it is in. An argument is written
/// `name: & Type` when the method borrows it (it is cloned for the thread)
/// and `name: move Type` when it takes it.
macro_rules! async_store {
    (
        $(#[$struct_doc:meta])*
        $name:ident => $getter:ident {
            $(
                on $route:ident:
                $(
                    $(#[$doc:meta])*
                    fn $method:ident($($arg:ident : $pass:tt $ty:ty),*) -> $ret:ty;
                )*
            )*
        }
    ) => {
        $(#[$struct_doc])*
        #[derive(Clone)]
        pub struct $name {
            shared: Arc<Shared>,
            routes: Routes,
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($name))
            }
        }

        impl $name {
            $($(
                $(#[$doc])*
                #[doc = ""]
                #[doc = concat!(
                    "Runs `", stringify!($getter), "().", stringify!($method),
                    "` off the runtime's threads: on the facade's threads, in place ",
                    "([`AsyncDataLayer::in_place`]) or, for a key-value backend on Cloudflare, ",
                    "on tokio's blocking pool; a dropped future does not cancel a call that started ",
                    "(see the [module documentation](crate::AsyncDataLayer))."
                )]
                ///
                /// # Errors
                /// Those of the synchronous method; [`StoreError::Unavailable`]
                /// when the call waited in the queue longer than the pool's
                /// checkout timeout, or the runtime shut down before it ran.
                pub async fn $method(&self, $($arg: arg_type!($pass $ty)),*) -> StoreResult<$ret> {
                    $(let $arg = owned_arg!($pass $arg);)*
                    blocking(&self.shared, self.routes.$route, move |data| {
                        data.$getter().$method($(passed_arg!($pass $arg)),*)
                    })
                    .await
                }
            )*)*
        }
    };
}

async_store! {
    /// [`UserStore`] as async methods; from [`AsyncDataLayer::users`].
    AsyncUserStore => users {
        on stores:
        /// Creates the user, or updates the one with this e-mail (the sign-in path).
        fn upsert(user: move NewUser) -> User;
        /// The user with this id.
        fn get(id: &UserId) -> Option<User>;
        /// The user with this e-mail.
        fn get_by_email(email: &Email) -> Option<User>;
        /// Applies `patch` to the user with this e-mail; `None` if there is none.
        fn update(email: &Email, patch: move UserPatch) -> Option<User>;
        /// Deletes a user and their memberships. Their sessions stay: to
        /// close an account, call [`AsyncDataLayer::delete_user`], which
        /// ends them too.
        fn delete(id: &UserId) -> ();
    }
}

async_store! {
    /// [`ClusterStore`] as async methods; from [`AsyncDataLayer::clusters`].
    AsyncClusterStore => clusters {
        on stores:
        /// The cluster `owner` owns; if none, a new one.
        fn create_for_owner(owner: &UserId) -> Cluster;
        /// The cluster with its members grouped by role.
        fn get(id: &ClusterId) -> Option<Cluster>;
        /// Applies `patch` in one transaction; `None` for an unknown cluster.
        fn update(id: &ClusterId, patch: move ClusterPatch) -> Option<Cluster>;
        /// Deletes the cluster, its memberships, instances and their tokens.
        fn delete(id: &ClusterId) -> ();
        /// Replaces `metadata.gitHub` of the cluster linked to the integration's login id.
        fn install_github_integration(integration: move GitHubIntegration) -> Option<Cluster>;
        /// Invites these e-mails; returns the membership of each afterwards.
        fn add_users(cluster: &ClusterId, emails: &[Email]) -> Vec<Member>;
        /// Removes these members (and invitees left in no cluster). The
        /// sessions of the invitees' accounts it deletes stay: call
        /// [`AsyncDataLayer::remove_users`], which ends them too.
        fn remove_users(cluster: &ClusterId, users: &[UserId]) -> ();
        /// Turns an invitation into a `viewer` membership.
        fn accept_invite(user: &UserId, cluster: &ClusterId) -> ();
        /// Removes an invitation.
        fn decline_invite(user: &UserId, cluster: &ClusterId) -> ();
        /// The invitations waiting for this user.
        fn pending_invites(user: &UserId) -> Vec<PendingInvite>;
        /// Makes `new_owner` the owner; the previous owner gets `previous_owner_becomes`.
        fn transfer_ownership(cluster: &ClusterId, new_owner: &UserId, previous_owner_becomes: move Option<Role>) -> ();
        /// The cluster this user owns.
        fn owned_cluster(user: &UserId) -> Option<ClusterSummary>;
        /// The clusters this user belongs to (invitations excluded).
        fn user_clusters(user: &UserId) -> Vec<ClusterSummary>;
        /// Members (invitations excluded), highest role first, then by e-mail; one page.
        fn members(cluster: &ClusterId, page: &Page) -> Paged<Member>;
        /// Invitations, by e-mail; one page.
        fn invites(cluster: &ClusterId, page: &Page) -> Paged<Member>;
        /// This user's role in this cluster.
        fn role_of(user: &UserId, cluster: &ClusterId) -> Option<Role>;
        /// The owner.
        fn owner(cluster: &ClusterId) -> Option<Member>;
        /// The members with exactly `role`, by e-mail.
        fn users_with_role(cluster: &ClusterId, role: move Role) -> Vec<Member>;
        /// Viewer or above.
        fn can_read(user: &UserId, cluster: &ClusterId) -> bool;
        /// Developer or above.
        fn can_write(user: &UserId, cluster: &ClusterId) -> bool;
        /// Admin or owner.
        fn is_admin(user: &UserId, cluster: &ClusterId) -> bool;
        /// Owner.
        fn is_owner(user: &UserId, cluster: &ClusterId) -> bool;
        /// The integrations recorded in the cluster's metadata.
        fn integrations(cluster: &ClusterId) -> Integrations;
    }
}

async_store! {
    /// [`InstanceStore`] as async methods; from [`AsyncDataLayer::instances`].
    AsyncInstanceStore => instances {
        on stores:
        /// Registers an instance in a cluster.
        fn create(cluster: &ClusterId, instance: move NewInstance) -> Instance;
        /// The instance with this id.
        fn get(id: &InstanceId) -> Option<Instance>;
        /// The instance with this tag.
        fn get_by_tag(tag: &Tag) -> Option<Instance>;
        /// Replaces the metadata; `None` for an unknown instance.
        fn update_metadata(id: &InstanceId, metadata: move Metadata) -> Option<Instance>;
        /// Deletes the instance and its tokens.
        fn delete(id: &InstanceId) -> ();
        /// The cluster's instances, newest first; one page.
        fn list_by_cluster(cluster: &ClusterId, page: &Page) -> Paged<Instance>;
    }
}

async_store! {
    /// [`BootstrapTokenStore`] as async methods; from [`AsyncDataLayer::bootstrap_tokens`].
    AsyncBootstrapTokenStore => bootstrap_tokens {
        on stores:
        /// Issues a token for an instance.
        fn create(instance: &InstanceId, nonce: &Nonce) -> BootstrapToken;
        /// Marks the token used: `true` for exactly one caller per nonce.
        fn mark_used(nonce: &Nonce) -> bool;
        /// Whether the token was used; an unknown nonce counts as used.
        fn is_used(nonce: &Nonce) -> bool;
    }
}

async_store! {
    /// [`KvStore`](crate::KvStore) as async methods; from [`AsyncDataLayer::kv`].
    /// Each call runs by the backend it uses: sessions by the sessions'
    /// backend, OAuth states and one-time codes by theirs.
    AsyncKvStore => kv {
        on sessions:
        /// Stores a session for `user` under `session_id` for the session TTL.
        fn create_session(session_id: &SessionId, user: &User, clusters: move Vec<ClusterSummary>) -> Session;
        /// The session under `session_id`; `None` if there is none or it expired.
        fn get_session(session_id: &SessionId) -> Option<Session>;
        /// Ends the session; ending a missing one is not an error.
        fn delete_session(session_id: &SessionId) -> ();
        /// Ends every session of `user` and returns how many it ended. One
        /// session after another: a call that fails, or whose future is
        /// dropped, may have ended some; calling again ends the rest.
        fn delete_user_sessions(user: &UserId) -> usize;
        on one_time:
        /// Remembers `state` and where to go after the sign-in.
        fn create_state(state: &OAuthState, redirect_url: &str) -> ();
        /// Consumes `state`: its redirect URL the first time, `None` after that.
        fn validate_state(state: &OAuthState) -> Option<String>;
        /// A new one-time code for `email`, replacing any previous one.
        fn create_otp(email: &Email) -> OtpCode;
        /// Whether `code` is the current code of `email` (counted, then compared; consumed when right).
        fn validate_otp(email: &Email, code: &OtpCode) -> bool;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvBackendConfig;

    /// The queue's timeout bounds a call's wait behind others, not the time
    /// the system takes to wake a free thread: with a timeout of zero, where
    /// every wake-up is late, a call that found a thread free still runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_finds_a_thread_free_is_never_refused_for_its_wake_up() {
        let db = dployr_testkit::database();
        let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
        let mut shared = Shared::start(data);
        shared.queue_timeout = Duration::ZERO;
        let shared = Arc::new(shared);
        for _ in 0..20 {
            let answered = on_threads(&shared, |_| Ok(7)).await;
            assert!(matches!(answered, Ok(7)), "{answered:?}");
        }
    }
}
