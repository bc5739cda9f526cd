//! The tower-sessions contract of `dployr_tower_sessions::KvSessionStore`,
//! as plain functions of a [`KvFixture`], so that every key-value backend
//! runs them through [`kv_contract_tests!`](crate::kv_contract_tests)
//! unchanged: what tower-sessions asks of a `SessionStore` (a created record
//! loads back, a save replaces it, a delete removes it, an expired record
//! never loads, `create` never overwrites a taken id), and what this store
//! adds (hashed keys, expiry mapped to the backend's TTL range, sign-out of
//! all of a user's sessions, counted; no save bringing back a session that
//! ended while its request ran). They hold on Cloudflare with stale reads too
//! (`kv_cloudflare`'s `stale_reads` module runs them there), where the store
//! answers from its memory of its own recent writes; the store reads the
//! fixture's [`clock`](KvFixture::clock), so that [`KvFixture::advance`]
//! moves the store's time with the backend's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dployr_kv::Clock;
use dployr_tower_sessions::{KvSessionStore, STALE_READ_WINDOW};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{ExpiredDeletion as _, SessionStore};

use crate::kv_contract::{KvFixture, list_all};

/// The data field the store indexes users by.
const USER_FIELD: &str = "user_id";

fn store(f: &dyn KvFixture) -> KvSessionStore {
    let store = KvSessionStore::new(f.kv()).with_user_field(USER_FIELD);
    match f.clock() {
        Some(clock) => store.with_clock(FixtureClock(clock)),
        None => store,
    }
}

/// The fixture's clock as the store takes one.
#[derive(Debug)]
struct FixtureClock(Arc<dyn Clock>);

impl Clock for FixtureClock {
    fn now(&self) -> SystemTime {
        self.0.now()
    }
}

/// Runs `work` to its end on a runtime of one thread.
fn run<T>(work: impl Future<Output = T>) -> T {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(work),
        Err(error) => panic!("building a runtime: {error}"),
    }
}

/// A record expiring `in_secs` seconds from now, holding `pairs`.
fn record(in_secs: i64, pairs: &[(&str, &str)]) -> Record {
    Record {
        id: Id::default(),
        data: pairs.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect::<HashMap<_, _>>(),
        expiry_date: OffsetDateTime::now_utc() + time::Duration::seconds(in_secs),
    }
}

/// The value of `result`, or a panic naming `what`.
#[track_caller]
fn ok<T>(result: tower_sessions_core::session_store::Result<T>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error:?}"),
    }
}

/// A created record loads back equal; a save replaces it; a delete removes
/// it; an unknown id loads nothing and deletes without error.
pub fn session_store_round_trips_create_save_load_delete(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut created = record(3600, &[("theme", "dark")]);
        ok(store.create(&mut created).await, "create");
        assert_eq!(ok(store.load(&created.id).await, "load"), Some(created.clone()));

        let mut changed = created.clone();
        changed.data.insert("theme".into(), "light".into());
        ok(store.save(&changed).await, "save");
        assert_eq!(ok(store.load(&created.id).await, "load after save"), Some(changed));

        ok(store.delete(&created.id).await, "delete");
        assert_eq!(ok(store.load(&created.id).await, "load after delete"), None);
        assert_eq!(ok(store.load(&Id::default()).await, "load unknown"), None);
        ok(store.delete(&Id::default()).await, "delete unknown");
    });
}

/// `create` with an id that holds a record (as created, or as saved since)
/// takes a new id and leaves the other record alone (tower-sessions'
/// contract for id collisions).
pub fn session_store_create_never_overwrites_a_taken_id(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut first = record(3600, &[("who", "first")]);
        ok(store.create(&mut first).await, "create first");
        let mut saved = record(3600, &[("who", "created")]);
        ok(store.create(&mut saved).await, "create the one saved next");
        saved.data.insert("who".into(), "saved".into());
        ok(store.save(&saved).await, "save");

        for taken in [first.id, saved.id] {
            let mut second = Record { id: taken, ..record(3600, &[("who", "second")]) };
            ok(store.create(&mut second).await, "create with a taken id");
            assert_ne!(second.id, taken, "create kept a taken id");
            assert_eq!(ok(store.load(&second.id).await, "load second"), Some(second.clone()));
        }
        assert_eq!(ok(store.load(&first.id).await, "load first"), Some(first));
        assert_eq!(ok(store.load(&saved.id).await, "load saved"), Some(saved));
    });
}

/// `create` of a record whose expiry date has passed stores nothing, but
/// the id it hands back is free all the same: it gave back a taken one,
/// and tower-sessions' next save under it, with a new expiry date, wrote
/// over the session that held it.
pub fn session_store_create_of_an_expired_record_never_hands_back_a_taken_id(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut held = record(3600, &[("who", "held")]);
        ok(store.create(&mut held).await, "create");
        let mut expired = Record { id: held.id, ..record(-10, &[("who", "other")]) };
        ok(store.create(&mut expired).await, "create an expired record with a taken id");
        assert_ne!(expired.id, held.id, "create handed back a taken id");
        assert_eq!(ok(store.load(&expired.id).await, "load the expired one"), None);
        expired.expiry_date = OffsetDateTime::now_utc() + time::Duration::seconds(3600);
        ok(store.save(&expired).await, "save it with a new expiry date");
        assert_eq!(ok(store.load(&held.id).await, "load the one held"), Some(held));
    });
}

/// Where the backend's counters are atomic, 8 concurrent creates of one id
/// end with 8 distinct ids, each loading its own record.
pub fn session_store_concurrent_creates_of_one_id_get_distinct_ids_where_atomic(f: &dyn KvFixture) {
    if !f.guarantees().exact_increment {
        return;
    }
    let store = store(f);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => panic!("building a runtime: {error}"),
    };
    runtime.block_on(async {
        let id = Id::default();
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut mine = Record { id, ..record(3600, &[("n", &n.to_string())]) };
                    ok(store.create(&mut mine).await, "create");
                    mine
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for task in tasks {
            let mine = match task.await {
                Ok(mine) => mine,
                Err(error) => panic!("a create task failed: {error}"),
            };
            assert_eq!(ok(store.load(&mine.id).await, "load"), Some(mine.clone()));
            ids.insert(mine.id);
        }
        assert_eq!(ids.len(), 8, "two creates ended on one id");
    });
}

/// A record whose expiry passed never loads: saved already expired, or
/// expired in the backend by its TTL (the fixture's clock moves).
pub fn session_store_expired_records_never_load(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut live = record(3600, &[]);
        ok(store.create(&mut live).await, "create");
        let mut past = live.clone();
        past.expiry_date = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        ok(store.save(&past).await, "save with an expiry already past");
        assert_eq!(ok(store.load(&live.id).await, "load after an expired save"), None);

        let mut short = record(120, &[]);
        ok(store.create(&mut short).await, "create");
        assert!(ok(store.load(&short.id).await, "load before expiry").is_some());
        f.advance(Duration::from_secs(180));
        assert_eq!(ok(store.load(&short.id).await, "load after the TTL"), None);
    });
}

/// The deletion task (`ExpiredDeletion::delete_expired`) runs on every
/// backend and takes nothing live: a record still valid loads after it, an
/// expired one does not.
pub fn session_store_the_deletion_task_keeps_live_records(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut short = record(120, &[(USER_FIELD, "user-1")]);
        ok(store.create(&mut short).await, "create");
        f.advance(Duration::from_secs(180));
        let mut live = record(3600, &[(USER_FIELD, "user-2")]);
        ok(store.create(&mut live).await, "create");
        ok(store.delete_expired().await, "delete_expired");
        assert_eq!(ok(store.load(&live.id).await, "the live record"), Some(live));
        assert_eq!(ok(store.load(&short.id).await, "the expired record"), None);
    });
}

/// An expiry closer than the backend's shortest TTL (Cloudflare: 60 s) or
/// further than its longest is written within them, and loads.
pub fn session_store_expiry_is_kept_within_the_backends_ttl_range(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        for in_secs in [30, 200 * 365 * 24 * 3600] {
            let mut r = record(in_secs, &[]);
            ok(store.create(&mut r).await, &format!("create expiring in {in_secs} s"));
            assert_eq!(ok(store.load(&r.id).await, "load"), Some(r));
        }
    });
}

/// A session of `user-42` created through `store`, and every key of the
/// backend once a listing sees it (past any backend's staleness).
fn one_stored_session(f: &dyn KvFixture, store: &KvSessionStore) -> (Record, Vec<String>) {
    let mut r = record(3600, &[(USER_FIELD, "user-42")]);
    ok(run(store.create(&mut r)), "create");
    f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
    (r, list_all(f.kv().as_ref(), "", 100).0)
}

/// No key holds a session id or a user id: records sit under the SHA-256
/// of the id.
pub fn session_store_keys_hold_no_session_or_user_id(f: &dyn KvFixture) {
    let (r, keys) = one_stored_session(f, &store(f));
    assert!(keys.iter().any(|k| k.starts_with("tower_session:") && k.len() == "tower_session:".len() + 64));
    for key in keys {
        assert!(!key.contains(&r.id.to_string()) && !key.contains("user-42"), "key {key} holds an id");
    }
}

/// No stored value holds the session id either, in any form (the cookie's
/// text, or the number it encodes): a leaked dump, backup or replica of the
/// backend must hand out no live session. A load by the id still finds it.
pub fn session_store_values_hold_no_session_id(f: &dyn KvFixture) {
    let store = store(f);
    let (r, keys) = one_stored_session(f, &store);
    let forms = [r.id.to_string(), r.id.0.to_string(), r.id.0.unsigned_abs().to_string()];
    let mut read = 0;
    for key in keys {
        let Some(value) = f.kv().get(&key).unwrap_or_else(|e| panic!("get {key}: {e}")) else { continue };
        read += 1;
        let text = String::from_utf8_lossy(&value);
        for form in &forms {
            assert!(!text.contains(form.as_str()), "the value under {key} holds the session id ({form}): {text}");
        }
    }
    assert!(read > 0, "no value was read");
    assert_eq!(ok(run(store.load(&r.id)), "load").map(|loaded| loaded.data), Some(r.data));
}

/// Signing a user out everywhere deletes each of their sessions and no one
/// else's; a session without a user is not touched either.
pub fn session_store_deletes_every_session_of_one_user_only(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut ada = Vec::new();
        for _ in 0..4 {
            let mut r = record(3600, &[(USER_FIELD, "ada")]);
            ok(store.create(&mut r).await, "create ada's");
            ada.push(r);
        }
        let mut bob = record(3600, &[(USER_FIELD, "bob")]);
        ok(store.create(&mut bob).await, "create bob's");
        let mut anonymous = record(3600, &[]);
        ok(store.create(&mut anonymous).await, "create an anonymous one");
        // A session that is saved again (each request that changes it) is
        // still one session.
        ok(store.save(&ada[0]).await, "save ada's again");

        match store.delete_user_sessions("ada").await {
            Ok(4) => {}
            other => panic!("expected 4 sessions of ada, got {other:?}"),
        }
        for r in &ada {
            assert_eq!(ok(store.load(&r.id).await, "ada's after sign-out everywhere"), None);
        }
        assert!(ok(store.load(&bob.id).await, "bob's").is_some());
        assert!(ok(store.load(&anonymous.id).await, "anonymous").is_some());
    });
}

/// A session whose data names another user after a save (a second user
/// signed in on the same session, without a new id) is ended by that
/// user's sign-out everywhere, and no longer by the first user's, whose
/// index still has an entry naming it.
pub fn session_store_a_session_that_changed_user_is_ended_only_with_its_current_user(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut shared = record(3600, &[(USER_FIELD, "ada")]);
        ok(store.create(&mut shared).await, "create ada's");
        shared.data.insert(USER_FIELD.to_owned(), serde_json::Value::from("bob"));
        ok(store.save(&shared).await, "bob signs in on the same session");
        match store.delete_user_sessions("ada").await {
            Ok(0) => {}
            other => panic!("expected no session of ada's, got {other:?}"),
        }
        assert!(ok(store.load(&shared.id).await, "bob's").is_some(), "ada's sign-out ended bob's session");
        match store.delete_user_sessions("bob").await {
            Ok(1) => {}
            other => panic!("expected bob's one session, got {other:?}"),
        }
        assert_eq!(ok(store.load(&shared.id).await, "after bob's sign-out"), None);
    });
}

/// A session whose data no longer names its user after a save (a handler
/// that signed the user out by removing the field, keeping the session and
/// whatever else it holds) is still ended by their sign-out everywhere, and
/// counted: it was theirs, and only another user's name makes it someone
/// else's (see the test above).
pub fn session_store_a_session_that_dropped_its_user_is_ended_by_their_sign_out_everywhere(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut visit = record(3600, &[(USER_FIELD, "ada"), ("github_token", "t")]);
        ok(store.create(&mut visit).await, "create ada's");
        visit.data.remove(USER_FIELD);
        ok(store.save(&visit).await, "ada signs out of this session by removing the field");
        match store.delete_user_sessions("ada").await {
            Ok(1) => {}
            other => panic!("expected the one session of ada's, got {other:?}"),
        }
        assert_eq!(ok(store.load(&visit.id).await, "after ada's sign-out everywhere"), None);
    });
}

/// `value` inside `levels` arrays.
fn nested(levels: usize, value: serde_json::Value) -> serde_json::Value {
    (0..levels).fold(value, |inner, _| serde_json::Value::Array(vec![inner]))
}

/// A record holding data nested deeper than serde_json reads back (128
/// levels) is refused as an encoding error, by `create` and `save` alike,
/// and nothing is written: stored, it would fail every later load of its
/// session (another process's, or this one's once its memory of the write
/// has passed), leaving its user stuck until it expired. Data nested as
/// deep as can be read back is stored and loads.
pub fn session_store_refuses_a_record_it_could_not_load_back(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut kept = record(3600, &[("theme", "dark")]);
        ok(store.create(&mut kept).await, "create");
        let before = list_all(f.kv().as_ref(), "", 1000).0;

        let mut too_deep = kept.clone();
        too_deep.data.insert("deep".into(), nested(200, serde_json::Value::Null));
        let refused = store.save(&too_deep).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        let mut new_too_deep = record(3600, &[]);
        new_too_deep.data.insert("deep".into(), nested(200, serde_json::Value::Null));
        let refused = store.create(&mut new_too_deep).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        // Deep enough that serializing it would overflow the stack of the
        // thread that writes it (about 1 850 levels aborted the process):
        // refused all the same.
        let mut far_too_deep = kept.clone();
        far_too_deep.data.insert("deep".into(), nested(2_000, serde_json::Value::Null));
        let refused = store.save(&far_too_deep).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        far_too_deep.id = record(3600, &[]).id;
        let refused = store.create(&mut far_too_deep).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        // Larger than the backend takes: the caller's data, refused before
        // anything is written (the id's claim included), by both calls.
        let too_large = serde_json::Value::String("x".repeat(f.kv().limits().max_value_bytes));
        let mut new_too_large = record(3600, &[]);
        new_too_large.data.insert("large".into(), too_large.clone());
        let refused = store.create(&mut new_too_large).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        let mut saved_too_large = kept.clone();
        saved_too_large.data.insert("large".into(), too_large);
        let refused = store.save(&saved_too_large).await;
        assert!(matches!(refused, Err(tower_sessions_core::session_store::Error::Encode(_))), "{refused:?}");
        assert_eq!(list_all(f.kv().as_ref(), "", 1000).0, before, "nothing written");
        // Past the store's memory of its writes (and a stale backend's
        // lag): what loads is what the backend holds.
        f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
        assert_eq!(ok(store.load(&kept.id).await, "load from the backend"), Some(kept.clone()));

        // The deepest data that reads back: the record and its data map are
        // two levels of the 127 serde_json reads.
        let mut deepest = kept.clone();
        deepest.data.insert("deep".into(), nested(125, serde_json::Value::Null));
        ok(store.save(&deepest).await, "save the deepest");
        f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
        assert_eq!(ok(store.load(&kept.id).await, "load the deepest from the backend"), Some(deepest));
    });
}

/// Where the store keeps its per-user index of sessions.
const USER_INDEX_PREFIX: &str = "tower_user_sessions:";

/// A request that loaded a session before the session ended, and saves it
/// after, does not bring it back: tower-sessions saves only a session its
/// request loaded (a new one goes through `create`), so a save that finds
/// no record is of a session that ended, and writes nothing. Not after a
/// sign-out of this session (`delete`), nor after a sign-out everywhere
/// (whose user index does not list the session again), whether the backend
/// has caught up with the session's writes or not; nor for a record that
/// was never created.
pub fn session_store_a_save_after_the_session_was_deleted_does_not_bring_it_back(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let never_created = record(3600, &[(USER_FIELD, "ada")]);
        ok(store.save(&never_created).await, "save of a record never created");
        assert_eq!(ok(store.load(&never_created.id).await, "load the never created"), None);

        let mut signed_out = record(3600, &[(USER_FIELD, "ada")]);
        ok(store.create(&mut signed_out).await, "create");
        let mut in_flight = loaded(&store, &signed_out.id).await;
        ok(store.delete(&signed_out.id).await, "sign out");
        in_flight.data.insert("theme".into(), "dark".into());
        ok(store.save(&in_flight).await, "save by a request that loaded it before the sign-out");
        assert_eq!(ok(store.load(&signed_out.id).await, "load after sign-out and save"), None, "signed in again");

        let mut ended_everywhere = Vec::new();
        for caught_up in [true, false] {
            let mut everywhere = record(3600, &[(USER_FIELD, "ada")]);
            ok(store.create(&mut everywhere).await, "create");
            let mut in_flight = loaded(&store, &everywhere.id).await;
            if caught_up {
                // Past any backend's staleness and the store's memory of
                // its writes: the sign-out finds the session by its index.
                f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
            }
            if let Err(error) = store.delete_user_sessions("ada").await {
                panic!("sign out everywhere: {error:?}");
            }
            in_flight.data.insert("theme".into(), "dark".into());
            ok(store.save(&in_flight).await, "save by a request that loaded it before the sign-out everywhere");
            assert_eq!(ok(store.load(&everywhere.id).await, "load after sign-out everywhere and save"), None);
            ended_everywhere.push(everywhere.id);
        }

        // What the backend holds, past its staleness and the store's memory.
        f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
        for id in [never_created.id, signed_out.id].iter().chain(&ended_everywhere) {
            assert_eq!(ok(store.load(id).await, "load from the backend"), None, "the backend holds it again");
        }
        let (index, _) = list_all(f.kv().as_ref(), USER_INDEX_PREFIX, 100);
        assert_eq!(index, Vec::<String>::new(), "the user index lists a session again");
    });
}

/// A sign-out everywhere counts the sessions it ended: not one its index
/// still names but that ended before (signed out on its own, which leaves
/// the index entry; a sign-in with a new id deletes the old record too).
pub fn session_store_sign_out_everywhere_counts_only_sessions_that_were_live(f: &dyn KvFixture) {
    let store = store(f);
    run(async {
        let mut ended = record(3600, &[(USER_FIELD, "ada")]);
        ok(store.create(&mut ended).await, "create");
        ok(store.delete(&ended.id).await, "sign out of this session");
        // Past any backend's staleness and the store's memory of its
        // writes: the index lists the ended session's entry.
        f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
        let mut live = record(3600, &[(USER_FIELD, "ada")]);
        ok(store.create(&mut live).await, "create another");
        match store.delete_user_sessions("ada").await {
            Ok(1) => {}
            other => panic!("expected the one live session of ada's, got {other:?}"),
        }
        assert_eq!(ok(store.load(&live.id).await, "load after sign-out everywhere"), None);
        f.advance(STALE_READ_WINDOW + Duration::from_secs(1));
        assert_eq!(list_all(f.kv().as_ref(), USER_INDEX_PREFIX, 100).0, Vec::<String>::new(), "entries left");
    });
}

/// Where takes are atomic: two sign-outs everywhere of one user at once
/// (two processes) end each session once between them, so their counts add
/// up to the sessions there were, not twice some of them.
pub fn session_store_sign_outs_everywhere_at_once_count_each_session_once_where_atomic(f: &dyn KvFixture) {
    if !f.guarantees().atomic_take {
        return;
    }
    let stores = [store(f), store(f)];
    for round in 0..30 {
        run(async {
            for i in 0..5 {
                let mut session = record(3600, &[(USER_FIELD, "ada")]);
                ok(stores[(round + i) % 2].create(&mut session).await, "create");
            }
        });
        let counts: Vec<usize> = std::thread::scope(|scope| {
            let calls: Vec<_> = stores
                .iter()
                .map(|store| {
                    scope.spawn(move || {
                        run(async { crate::kv_contract::ok(store.delete_user_sessions("ada").await, "sign out") })
                    })
                })
                .collect();
            calls.into_iter().map(|call| call.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        assert_eq!(counts.iter().sum::<usize>(), 5, "round {round}: the two counts {counts:?}");
    }
}

/// The record `store` loads for `id`, which must be there.
async fn loaded(store: &KvSessionStore, id: &Id) -> Record {
    match store.load(id).await {
        Ok(Some(record)) => record,
        other => panic!("expected the record of {id}, got {other:?}"),
    }
}
