//! An async web server calling the synchronous data layer: share the
//! `DataLayer` in an `Arc`, and run each call on tokio's blocking pool with
//! `spawn_blocking`, so a database round trip never stalls the async
//! workers.
//!
//! ```sh
//! cargo run -p dployr-data --example async_handler
//! ```

use std::sync::Arc;

use dployr_data::{
    ClusterId, ClusterStore, Config, DataLayer, Email, KvBackendConfig, NewUser, Provider, UserId, UserStore,
};

/// What an HTTP handler for `GET /clusters/{id}/can-write` would do.
async fn can_write(
    data: Arc<DataLayer>,
    user: UserId,
    cluster: ClusterId,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let allowed = tokio::task::spawn_blocking(move || data.clusters().can_write(&user, &cluster)).await??;
    Ok(allowed)
}

#[expect(clippy::print_stdout, reason = "an example shows its result")]
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (url, _throwaway) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let db = dployr_testkit::try_empty_database()?;
            (db.url().to_owned(), Some(db))
        }
    };
    // Opening (and migrating) is blocking too: do it before the runtime, or in spawn_blocking.
    let data = Arc::new(DataLayer::open(Config::new(url).with_kv(KvBackendConfig::Memory))?);
    let owner = data.users().upsert(NewUser::new(Email::parse("ada@example.io")?, Provider::Google))?;
    let cluster = data.clusters().create_for_owner(&owner.id)?;
    let stranger = data.users().upsert(NewUser::new(Email::parse("eve@example.io")?, Provider::Google))?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (owner_may, stranger_may) = runtime.block_on(async {
        // Many requests at once: each waits on the blocking pool, not on a worker.
        let owner_may = tokio::spawn(can_write(Arc::clone(&data), owner.id, cluster.id));
        let stranger_may = tokio::spawn(can_write(Arc::clone(&data), stranger.id, cluster.id));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((owner_may.await??, stranger_may.await??))
    })?;
    assert!(owner_may && !stranger_may);
    println!("owner may write: {owner_may}; stranger may write: {stranger_may}");
    Ok(())
}
