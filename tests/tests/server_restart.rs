//! The data layer across restarts of its PostgreSQL server: the async
//! facade, with sessions on the PostgreSQL key-value backend (purger
//! running), under load from 8 tasks while the server is stopped (fast
//! shutdown, then immediate shutdown, which is a crash of the server and
//! crash recovery at the next start), kept down for 300 ms and started
//! again. The randomized mix of every store operation across restarts is
//! `stress::a_random_mix_keeps_every_invariant_across_restarts_of_its_server`.
//!
//! The server is a private throwaway one (`PrivateServer`), whose
//! acknowledged commits survive a crash of the server: the shared test
//! server is never restarted.

#![cfg(test)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dployr_data::{
    AsyncDataLayer, Config, DataLayer, Email, KvBackendConfig, NewUser, PoolConfig, Provider, SessionId, StoreError,
};
use dployr_testkit::{PrivateServer, Shutdown};

/// Connections the data layer's pool may hold (the key-value backend
/// shares the pool).
const CONNECTIONS: u32 = 4;

const TASKS: usize = 8;

/// What the load's calls ended as, by kind.
#[derive(Debug, Default)]
struct Outcomes {
    by_kind: BTreeMap<String, u64>,
    /// Writes acknowledged: the e-mail of each user upserted and the
    /// session created for it, all of which must survive the restarts.
    acknowledged: Vec<(Email, SessionId)>,
}

fn kind_of(error: &StoreError) -> String {
    match error {
        StoreError::Unavailable { .. } => "Unavailable".into(),
        other => format!("{other:?}"),
    }
}

/// One call of the load: sign a new user in (upsert and a session, each one
/// transaction), or, three times in four, read a user and a session signed
/// in before (single statements, outside a transaction: a lost connection
/// there is not one diesel itself would see as broken).
async fn one_call(data: &AsyncDataLayer, task: usize, n: u64, outcomes: &Mutex<Outcomes>) {
    let signed_in = outcomes.lock().unwrap().acknowledged.last().cloned();
    let result: Result<Option<(Email, SessionId)>, StoreError> = match (n % 4, signed_in) {
        (1..=3, Some((email, session))) => {
            async {
                let user = data.users().get_by_email(&email).await?;
                assert!(user.is_some(), "{email} was acknowledged, then is missing");
                let session = data.kv().get_session(&session).await?;
                assert!(
                    session.is_some_and(|s| s.email == email),
                    "the session of {email} was acknowledged, then is missing"
                );
                Ok(None)
            }
            .await
        }
        _ => {
            async {
                let email = Email::parse(&format!("t{task}-{n}@restart.example")).unwrap();
                let user = data.users().upsert(NewUser::new(email.clone(), Provider::Github)).await?;
                let session = SessionId::generate();
                data.kv().create_session(&session, &user, Vec::new()).await?;
                Ok(Some((email, session)))
            }
            .await
        }
    };
    let mut outcomes = outcomes.lock().unwrap();
    let kind = match result {
        Ok(written) => {
            outcomes.acknowledged.extend(written);
            "ok".to_owned()
        }
        Err(error) => kind_of(&error),
    };
    *outcomes.by_kind.entry(kind).or_default() += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_data_layer_serves_again_after_each_kind_of_restart_and_keeps_what_it_acknowledged() {
    let Some(server) = tokio::task::spawn_blocking(|| PrivateServer::start().unwrap()).await.unwrap() else {
        eprintln!("skipped: no local PostgreSQL server binaries to start a private server with");
        return;
    };
    let server = Arc::new(server);
    let config = Config::new(server.url())
        .with_pool(PoolConfig { max_size: CONNECTIONS, ..PoolConfig::default() })
        .with_kv(KvBackendConfig::Postgres { purge_every: Some(Duration::from_millis(100)) })
        .without_migrations_on_start();
    let data = AsyncDataLayer::open(config).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let load: Vec<_> = (0..TASKS)
        .map(|task| {
            let (data, stop, outcomes) = (data.clone(), Arc::clone(&stop), Arc::clone(&outcomes));
            tokio::spawn(async move {
                let mut n = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    one_call(&data, task, n, &outcomes).await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();

    let shutdowns = [Shutdown::Fast, Shutdown::Immediate, Shutdown::Fast, Shutdown::Immediate];
    let mut ok_before = 0;
    for shutdown in shutdowns {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let restarting = Arc::clone(&server);
        tokio::task::spawn_blocking(move || restarting.restart(shutdown, Duration::from_millis(300)))
            .await
            .unwrap()
            .unwrap();
        // The load goes on, on new connections.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let ok = outcomes.lock().unwrap().by_kind.get("ok").copied().unwrap_or(0);
        assert!(ok > ok_before + 20, "after the {shutdown:?} restart, {} calls succeeded", ok - ok_before);
        ok_before = ok;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    println!("{:?}, {} sign-ins acknowledged", outcomes.by_kind, outcomes.acknowledged.len());
    let unexpected: Vec<_> =
        outcomes.by_kind.keys().filter(|kind| !["ok", "Unavailable"].contains(&kind.as_str())).collect();
    assert!(unexpected.is_empty(), "errors other than Unavailable: {:?}", outcomes.by_kind);
    // Each restart ends every connection of the pool: one in use fails its
    // call and is discarded; one at rest is found out at its next checkout
    // and replaced (no call fails on it), unless it is taken back within
    // the 1 ms under which the pool does not look. So at most one failure
    // per connection per restart. A call waiting for a connection while the
    // server refuses them waits (the checkout timeout is 5 s), it does not fail.
    let unavailable = outcomes.by_kind.get("Unavailable").copied().unwrap_or(0);
    let most = shutdowns.len() as u64 * u64::from(CONNECTIONS);
    assert!(unavailable <= most, "{unavailable} calls failed, more than one per connection a restart ended ({most})");

    // Every acknowledged sign-in is there: the user and the session, after
    // two crashes of the server. The last restart's ended connections may
    // each fail one more call first.
    let mut tries = 0;
    let health = loop {
        let health = data.run(|data: &DataLayer| Ok(data.health())).await.unwrap();
        tries += 1;
        if health.is_ready() || tries > CONNECTIONS {
            break health;
        }
    };
    assert!(health.is_ready(), "{health:?}");
    for (email, session) in &outcomes.acknowledged {
        let user = data.users().get_by_email(email).await.unwrap();
        assert!(user.is_some(), "{email} was acknowledged, then lost in a restart");
        let session = data.kv().get_session(session).await.unwrap();
        assert!(session.is_some_and(|s| &s.email == email), "the session of {email} was acknowledged, then lost");
    }
    drop(data);
    drop(server);
}
