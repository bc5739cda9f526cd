//! A short run of the randomized concurrent workload (`dployr_tests::stress`)
//! with its invariant checker: every operation of the stores, writes and
//! reads (each read's answer checked too), from 16 threads for 10 s
//! (`DPLOYR_STRESS_SECONDS` to change it), a new seed each run, printed
//! (`seed S` in the report). Replay a failure with the same seed and shape:
//! `DPLOYR_STRESS_SEED=S cargo test -p dployr-tests --test stress` (every
//! test of this file reads it), or, for the first test,
//! `cargo xtask stress --seed S --threads 16 --seconds 10 --clusters 4`
//! (xtask's own defaults, 32 threads for 60 s, make another run). A seed
//! fixes each thread's random choices, not how the threads interleave.

use std::sync::Arc;
use std::time::Duration;

use dployr_testkit::{PrivateServer, Shutdown};
use dployr_tests::stress::{self, Disturbance, StressConfig};

#[test]
fn a_random_mix_of_every_operation_keeps_every_invariant() {
    let seconds = std::env::var("DPLOYR_STRESS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed = std::env::var("DPLOYR_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let db = dployr_testkit::database();
    let config = StressConfig { duration: Duration::from_secs(seconds), seed, ..StressConfig::default() };
    let report = stress::run(db.url(), config);
    println!("{report}");
    assert!(report.is_clean(), "{report}");
    // The run did what it says: every operation succeeded (a call that found
    // nothing to act on counts as `skipped`, not `ok`), and the checker looked.
    let operations = [
        "users.upsert",
        "users.update",
        "users.delete",
        "clusters.create_for_owner",
        "clusters.create_for_owner (4 at once)",
        "clusters.update (roles)",
        "clusters.update (metadata)",
        "clusters.delete",
        "clusters.install_github_integration",
        "clusters.transfer_ownership",
        "clusters.add_users",
        "clusters.remove_users",
        "clusters.accept_invite",
        "clusters.decline_invite",
        "instances.create",
        "instances.update_metadata",
        "instances.delete",
        "bootstrap_tokens.create",
        "bootstrap_tokens.mark_used",
        "bootstrap_tokens.mark_used (8 at once)",
        "bootstrap_tokens.is_used",
        "users.get",
        "users.get_by_email",
        "clusters.get",
        "clusters.members",
        "clusters.invites",
        "clusters.pending_invites",
        "clusters.owned_cluster",
        "clusters.user_clusters",
        "clusters.role_of",
        "clusters.owner",
        "clusters.users_with_role",
        "clusters.can_read",
        "clusters.can_write",
        "clusters.is_admin",
        "clusters.is_owner",
        "clusters.integrations",
        "instances.get",
        "instances.get_by_tag",
        "instances.list_by_cluster",
        "kv.create_session",
        "kv.get_session",
        "kv.delete_session",
        "kv.delete_user_sessions",
        "kv.create_state",
        "kv.validate_state",
        "kv.create_otp",
        "kv.validate_otp",
        "kv.validate_otp (8 wrong guesses at once)",
        "users.upsert (a blank picture)",
        "data.delete_user",
        "data.remove_users",
        "data.remove_users (a signed-in invitee)",
        "data.health",
        "data.health (2 at once)",
    ];
    for operation in operations {
        let ok = report.outcomes.get(operation).and_then(|o| o.get("ok")).copied().unwrap_or(0);
        assert!(ok > 0, "{operation} never succeeded\n{report}");
    }
    // And the list is whole: an operation the workload runs but the list
    // forgot would never be required to succeed.
    for operation in report.outcomes.keys() {
        assert!(operations.contains(operation), "{operation} is missing from the list above\n{report}");
    }
    assert!(report.samples > 100, "{report}");
}

/// The same mix while the checker ends every worker's connection every
/// 300 ms, as a server restart ends its sessions: calls that lose their
/// connection mid-statement or mid-transaction fail as `Unavailable`, never
/// as `Backend` or a panic; nothing is left half done (every invariant
/// holds in every sample); and the pool serves again on new connections.
#[test]
fn a_random_mix_whose_connections_are_ended_under_it_keeps_every_invariant() {
    let seed = std::env::var("DPLOYR_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let db = dployr_testkit::database();
    let config = StressConfig {
        duration: Duration::from_secs(6),
        seed,
        disturb: Some((Duration::from_millis(300), Disturbance::EndSessions)),
        ..StressConfig::default()
    };
    let report = stress::run(db.url(), config);
    println!("{report}");
    assert!(report.is_clean(), "{report}");
    // A terminated session fails the call on it, or, if it was idle, is
    // found ended and discarded before the next: either way it is
    // discarded (a guard that counted failed calls alone missed runs where
    // every terminated session was idle).
    assert!(report.connections_discarded > 0, "no connection was discarded: the terminations missed\n{report}");
    // The checker's failed samples are retried, not counted: it must have
    // looked between the terminations, not only after the run.
    assert!(report.samples > 20, "the checker hardly sampled\n{report}");
    // A connection whose session ended fails one call and is discarded.
    let most = report.disturbances * report.connections;
    assert!(report.count_of("Unavailable") <= most, "more than one failure per ended connection\n{report}");
    for operation in
        ["users.upsert", "clusters.add_users", "clusters.transfer_ownership", "clusters.get", "instances.create"]
    {
        let ok = report.outcomes.get(operation).and_then(|o| o.get("ok")).copied().unwrap_or(0);
        assert!(ok > 0, "{operation} never succeeded between the terminations\n{report}");
    }
}

/// The same mix while its server is restarted under it every 2 s, by turns
/// with a fast shutdown (sessions ended, open transactions rolled back) and
/// an immediate one (every process killed at once, then crash recovery at
/// the next start), refusing connections for 200 ms each time. Calls fail
/// as `Unavailable` only, no invariant breaks in any sample, a token marked
/// used stays used across the crashes, and the pool serves again after the
/// last restart. The server is a private one: the shared test server is
/// never restarted.
#[test]
fn a_random_mix_keeps_every_invariant_across_restarts_of_its_server() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no local PostgreSQL server binaries to start a private server with");
        return;
    };
    let server = Arc::new(server);
    let seed = std::env::var("DPLOYR_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let restart = {
        let server = Arc::clone(&server);
        Disturbance::Run(Arc::new(move |round| {
            let shutdown = if round % 2 == 0 { Shutdown::Fast } else { Shutdown::Immediate };
            server.restart(shutdown, Duration::from_millis(200)).expect("the server starts again");
        }))
    };
    let config = StressConfig {
        duration: Duration::from_secs(9),
        seed,
        disturb: Some((Duration::from_secs(2), restart)),
        ..StressConfig::default()
    };
    let report = stress::run(server.url(), config);
    println!("{report}");
    assert!(report.is_clean(), "{report}");
    // Both shutdowns, fast then immediate, at least once.
    assert!(report.disturbances >= 2, "fewer restarts than planned\n{report}");
    // A restart ends every session: a call on one fails, and an idle one
    // is found ended and discarded before its next call (so a run may see
    // no failed call at all, as one did on a loaded machine).
    assert!(report.connections_discarded > 0, "no connection was discarded: the restarts missed\n{report}");
    assert!(report.ok_after_last_disturbance > 100, "the pool did not serve again after the last restart\n{report}");
    assert!(report.samples > 20, "the checker hardly sampled between the restarts\n{report}");
    // Each restart ends every connection of the pool: each fails one call
    // (or none, if idle until it was discarded) and is discarded; no call
    // waiting out the 200 ms of refusals times out.
    let most = report.disturbances * report.connections;
    assert!(report.count_of("Unavailable") <= most, "more than one failure per connection a restart ended\n{report}");
}

/// The checker sees a state the schema refuses, forced by a superuser with
/// its triggers off: a token holding the nonce of a used token that was
/// deleted (`mark_used` would be true twice for that nonce).
#[test]
fn the_checker_reports_a_token_holding_a_spent_nonce() {
    use diesel::connection::SimpleConnection as _;

    let db = dployr_testkit::database();
    if !db.superuser() {
        eprintln!("skipped: turning triggers off needs a superuser");
        return;
    }
    let mut conn = db.connect();
    assert_eq!(stress::broken_invariants(&mut conn), Vec::<String>::new());
    conn.batch_execute(
        "INSERT INTO users (id, email, name, provider) VALUES ('01J00000000000000000000000', 'ada@example.io', 'Ada', 'email');
         INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000001', 'ada');
         INSERT INTO user_clusters (user_id, cluster_id, role)
              VALUES ('01J00000000000000000000000', '01J00000000000000000000001', 'owner');
         INSERT INTO instances (id, cluster_id, address, tag)
              VALUES ('01J00000000000000000000002', '01J00000000000000000000001', '10.0.0.1', 'web-1');
         INSERT INTO spent_nonces (nonce, used_at) VALUES ('spent-nonce', now());
         SET session_replication_role = replica;
         INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('spent-nonce', '01J00000000000000000000002');
         SET session_replication_role = origin;",
    )
    .unwrap();
    let broken = stress::broken_invariants(&mut conn);
    assert_eq!(broken, ["1 bootstrap tokens hold the nonce of a used token that was deleted (usable twice)"]);
}
