//! A consumer's view: an HTTP-handler-like function of another crate that
//! needs only `dployr-domain`. It takes `&dyn ClusterStore`, so production
//! passes `dployr_pg::PgClusterStore` and its unit tests pass the generated
//! `MockClusterStore` (feature `mock`), with no database.
//!
//! Run its tests with `cargo test -p dployr-domain --features mock --example invite_handler`
//! (`cargo test --workspace` runs them too).

use dployr_domain::{ClusterId, ClusterStore, Email, StoreError, UserId};

/// What the handler answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// 200 with the number of people invited.
    Invited(usize),
    /// 403: only admins may invite.
    Forbidden,
    /// 400 with the reason.
    BadRequest(String),
}

/// `POST /clusters/{id}/invites`: an admin invites people by e-mail.
pub fn invite(
    store: &dyn ClusterStore,
    caller: &UserId,
    cluster: &ClusterId,
    emails: &[&str],
) -> Result<Reply, StoreError> {
    if !store.is_admin(caller, cluster)? {
        return Ok(Reply::Forbidden);
    }
    let emails: Vec<Email> = match emails.iter().map(|e| Email::parse(e)).collect() {
        Ok(emails) => emails,
        Err(error) => return Ok(Reply::BadRequest(error.to_string())),
    };
    let members = store.add_users(cluster, &emails)?;
    Ok(Reply::Invited(members.len()))
}

#[expect(clippy::print_stdout, reason = "an example says how to run it")]
fn main() {
    println!("see the tests of this example: cargo test -p dployr-domain --features mock --example invite_handler");
}

#[cfg(test)]
mod tests {
    use dployr_domain::MockClusterStore;
    use mockall::predicate::eq;

    use super::*;

    #[test]
    fn non_admins_are_forbidden_and_nothing_is_written() {
        let (caller, cluster) = (UserId::generate(), ClusterId::generate());
        let mut store = MockClusterStore::new();
        store.expect_is_admin().with(eq(caller), eq(cluster)).return_once(|_, _| Ok(false));
        store.expect_add_users().never();
        assert_eq!(invite(&store, &caller, &cluster, &["a@example.io"]).unwrap(), Reply::Forbidden);
    }

    #[test]
    fn admins_invite_normalised_addresses() {
        let (caller, cluster) = (UserId::generate(), ClusterId::generate());
        let mut store = MockClusterStore::new();
        store.expect_is_admin().return_once(|_, _| Ok(true));
        store
            .expect_add_users()
            .withf(|_, emails| emails.iter().map(Email::as_str).eq(["a@example.io", "b@example.io"]))
            .return_once(|_, _| Ok(Vec::new()));
        assert_eq!(invite(&store, &caller, &cluster, &["A@Example.io", " b@example.io"]).unwrap(), Reply::Invited(0));
    }

    #[test]
    fn a_malformed_address_is_a_bad_request() {
        let mut store = MockClusterStore::new();
        store.expect_is_admin().return_once(|_, _| Ok(true));
        let reply = invite(&store, &UserId::generate(), &ClusterId::generate(), &["not-an-email"]).unwrap();
        assert!(matches!(reply, Reply::BadRequest(reason) if reason.contains("email")));
    }

    #[test]
    fn store_errors_reach_the_caller() {
        let mut store = MockClusterStore::new();
        store
            .expect_is_admin()
            .return_once(|_, _| Err(StoreError::Unavailable { reason: "pool".into(), source: None }));
        let error = invite(&store, &UserId::generate(), &ClusterId::generate(), &[]).unwrap_err();
        assert!(error.is_retryable());
    }
}
