//! `AsyncDataLayer` (dployr-data's `tokio` feature) under both kinds of
//! tokio runtime: every kind of store answers as the synchronous one does,
//! with the same errors; many tasks share one data layer; and the data layer
//! opens and drops inside the runtime on every key-value backend without
//! holding the runtime's thread.

#![cfg(test)]

use std::time::{Duration, Instant};

use dployr_data::{
    AsyncDataLayer, Config, DataLayer, Email, KvBackendConfig, NewInstance, NewUser, Page, PoolConfig, Provider, Role,
    SessionId, StoreError,
};
use dployr_testkit::{CloudflareEmulator, TestDatabase};
use dployr_tests::data_layer_kv::{Kv, config};

fn email(text: &str) -> Email {
    Email::parse(text).unwrap()
}

/// Opens the data layer inside the runtime, signs a user in, reads the
/// session back, signs them out everywhere, and drops the facade on the
/// runtime's thread (the data layer itself is dropped by the last of the
/// facade's threads).
async fn open_serve_and_drop(kv: Kv) {
    let db = dployr_testkit::database();
    let (config, _emulator) = config(&db, kv);
    let data = AsyncDataLayer::open(config).await.unwrap();
    let user = data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github)).await.unwrap();
    let clusters = data.clusters().user_clusters(&user.id).await.unwrap();
    let id = SessionId::generate();
    data.kv().create_session(&id, &user, clusters).await.unwrap();
    assert_eq!(data.kv().get_session(&id).await.unwrap().map(|s| s.user_id), Some(user.id), "{kv:?}");
    assert_eq!(data.kv().delete_user_sessions(&user.id).await.unwrap(), 1, "{kv:?}");
    assert_eq!(data.kv().get_session(&id).await.unwrap(), None, "{kv:?}");
    // The last clone dropped on the runtime's thread: the facade's threads
    // end and the last of them drops the data layer, so the drop neither
    // panics (a blocking client dropped inside a runtime would) nor holds
    // this thread. How long it takes is not asserted here: a timed
    // assertion fails on a busy machine.
    let clone = data.clone();
    drop(data);
    drop(clone);
    // The runtime still serves this task afterwards.
    tokio::task::yield_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_serves_and_drops_inside_a_multi_thread_runtime_on_every_kv_backend() {
    for kv in [Kv::Memory, Kv::Postgres, Kv::Cloudflare] {
        open_serve_and_drop(kv).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn opens_serves_and_drops_inside_a_current_thread_runtime_on_every_kv_backend() {
    for kv in [Kv::Memory, Kv::Postgres, Kv::Cloudflare] {
        open_serve_and_drop(kv).await;
    }
}

/// A synchronous data layer made async with `into_async` inside the
/// runtime, and dropped there.
#[tokio::test(flavor = "current_thread")]
async fn a_data_layer_opened_before_the_runtime_goes_async_and_drops_inside_it() {
    let db = dployr_testkit::database();
    let data = tokio::task::spawn_blocking({
        let url = db.url().to_owned();
        move || DataLayer::open(Config::new(url).with_kv(KvBackendConfig::Memory))
    })
    .await
    .unwrap()
    .unwrap()
    .into_async();
    assert_eq!(data.blocking().kv_backend(), "memory");
    assert_eq!(data.users().get_by_email(&email("nobody@example.io")).await.unwrap(), None);
}

/// Every kind of store, through the facade, with the errors of the
/// synchronous stores.
async fn every_store_answers_with_the_synchronous_errors() {
    every_store_answers(false).await;
}

/// As [`every_store_answers_with_the_synchronous_errors`], through the
/// facade itself or (`in_place`) through the one that runs calls in place.
async fn every_store_answers(in_place: bool) {
    let db = dployr_testkit::database();
    let data = AsyncDataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).await.unwrap();
    let data = if in_place { data.in_place() } else { data };
    let owner = data.users().upsert(NewUser::new(email("owner@example.io"), Provider::Github)).await.unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).await.unwrap();
    let invited = data.clusters().add_users(&cluster.id, &[email("bob@example.io")]).await.unwrap();
    assert_eq!(invited.len(), 1);
    let bob = invited[0].user_id;
    data.clusters().accept_invite(&bob, &cluster.id).await.unwrap();
    assert_eq!(data.clusters().role_of(&bob, &cluster.id).await.unwrap(), Some(Role::Viewer));
    assert!(!data.clusters().can_write(&bob, &cluster.id).await.unwrap());
    let page = data.clusters().members(&cluster.id, &Page::first(1)).await.unwrap();
    assert_eq!((page.items.len(), page.total), (1, 2));
    let rest = data.clusters().members(&cluster.id, &Page::after(page.next.unwrap(), 1)).await.unwrap();
    assert_eq!(rest.items[0].user_id, bob);

    let instance = NewInstance {
        address: "10.0.0.1".to_owned().try_into().unwrap(),
        tag: "edge-1".to_owned().try_into().unwrap(),
        metadata: None,
    };
    let instance = data.instances().create(&cluster.id, instance).await.unwrap();
    let nonce = "nonce-1".to_owned().try_into().unwrap();
    data.bootstrap_tokens().create(&instance.id, &nonce).await.unwrap();
    assert!(data.bootstrap_tokens().mark_used(&nonce).await.unwrap());
    assert!(!data.bootstrap_tokens().mark_used(&nonce).await.unwrap());

    // The same errors as the synchronous stores: the owner cannot be deleted...
    match data.users().delete(&owner.id).await {
        Err(StoreError::Conflict { field: "owner", .. }) => {}
        other => panic!("expected a conflict on owner, got {other:?}"),
    }
    // ...and a bad argument is refused before anything runs.
    let duplicate = NewInstance {
        address: "10.0.0.2".to_owned().try_into().unwrap(),
        tag: "edge-1".to_owned().try_into().unwrap(),
        metadata: None,
    };
    match data.instances().create(&cluster.id, duplicate).await {
        Err(StoreError::Conflict { field: "tag", .. }) => {}
        other => panic!("expected a conflict on tag, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_answers_on_a_multi_thread_runtime() {
    every_store_answers_with_the_synchronous_errors().await;
}

#[tokio::test(flavor = "current_thread")]
async fn every_store_answers_on_a_current_thread_runtime() {
    every_store_answers_with_the_synchronous_errors().await;
}

/// 64 tasks share one data layer; a current-thread runtime stays free to
/// run them all while their calls wait on the facade's threads.
#[tokio::test(flavor = "current_thread")]
async fn many_tasks_share_one_data_layer_on_a_single_runtime_thread() {
    let db = dployr_testkit::database();
    let data = AsyncDataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let data = data.clone();
            tokio::spawn(async move {
                data.users().upsert(NewUser::new(email(&format!("user{n}@example.io")), Provider::Github)).await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert!(data.users().get_by_email(&email("user63@example.io")).await.unwrap().is_some());
}

#[test]
fn the_async_stores_are_clone_send_and_sync() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<AsyncDataLayer>();
    shareable::<dployr_data::AsyncUserStore>();
    shareable::<dployr_data::AsyncClusterStore>();
    shareable::<dployr_data::AsyncInstanceStore>();
    shareable::<dployr_data::AsyncBootstrapTokenStore>();
    shareable::<dployr_data::AsyncKvStore>();
}

#[tokio::test(flavor = "current_thread")]
async fn run_gives_a_closure_the_data_layer_for_a_read_your_writes_scope() {
    let db = dployr_testkit::database();
    let (config, _none) = config(&db, Kv::Memory);
    let data = AsyncDataLayer::open(config).await.unwrap();
    let user = data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github)).await.unwrap();
    let position = data.run(|data| data.pool().wal_position()).await.unwrap();
    let found = data
        .run(move |data| {
            let _fresh = data.pool().reads_after(position);
            dployr_data::UserStore::get(data.users(), &user.id)
        })
        .await
        .unwrap();
    assert_eq!(found.map(|u| u.id), Some(user.id));
    // What the closure returns comes back as it is, errors included.
    let error = data.run(|_| Err::<(), _>(StoreError::invalid("x", "refused"))).await.unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "x", .. }), "{error}");
}

/// A data layer on `db` whose pool, and so the facade, has one connection
/// and one thread, and whose checkout timeout is `checkout_timeout`.
async fn one_thread(db: &TestDatabase, checkout_timeout: Duration) -> AsyncDataLayer {
    one_thread_on(db, Kv::Memory, checkout_timeout).await.0
}

/// As [`one_thread`], with `kv`, and the emulator that must outlive it.
async fn one_thread_on(
    db: &TestDatabase,
    kv: Kv,
    checkout_timeout: Duration,
) -> (AsyncDataLayer, Option<CloudflareEmulator>) {
    let (config, emulator) = config(db, kv);
    let pool = PoolConfig { max_size: 1, connection_timeout: checkout_timeout, ..PoolConfig::default() };
    (AsyncDataLayer::open(config.with_pool(pool)).await.unwrap(), emulator)
}

/// How long [`hold_the_thread`] holds at most: a test whose release never
/// comes (a call it waits for never answers) fails instead of hanging.
const HOLD_AT_MOST: Duration = Duration::from_secs(20);

/// Holds the facade's only thread until the returned sender is dropped, or
/// for [`HOLD_AT_MOST`].
async fn hold_the_thread(data: &AsyncDataLayer) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let data = data.clone();
        async move {
            data.run(move |_| {
                let _ = started.send(());
                let _ = released.recv_timeout(HOLD_AT_MOST);
                Ok(())
            })
            .await
            .unwrap();
        }
    });
    running.await.unwrap();
    (release, holder)
}

/// A call that waited in the queue longer than the pool's checkout timeout
/// fails with `Unavailable`, as a checkout that timed out does, and its
/// write never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_queued_longer_than_the_checkout_timeout_is_unavailable_and_does_not_run() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(1)).await;
    let (release, holder) = hold_the_thread(&data).await;
    let queued = tokio::spawn({
        let data = data.clone();
        async move { data.users().upsert(NewUser::new(email("late@example.io"), Provider::Github)).await }
    });
    // Queued for longer than the timeout, however busy the machine.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    drop(release);
    holder.await.unwrap();
    let error = queued.await.unwrap().unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("no connection within"), "{error}");
    assert_eq!(data.users().get_by_email(&email("late@example.io")).await.unwrap(), None);
}

/// A call queued behind a call that holds the only thread for long is
/// answered `Unavailable` at about the checkout timeout, not when the long
/// call ends, and does not run once the thread is free.
async fn a_call_queued_behind_a_long_call_is_unavailable_at_the_checkout_timeout() {
    let timeout = Duration::from_secs(1);
    let db = dployr_testkit::database();
    let data = one_thread(&db, timeout).await;
    let (release, holder) = hold_the_thread(&data).await;
    let queued_at = Instant::now();
    let answer = data.users().upsert(NewUser::new(email("late@example.io"), Provider::Github)).await;
    let waited = queued_at.elapsed();
    drop(release);
    holder.await.unwrap();
    let error = answer.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("no connection within"), "{error}");
    // Loosely: the thread was held for up to 20 s, the timeout is 1 s.
    assert!(waited < timeout * 5, "answered after {waited:?}, with a checkout timeout of {timeout:?}");
    // The only thread reaches the queued call before this one: it did not run.
    assert_eq!(data.users().get_by_email(&email("late@example.io")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_queued_behind_a_long_call_is_unavailable_at_the_checkout_timeout_on_a_multi_thread_runtime() {
    a_call_queued_behind_a_long_call_is_unavailable_at_the_checkout_timeout().await;
}

/// The queue's timeout needs no tokio timer: on a runtime built without
/// `enable_time`, where `tokio::time` panics, it holds all the same.
#[test]
fn a_call_queued_behind_a_long_call_is_unavailable_at_the_checkout_timeout_on_a_runtime_without_timers() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(a_call_queued_behind_a_long_call_is_unavailable_at_the_checkout_timeout());
}

/// With sessions on Cloudflare and one-time records on PostgreSQL (the
/// default for `DPLOYR_KV=cloudflare`), each key-value call goes by the
/// backend it uses: a session call, which waits on HTTP, is served while
/// the facade's only thread is held; a one-time code, on PostgreSQL, waits
/// for that thread as every PostgreSQL call does (here, too long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_on_cloudflare_each_key_value_call_goes_by_the_backend_it_uses() {
    let db = dployr_testkit::database();
    let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
    assert_eq!((data.blocking().kv_backend(), data.blocking().one_time_kv_backend()), ("cloudflare", "postgres"));
    let user = data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github)).await.unwrap();
    let (release, holder) = hold_the_thread(&data).await;
    let id = SessionId::generate();
    data.kv().create_session(&id, &user, Vec::new()).await.unwrap();
    assert_eq!(data.kv().get_session(&id).await.unwrap().map(|s| s.user_id), Some(user.id));
    let error = data.kv().create_otp(&user.email).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    drop(release);
    holder.await.unwrap();
    data.kv().create_otp(&user.email).await.unwrap();
}

/// A multi-thread runtime whose blocking pool has one thread, which a test
/// can hold to fill it.
fn with_one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(1).enable_all().build().unwrap()
}

/// A call on tokio's blocking pool (a session call on Cloudflare) whose
/// future is dropped before a blocking thread took it does not run, as a
/// call dropped in the facade's queue does not: tokio does not cancel a
/// blocking task that has not started, so the call checks its caller.
#[test]
fn a_cloudflare_call_dropped_before_a_blocking_thread_took_it_does_not_run() {
    with_one_blocking_thread().block_on(async {
        let db = dployr_testkit::database();
        let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
        let user = data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github)).await.unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = tokio::task::spawn_blocking(move || released.recv_timeout(HOLD_AT_MOST));
        let id = SessionId::generate();
        let kv = data.kv();
        let create = kv.create_session(&id, &user, Vec::new());
        assert!(tokio::time::timeout(Duration::from_millis(300), create).await.is_err(), "the blocking thread is held");
        drop(release);
        let _ = holder.await.unwrap();
        // The dropped call's task runs (and returns) before this one.
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        assert_eq!(data.kv().get_session(&id).await.unwrap(), None, "the dropped call ran");
    });
}

/// With sessions on Cloudflare, `health()` answers while tokio's blocking
/// pool is full (its one thread held here, as Cloudflare calls held up by
/// retries can hold them all): it runs on a thread of its own, not behind
/// them.
#[test]
fn health_with_sessions_on_cloudflare_answers_while_the_blocking_pool_is_full() {
    with_one_blocking_thread().block_on(async {
        let db = dployr_testkit::database();
        let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = tokio::task::spawn_blocking(move || released.recv_timeout(HOLD_AT_MOST));
        let health = data.health().await;
        release.send(()).unwrap();
        assert!(holder.await.unwrap().is_ok(), "health waited until the blocking pool's thread was let go");
        assert!(health.is_ready(), "{health:?}");
    });
}

/// Health checks asked at once with sessions on Cloudflare (a load
/// balancer from several nodes, a kubelet's probes) all answer ready when
/// everything is: those asked while one runs get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_asked_at_once_with_sessions_on_cloudflare_all_answer() {
    let db = dployr_testkit::database();
    let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
    for _ in 0..5 {
        let checks: Vec<_> = (0..8)
            .map(|_| {
                let data = data.clone();
                tokio::spawn(async move { data.health().await })
            })
            .collect();
        for check in checks {
            let health = check.await.unwrap();
            assert!(health.is_ready(), "{health:?}");
        }
    }
}

/// Polls `future` to its end on this thread, outside any tokio runtime
/// (another executor, as far as the facade can tell).
fn block_on_without_tokio<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

/// A future of the facade polled outside tokio answers on every route:
/// the facade's threads (PostgreSQL), and a thread of its own where tokio's
/// blocking pool would be used (sessions on Cloudflare, `health`, `open`),
/// where `spawn_blocking` would panic.
#[test]
fn the_facade_answers_on_every_route_when_polled_outside_tokio() {
    let db = dployr_testkit::database();
    let (config, _emulator) = config(&db, Kv::Cloudflare);
    let data = block_on_without_tokio(AsyncDataLayer::open(config)).unwrap();
    let user =
        block_on_without_tokio(data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github))).unwrap();
    let id = SessionId::generate();
    block_on_without_tokio(data.kv().create_session(&id, &user, Vec::new())).unwrap();
    let session = block_on_without_tokio(data.kv().get_session(&id)).unwrap();
    assert_eq!(session.map(|s| s.user_id), Some(user.id));
    let health = block_on_without_tokio(data.health());
    assert!(health.is_ready(), "{health:?}");
    drop(data);
}

/// With sessions on Cloudflare, `delete_user` and `remove_users` (whose
/// second step is HTTP requests) run off the facade's threads: both finish,
/// sessions ended, while its only thread is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_on_cloudflare_closing_accounts_does_not_wait_for_the_facades_threads() {
    let db = dployr_testkit::database();
    let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
    let ada = data.users().upsert(NewUser::new(email("ada@example.io"), Provider::Github)).await.unwrap();
    let owner = data.users().upsert(NewUser::new(email("owner@example.io"), Provider::Github)).await.unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).await.unwrap();
    let invited = data.clusters().add_users(&cluster.id, &[email("guest@example.io")]).await.unwrap();
    let guest = data.users().get(&invited[0].user_id).await.unwrap().unwrap();
    for user in [&ada, &guest] {
        data.kv().create_session(&SessionId::generate(), user, Vec::new()).await.unwrap();
    }
    let (release, holder) = hold_the_thread(&data).await;
    let closed = data.delete_user(&ada.id).await;
    let removed = data.remove_users(&cluster.id, &[guest.id]).await;
    drop(release);
    holder.await.unwrap();
    assert_eq!(closed.unwrap(), 1);
    assert_eq!(removed.unwrap(), 1);
}

/// `health()` through the facade: every probe answers against the test
/// database, and the layer is ready.
async fn health_reports_ready() {
    let db = dployr_testkit::database();
    let (config, _none) = config(&db, Kv::Postgres);
    let data = AsyncDataLayer::open(config).await.unwrap();
    let health = data.health().await;
    assert!(health.is_ready(), "{health:?}");
    assert!(health.primary.ok && health.primary.error.is_none(), "{health:?}");
    assert!(health.kv.ok && health.kv.error.is_none(), "{health:?}");
    assert!(health.migrations.up_to_date && health.migrations.pending.is_empty(), "{health:?}");
    assert!(health.replicas.is_empty(), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ready_on_a_multi_thread_runtime() {
    health_reports_ready().await;
}

#[tokio::test(flavor = "current_thread")]
async fn health_reports_ready_on_a_current_thread_runtime() {
    health_reports_ready().await;
}

/// With every thread of the facade busy past the checkout timeout,
/// `health()` still answers, at about that timeout: not ready, each probe
/// saying why it did not run, where a store call would fail `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_with_every_thread_busy_answers_not_ready_at_the_checkout_timeout() {
    let timeout = Duration::from_secs(1);
    let db = dployr_testkit::database();
    let data = one_thread(&db, timeout).await;
    let (release, holder) = hold_the_thread(&data).await;
    let asked_at = Instant::now();
    let health = data.health().await;
    let waited = asked_at.elapsed();
    drop(release);
    holder.await.unwrap();
    assert!(!health.is_ready(), "{health:?}");
    for (probe, error) in [
        ("primary", health.primary.error.as_deref()),
        ("kv", health.kv.error.as_deref()),
        ("migrations", health.migrations.error.as_deref()),
    ] {
        assert!(error.is_some_and(|error| error.contains("no connection within")), "{probe}: {health:?}");
    }
    assert!(!health.primary.ok && !health.kv.ok && !health.migrations.up_to_date, "{health:?}");
    // Loosely: the thread was held for up to 20 s, the timeout is 1 s.
    assert!(waited < timeout * 5, "answered after {waited:?}, with a checkout timeout of {timeout:?}");
    // Once the thread is free, the same facade is ready again.
    assert!(data.health().await.is_ready());
}

/// With sessions on Cloudflare, `health()` (whose key-value probe is an
/// HTTP request) runs off the facade's threads: it answers, ready, while
/// the only thread is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_on_cloudflare_health_does_not_wait_for_the_facades_threads() {
    let db = dployr_testkit::database();
    let (data, _emulator) = one_thread_on(&db, Kv::Cloudflare, Duration::from_secs(1)).await;
    let (release, holder) = hold_the_thread(&data).await;
    let health = data.health().await;
    drop(release);
    holder.await.unwrap();
    assert!(health.is_ready(), "{health:?}");
}

/// A call whose future is dropped while it waits in the queue (a client
/// that hung up, a timeout) does not run.
#[tokio::test(flavor = "current_thread")]
async fn a_call_dropped_while_queued_does_not_run() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await;
    let (release, holder) = hold_the_thread(&data).await;
    let users = data.users();
    let upsert = users.upsert(NewUser::new(email("gone@example.io"), Provider::Github));
    assert!(tokio::time::timeout(Duration::from_millis(50), upsert).await.is_err(), "the only thread is held");
    drop(release);
    holder.await.unwrap();
    assert_eq!(data.users().get_by_email(&email("gone@example.io")).await.unwrap(), None);
}

/// Runs a call of `data` that panics, in a task of its own, and checks
/// that the panic reached that task.
async fn a_call_panics_in_its_caller(data: &AsyncDataLayer) {
    let panicked = tokio::spawn({
        let data = data.clone();
        async move { data.run(|_| -> dployr_data::StoreResult<()> { panic!("a bug in a store") }).await }
    })
    .await
    .unwrap_err();
    assert!(panicked.is_panic());
}

/// A panic in a call goes on in the caller, as in a synchronous call, and
/// the thread it ran on lives on: the facade's only thread serves the next
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_call_reaches_the_caller_and_the_thread_serves_on() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await;
    a_call_panics_in_its_caller(&data).await;
    assert_eq!(data.users().get_by_email(&email("nobody@example.io")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_answers_in_place_on_a_multi_thread_runtime() {
    every_store_answers(true).await;
}

/// `block_in_place` would panic on a current-thread runtime: there, calls
/// of the in-place facade go to the facade's threads.
#[tokio::test(flavor = "current_thread")]
async fn calls_in_place_on_a_current_thread_runtime_run_on_the_facades_threads() {
    every_store_answers(true).await;
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await.in_place();
    assert!(thread_of_a_call(&data).await.starts_with("dployr-call-"));
}

/// The name of the thread a call of `data` runs on.
async fn thread_of_a_call(data: &AsyncDataLayer) -> String {
    data.run(|_| Ok(std::thread::current().name().unwrap_or_default().to_owned())).await.unwrap()
}

/// In place, a call runs on the thread of the task that awaits it, not on
/// one of the facade's; the facade it came from still uses its threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_place_runs_on_the_awaiting_tasks_thread() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await;
    let in_place = data.in_place();
    let (awaited_on, ran_on) = tokio::spawn({
        let in_place = in_place.clone();
        async move {
            let awaited_on = std::thread::current().id();
            let ran_on = in_place.run(|_| Ok(std::thread::current().id())).await.unwrap();
            (awaited_on, ran_on)
        }
    })
    .await
    .unwrap();
    assert_eq!(awaited_on, ran_on);
    assert!(thread_of_a_call(&data).await.starts_with("dployr-call-"));
}

/// No more calls run in place at once than the pool has connections: the
/// next one goes to the facade's threads, so blocked workers never
/// outnumber the connections they wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_in_place_beyond_the_pools_connections_go_to_the_facades_threads() {
    let db = dployr_testkit::database();
    let pool = PoolConfig { max_size: 2, ..PoolConfig::default() };
    let data = AsyncDataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_pool(pool))
        .await
        .unwrap()
        .in_place();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(released));
    let mut holders = Vec::new();
    for _ in 0..2 {
        let (started, running) = tokio::sync::oneshot::channel();
        let (data, released) = (data.clone(), std::sync::Arc::clone(&released));
        holders.push(tokio::spawn(async move {
            data.run(move |_| {
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                let _ = started.send(());
                let _ = released.lock().map(|released| released.recv());
                Ok(name)
            })
            .await
            .unwrap()
        }));
        running.await.unwrap();
    }
    // Both rooms are taken, and held until released.
    assert!(thread_of_a_call(&data).await.starts_with("dployr-call-"));
    drop(release);
    for holder in holders {
        assert!(!holder.await.unwrap().starts_with("dployr-call-"), "the first two ran in place");
    }
    // The rooms are free again.
    assert!(!thread_of_a_call(&data).await.starts_with("dployr-call-"));
}

/// A panic in a call in place goes on in the caller and gives its room
/// back: after as many panics as there are connections, calls still run in
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_call_in_place_reaches_the_caller_and_gives_its_room_back() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await.in_place();
    for _ in 0..3 {
        a_call_panics_in_its_caller(&data).await;
    }
    assert!(!thread_of_a_call(&data).await.starts_with("dployr-call-"));
    assert_eq!(data.users().get_by_email(&email("nobody@example.io")).await.unwrap(), None);
}

/// What a call of the mix below came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    /// A rule of the stores said no, as it may to a mix whose rows vanish
    /// under it (`NotFound`, `Conflict`), or the queue was full for longer
    /// than the checkout timeout (`Unavailable`).
    Refused,
    /// The caller gave up first (a timeout around the call).
    GivenUp,
}

/// One random call of every kind of store, on `data`, given up after a
/// random short while one time in five.
async fn one_random_call(data: &AsyncDataLayer, rng: &mut rand::rngs::StdRng, users: &[Email]) -> Outcome {
    use rand::seq::IndexedRandom as _;
    use rand::{Rng as _, RngCore as _};

    let who = users.choose(rng).unwrap().clone();
    let other = users.choose(rng).unwrap().clone();
    let tag = format!("mix-{}", rng.random_range(0..8));
    let nonce = format!("nonce-{}", rng.next_u32() % 64);
    let choice = rng.random_range(0..16);
    let give_up = rng.random_bool(0.2).then(|| Duration::from_micros(rng.random_range(0..3000)));
    let call = async move {
        let user = data.users().upsert(NewUser::new(who.clone(), Provider::Github)).await?;
        let cluster = match data.clusters().owned_cluster(&user.id).await? {
            Some(owned) => owned.id,
            None => data.clusters().create_for_owner(&user.id).await?.id,
        };
        let other_id = data.users().get_by_email(&other).await?.map(|u| u.id);
        match (choice, other_id) {
            (0, _) => drop(data.clusters().add_users(&cluster, &[other]).await?),
            (1, Some(other)) => data.clusters().accept_invite(&other, &cluster).await?,
            (2, Some(other)) => data.clusters().remove_users(&cluster, &[other]).await?,
            (3, Some(other)) => data.clusters().transfer_ownership(&cluster, &other, Some(Role::Admin)).await?,
            (4, _) => data.users().delete(&user.id).await?,
            (5, _) => data.clusters().delete(&cluster).await?,
            (6, _) => {
                let address = format!("10.9.0.{}", rand::random_range(0..8));
                let new = NewInstance { address: address.try_into()?, tag: tag.clone().try_into()?, metadata: None };
                let instance = data.instances().create(&cluster, new).await?;
                data.bootstrap_tokens().create(&instance.id, &nonce.try_into()?).await?;
            }
            (7, _) => {
                if let Some(instance) = data.instances().get_by_tag(&tag.try_into()?).await? {
                    data.instances().delete(&instance.id).await?;
                }
            }
            (8, _) => drop(data.bootstrap_tokens().mark_used(&nonce.try_into()?).await?),
            (9, _) => drop(data.clusters().get(&cluster).await?),
            (10, _) => drop(data.clusters().members(&cluster, &Page::first(5)).await?),
            (11, _) => drop(data.instances().list_by_cluster(&cluster, &Page::first(5)).await?),
            (12, _) => {
                let clusters = data.clusters();
                let (write, role) =
                    tokio::join!(clusters.can_write(&user.id, &cluster), clusters.role_of(&user.id, &cluster));
                let _answers = (write?, role?);
            }
            (13, _) => {
                let id = SessionId::generate();
                let clusters = data.clusters().user_clusters(&user.id).await?;
                data.kv().create_session(&id, &user, clusters).await?;
                drop(data.kv().get_session(&id).await?);
                data.kv().delete_session(&id).await?;
            }
            (14, _) => {
                // Not asserted right: another task may have replaced the code.
                let code = data.kv().create_otp(&who).await?;
                let _right = data.kv().validate_otp(&who, &code).await?;
            }
            _ => drop(data.kv().delete_user_sessions(&user.id).await?),
        }
        Ok::<_, StoreError>(())
    };
    let result = match give_up {
        Some(after) => match tokio::time::timeout(after, call).await {
            Ok(result) => result,
            Err(_) => return Outcome::GivenUp,
        },
        None => call.await,
    };
    match result {
        Ok(()) => Outcome::Ok,
        Err(StoreError::NotFound { .. } | StoreError::Conflict { .. } | StoreError::Unavailable { .. }) => {
            Outcome::Refused
        }
        Err(error) => panic!("a call of the mix failed: {error:?}"),
    }
}

/// Many tasks call every kind of store at random, half through the facade's
/// threads and half in place, with calls given up by timeouts while queued
/// or running and calls joined in one task: every call answers as a
/// synchronous one may, the database keeps every invariant the randomized
/// workload checks, and afterwards every room for calls in place is free
/// again (both connections' worth run in place at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_random_mix_on_both_routes_with_calls_given_up_keeps_every_invariant_and_frees_every_room() {
    use rand::SeedableRng as _;

    let db = dployr_testkit::database();
    let pool = PoolConfig { max_size: 2, connection_timeout: Duration::from_secs(5), ..PoolConfig::default() };
    let data = AsyncDataLayer::open(Config::new(db.url()).with_pool(pool)).await.unwrap();
    let users: Vec<Email> = (0..6).map(|i| email(&format!("mix{i}@example.io"))).collect();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let tasks: Vec<_> = (0..24_u64)
        .map(|task| {
            let data = if task % 2 == 0 { data.clone() } else { data.in_place() };
            let users = users.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(task));
                let mut outcomes = std::collections::BTreeMap::<Outcome, u32>::new();
                for _ in 0..60 {
                    *outcomes.entry(one_random_call(&data, &mut rng, &users).await).or_default() += 1;
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = std::collections::BTreeMap::<Outcome, u32>::new();
    for task in tasks {
        for (outcome, count) in task.await.unwrap() {
            *outcomes.entry(outcome).or_default() += count;
        }
    }
    println!("{outcomes:?}");
    assert!(outcomes.get(&Outcome::Ok).copied().unwrap_or(0) > 100, "seed {seed}: {outcomes:?}");
    assert!(outcomes.contains_key(&Outcome::GivenUp), "seed {seed}: {outcomes:?}");

    // Every invariant holds in every snapshot, so calls given up while
    // running, which may still be ending, need no waiting for.
    let mut conn = <diesel::PgConnection as diesel::Connection>::establish(db.url()).unwrap();
    let broken = dployr_tests::stress::broken_invariants(&mut conn);
    assert!(broken.is_empty(), "seed {seed}: {broken:?}");

    // Both rooms are free: two calls in place at once both run in place,
    // each waiting for the other inside its call.
    let in_place = data.in_place();
    let both = std::sync::Arc::new(std::sync::Barrier::new(2));
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (data, both) = (in_place.clone(), std::sync::Arc::clone(&both));
            tokio::spawn(async move {
                data.run(move |_| {
                    both.wait();
                    Ok(std::thread::current().name().unwrap_or_default().to_owned())
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for call in calls {
        let thread = call.await.unwrap();
        assert!(!thread.starts_with("dployr-call-"), "a room was not given back: a call ran on {thread}");
    }
}

/// When the last clone of the facade is dropped, its threads end and the
/// last of them drops the data layer: every connection of its pool closes,
/// as the server sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_ends_the_threads_and_closes_every_connection() {
    let db = dployr_testkit::database();
    let data = one_thread(&db, Duration::from_secs(30)).await;
    assert_eq!(data.users().get_by_email(&email("nobody@example.io")).await.unwrap(), None);
    drop(data);

    let mut conn = <diesel::PgConnection as diesel::Connection>::establish(db.url()).unwrap();
    #[derive(diesel::QueryableByName)]
    struct Backends {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        others: i64,
    }
    let count = "SELECT count(*) AS others FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let mut others = -1;
    for _ in 0..200 {
        others = diesel::RunQueryDsl::get_result::<Backends>(diesel::sql_query(count), &mut conn).unwrap().others;
        if others == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(others, 0, "the facade's connections outlived it");
}
