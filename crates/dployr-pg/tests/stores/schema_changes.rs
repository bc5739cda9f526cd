//! A migration that changes the type of a column the stores read, applied
//! while a pool runs (a rolling deploy: the new release migrates, the old
//! one keeps serving). Each pooled connection holds the statements it
//! prepared, and PostgreSQL refuses to run one whose result type changed
//! ("cached plan must not change result type", 0A000) at every call on
//! that connection. Before this was handled, every call of such a
//! statement failed as `Backend` until the process restarted. Now the
//! connection is discarded and the call runs once more on another, which
//! prepares the statement for the schema as it is: the caller sees no
//! error.

use diesel::connection::SimpleConnection as _;
use dployr_domain::{ClusterStore as _, NewUser, Provider, UserPatch, UserStore as _};

use crate::fixture::Fixture;

#[test]
fn a_column_whose_type_a_migration_changed_under_the_pool_is_read_and_written_without_an_error() {
    let f = Fixture::with_pool_size(3);
    let (ada, cluster) = f.owner("ada@example.io");
    // Every connection of the pool prepares the statements: calls at once.
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                for _ in 0..20 {
                    f.users.get_by_email(&ada.email).unwrap();
                    f.users.get(&ada.id).unwrap();
                }
            });
        }
    });
    let patch = || UserPatch { provider: Some(Provider::Email), ..UserPatch::default() };
    f.users.update(&ada.email, patch()).unwrap();
    // An owner's `create_for_owner` gives back their cluster, read in its
    // transaction.
    assert_eq!(f.clusters.create_for_owner(&ada.id).unwrap().id, cluster.id);
    let closed_before = f.pool.pool_stats().connections_closed;

    for new_type in ["varchar(300)", "text"] {
        f.inspect(|conn| {
            conn.batch_execute(&format!(
                "ALTER TABLE users ALTER COLUMN provider TYPE {new_type}; \
                 ALTER TABLE clusters ALTER COLUMN name TYPE {new_type}"
            ))
            .unwrap();
        });
        // A thread of its own, which no connection was kept for: it is
        // handed one the pool kept, maybe stale, and after it another.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let found =
                    f.users.get_by_email(&ada.email).unwrap_or_else(|e| panic!("{new_type}, new thread: {e:?}"));
                assert_eq!(found.map(|user| user.id), Some(ada.id));
            });
        });
        for round in 0..6 {
            // Transactions first (this thread's connection prepared their
            // statements before the change), then reads, one statement
            // each, all returning a changed column.
            let found = f.clusters.create_for_owner(&ada.id).unwrap_or_else(|e| panic!("{new_type}, {round}: {e:?}"));
            assert_eq!(found.id, cluster.id);
            let updated = f.users.update(&ada.email, patch()).unwrap_or_else(|e| panic!("{new_type}, {round}: {e:?}"));
            assert_eq!(updated.map(|user| user.id), Some(ada.id));
            f.users
                .upsert(NewUser::new(ada.email.clone(), Provider::Email))
                .unwrap_or_else(|e| panic!("{new_type}, {round}: {e:?}"));
            let found = f.users.get_by_email(&ada.email).unwrap_or_else(|e| panic!("{new_type}, {round}: {e:?}"));
            assert_eq!(found.map(|user| user.provider), Some(Provider::Email));
            f.users.get(&ada.id).unwrap_or_else(|e| panic!("{new_type}, {round}: {e:?}"));
        }
    }
    // At most one connection given up per connection the pool had, per
    // change (a connection that had not prepared a statement is kept).
    let closed = f.pool.pool_stats().connections_closed - closed_before;
    assert!((1..=6).contains(&closed), "{closed} connections closed");
}
