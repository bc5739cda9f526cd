//! The README's usage: open the data layer, sign a user in, give them a
//! cluster, invite someone, and start a session.
//!
//! ```sh
//! cargo run -p dployr-data --example quickstart                          # a throwaway PostgreSQL
//! DATABASE_URL=postgres://localhost/dployr-local cargo run -p dployr-data --example quickstart
//! DATABASE_URL=... DPLOYR_KV=memory cargo run -p dployr-data --example quickstart  # any variable of the README
//! ```

use dployr_data::{
    ClusterStore, Config, DataLayer, Email, KvBackendConfig, NewUser, Page, Provider, SessionId, StoreError, UserStore,
};

#[expect(clippy::print_stdout, reason = "an example shows its result")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // With DATABASE_URL set, the whole configuration comes from the
    // environment, as a service reads it (DPLOYR_KV, pool and timeouts, ...);
    // without it, a throwaway server (deleted on exit) and the memory backend.
    let (config, _throwaway) = match std::env::var("DATABASE_URL") {
        Ok(_) => (Config::from_env()?, None),
        Err(_) => {
            let db = dployr_testkit::try_empty_database()?;
            (Config::new(db.url()).with_kv(KvBackendConfig::Memory), Some(db))
        }
    };
    let data = DataLayer::open(config)?;

    let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io")?, Provider::Github))?;
    let cluster = data.clusters().create_for_owner(&user.id)?;
    data.clusters().add_users(&cluster.id, &[Email::parse("bob@example.io")?])?;

    let session_id = SessionId::generate();
    data.kv().create_session(&session_id, &user, data.clusters().user_clusters(&user.id)?)?;
    let session = data.kv().get_session(&session_id)?.ok_or("the session just created is missing")?;

    let invites = data.clusters().invites(&cluster.id, &Page::first(20))?;
    let report = format!(
        "{} owns cluster {:?}; {} invitation(s) pending; session for {} until {}",
        user.email, cluster.name, invites.total, session.email, session.expires_at
    );
    println!("{report}");

    // Bad input is a typed error, never a panic.
    match Email::parse("not-an-address") {
        Err(StoreError::Invalid { field, reason }) => println!("refused, as it should be: {field} {reason}"),
        other => return Err(format!("a malformed address was not refused: {other:?}").into()),
    }
    Ok(())
}
