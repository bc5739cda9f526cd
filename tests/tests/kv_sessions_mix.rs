//! A random mix of every session write `KvStore` has (create, delete, sign
//! out everywhere) with reads, on 6 threads, while a checker beside them
//! signs users out everywhere and checks the promise each time: every
//! session of that user created before the call started is gone when it
//! returns, and a bystander's sessions, whom nobody signs out, still load.
//! Then a final sign-out of everyone leaves no session of theirs readable.
//! Exact on memory and PostgreSQL; Cloudflare's listing is eventually
//! consistent and documented as such, so it is not run here.

#![cfg(test)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dployr_domain::{KvBackend, User};
use dployr_kv::{KvStore, MemoryKv, PgKv, SessionId};
use dployr_pg::{PgPool, PoolConfig};
use dployr_tests::kv_contract::{sample_clusters, sample_user};
use rand::Rng;

/// A session the mix created: whose, and the sequence number at which its
/// creation had returned.
struct Created {
    user: usize,
    id: SessionId,
    done_at: u64,
}

fn mix_with_a_checker(kv: Arc<dyn KvBackend>) {
    let store = KvStore::new(kv);
    let users: Vec<User> = (0..4).map(sample_user).collect();
    // Sessions of a user the mix never signs out: every sign-out of the
    // others must leave them (a sign-out that ended too much would pass
    // every other check here).
    let bystander = sample_user(4);
    let witnesses: Vec<SessionId> = (0..3).map(|_| SessionId::generate()).collect();
    for id in &witnesses {
        store.create_session(id, &bystander, sample_clusters()).unwrap();
    }
    let created: Mutex<Vec<Created>> = Mutex::new(Vec::new());
    let clock = AtomicU64::new(0);
    let checks = AtomicU64::new(0);
    let run_for = Duration::from_secs(3);
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                let mut rng = rand::rng();
                let until = Instant::now() + run_for;
                while Instant::now() < until {
                    let user = rng.random_range(0..users.len());
                    match rng.random_range(0..10) {
                        0..=4 => {
                            let id = SessionId::generate();
                            store.create_session(&id, &users[user], sample_clusters()).unwrap();
                            let done_at = clock.fetch_add(1, Ordering::SeqCst);
                            created.lock().unwrap().push(Created { user, id, done_at });
                        }
                        5..=6 => {
                            let known = created.lock().unwrap();
                            if let Some(pick) = known.get(rng.random_range(0..known.len().max(1))) {
                                let id = SessionId::new(pick.id.expose());
                                drop(known);
                                store.delete_session(&id).unwrap();
                            }
                        }
                        7..=8 => {
                            let known = created.lock().unwrap();
                            if let Some(pick) = known.get(rng.random_range(0..known.len().max(1))) {
                                let (id, user) = (SessionId::new(pick.id.expose()), pick.user);
                                drop(known);
                                if let Some(session) = store.get_session(&id).unwrap() {
                                    assert_eq!(session.user_id, users[user].id, "a session read as another user's");
                                }
                            }
                        }
                        _ => {
                            store.delete_user_sessions(&users[user].id).unwrap();
                        }
                    }
                }
            });
        }
        // The checker.
        scope.spawn(|| {
            let mut rng = rand::rng();
            let until = Instant::now() + run_for;
            while Instant::now() < until {
                let user = rng.random_range(0..users.len());
                let started_at = clock.fetch_add(1, Ordering::SeqCst);
                store.delete_user_sessions(&users[user].id).unwrap();
                let before: Vec<SessionId> = created
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.user == user && c.done_at < started_at)
                    .map(|c| SessionId::new(c.id.expose()))
                    .collect();
                for id in before {
                    assert_eq!(store.get_session(&id).unwrap(), None, "a session older than the sign-out survived it");
                }
                for id in &witnesses {
                    let session = store.get_session(id).unwrap();
                    assert_eq!(session.map(|s| s.user_id), Some(bystander.id), "another user's sign-out ended it");
                }
                checks.fetch_add(1, Ordering::SeqCst);
            }
        });
    });
    assert!(checks.load(Ordering::SeqCst) > 0, "the checker never ran");
    let created = created.into_inner().unwrap();
    assert!(created.len() > 50, "the mix created only {} sessions", created.len());
    for user in &users {
        store.delete_user_sessions(&user.id).unwrap();
    }
    for c in &created {
        assert_eq!(store.get_session(&c.id).unwrap(), None, "a session survived signing everyone out");
    }
    for id in &witnesses {
        assert!(store.get_session(id).unwrap().is_some(), "the bystander was signed out with the others");
    }
    assert_eq!(store.delete_user_sessions(&bystander.id).unwrap(), witnesses.len());
    for id in &witnesses {
        assert_eq!(store.get_session(id).unwrap(), None);
    }
}

#[test]
fn sign_out_everywhere_holds_under_a_random_mix_on_memory() {
    mix_with_a_checker(Arc::new(MemoryKv::new()));
}

#[test]
fn sign_out_everywhere_holds_under_a_random_mix_on_postgres() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 8, ..PoolConfig::default() }).unwrap();
    mix_with_a_checker(Arc::new(PgKv::new(pool)));
}
