//! Concurrency on real PostgreSQL: the invariants hold whatever the
//! interleaving (one owner per cluster, one cluster per create_for_owner,
//! a nonce used once).

use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use dployr_domain::{
    BootstrapTokenStore, ClusterPatch, ClusterStore, InstanceStore, NewInstance, NewUser, Provider, Role, StoreError,
    UserId, UserStore,
};

use crate::fixture::{Fixture, email};

const THREADS: usize = 16;

/// Runs `work(thread_index)` on `THREADS` threads released together.
fn together<T: Send + 'static>(work: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let work = Arc::new(work);
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (work, start) = (Arc::clone(&work), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                work(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn concurrent_transfers_invites_removals_and_role_updates_never_leave_zero_or_two_owners() {
    const ROUNDS: usize = 1000;
    let f = Arc::new(Fixture::with_pool_size(THREADS as u32 + 1));
    let (_, cluster) = f.owner("owner@example.io");
    let users: Arc<Vec<UserId>> = Arc::new((0..THREADS).map(|i| f.user(&format!("member{i}@example.io")).id).collect());
    let round_start = Arc::new(Barrier::new(THREADS + 1));
    let round_end = Arc::new(Barrier::new(THREADS + 1));
    // A worker that panicked would leave the others waiting at a barrier
    // forever; workers report unexpected errors here and the main thread
    // fails the test after the round instead.
    let unexpected: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (f, users, round_start, round_end, unexpected) = (
                Arc::clone(&f),
                Arc::clone(&users),
                Arc::clone(&round_start),
                Arc::clone(&round_end),
                Arc::clone(&unexpected),
            );
            let cluster = cluster.id;
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    round_start.wait();
                    let target = users[(round * 7 + i) % THREADS];
                    let result = match i % 4 {
                        0 => f.clusters.transfer_ownership(&cluster, &target, Some(Role::Admin)),
                        1 => f
                            .clusters
                            .add_users(&cluster, &[email(&format!("guest{}@example.io", round % 5))])
                            .map(drop),
                        2 => {
                            let patch = ClusterPatch {
                                roles: Some(
                                    [(Role::Developer, vec![target]), (Role::Viewer, users[..4].to_vec())].into(),
                                ),
                                ..ClusterPatch::default()
                            };
                            f.clusters.update(&cluster, patch).map(drop)
                        }
                        _ => f.clusters.remove_users(&cluster, &[target]),
                    };
                    // Removing the current owner is refused by design; nothing else may fail.
                    if let Err(error) = result
                        && !matches!(error, StoreError::Conflict { field: "owner", .. })
                    {
                        unexpected.lock().unwrap().push(format!("round {round}, thread {i}: {error}"));
                    }
                    round_end.wait();
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        round_start.wait();
        round_end.wait();
        let owners = f.count(&format!(
            "SELECT count(*) FROM user_clusters WHERE cluster_id = '{}' AND role = 'owner'",
            cluster.id
        ));
        assert_eq!(owners, 1, "after round {round}");
        let errors = unexpected.lock().unwrap();
        assert!(errors.is_empty(), "unexpected errors: {errors:?}");
    }
    for worker in workers {
        worker.join().unwrap();
    }
}

#[test]
fn sixteen_concurrent_create_for_owner_for_one_user_create_one_cluster() {
    let f = Arc::new(Fixture::with_pool_size(THREADS as u32));
    for attempt in 0..5 {
        let user = f.user(&format!("ada{attempt}@example.io")).id;
        let g = Arc::clone(&f);
        let clusters = together(move |_| g.clusters.create_for_owner(&user).unwrap().id);
        assert!(clusters.iter().all(|id| *id == clusters[0]), "attempt {attempt}: {clusters:?}");
    }
    assert_eq!(f.count("SELECT count(*) FROM clusters"), 5);
    assert_eq!(f.count("SELECT count(*) FROM user_clusters WHERE role = 'owner'"), 5);
}

#[test]
fn sixteen_concurrent_mark_used_of_one_nonce_return_true_exactly_once() {
    let f = Arc::new(Fixture::with_pool_size(THREADS as u32));
    let (_, cluster) = f.owner("ada@example.io");
    let instance = f
        .instances
        .create(
            &cluster.id,
            NewInstance { address: "h".try_into().unwrap(), tag: "t".try_into().unwrap(), metadata: None },
        )
        .unwrap()
        .id;
    for attempt in 0..20 {
        let nonce: dployr_domain::Nonce = format!("nonce-{attempt}").try_into().unwrap();
        f.tokens.create(&instance, &nonce).unwrap();
        let g = Arc::clone(&f);
        let marked = together(move |_| g.tokens.mark_used(&nonce).unwrap());
        assert_eq!(marked.iter().filter(|m| **m).count(), 1, "attempt {attempt}");
    }
}

#[test]
fn sixteen_concurrent_sign_ins_of_one_email_make_one_user_and_keep_every_metadata_key() {
    let f = Arc::new(Fixture::with_pool_size(THREADS as u32));
    let g = Arc::clone(&f);
    let ids = together(move |i| {
        let metadata = dployr_domain::Metadata::try_from(serde_json::json!({ format!("k{i}"): i })).unwrap();
        g.users
            .upsert(NewUser { metadata: Some(metadata), ..NewUser::new(email("ada@example.io"), Provider::Google) })
            .unwrap()
            .id
    });
    assert!(ids.iter().all(|id| *id == ids[0]));
    let user = f.users.get(&ids[0]).unwrap().unwrap();
    assert_eq!(user.metadata.as_map().len(), THREADS, "no sign-in's metadata was lost");
}
