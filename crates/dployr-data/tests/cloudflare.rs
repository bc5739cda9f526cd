//! The data layer with `DPLOYR_KV=cloudflare`: it opens, serves a session
//! and drops inside tokio runtimes (what `#[tokio::main]` and
//! `#[tokio::test]` build), reads its base URL from the environment, and
//! keeps one-time records on a consistent backend unless told otherwise.

#![cfg(test)]
#![cfg(feature = "cloudflare")]

use std::collections::HashMap;
use std::time::Duration;

use dployr_data::kv::RetryPolicy;
use dployr_data::{
    CloudflareConfig, Config, DataLayer, Email, KvBackendConfig, NewUser, OneTimeKvConfig, Provider, SessionId,
    StoreError, UserStore,
};
use dployr_testkit::{CloudflareEmulator, TestDatabase};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| map.get(name).cloned()
}

const CLOUDFLARE: [(&str, &str); 5] = [
    ("DATABASE_URL", "postgres://db/app"),
    ("DPLOYR_KV", "cloudflare"),
    ("CLOUDFLARE_ACCOUNT_ID", "acc"),
    ("CLOUDFLARE_KV_NAMESPACE_ID", "ns"),
    ("CLOUDFLARE_API_TOKEN", "tok"),
];

fn with(extra: &[(&str, &str)]) -> Result<Config, StoreError> {
    let mut all = CLOUDFLARE.to_vec();
    all.extend_from_slice(extra);
    Config::from_vars(vars(&all))
}

fn cloudflare_config(emulator: &CloudflareEmulator) -> CloudflareConfig {
    CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        retry: RetryPolicy { initial_backoff: Duration::from_millis(10), ..RetryPolicy::default() },
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    }
}

/// Opens the data layer on Cloudflare, creates a user and a session, reads
/// it back, and drops everything: all on the calling (runtime) thread.
fn open_serve_and_drop(db: &TestDatabase, emulator: &CloudflareEmulator) {
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Cloudflare(cloudflare_config(emulator)));
    let data = DataLayer::open(config).unwrap();
    assert_eq!((data.kv_backend(), data.one_time_kv_backend()), ("cloudflare", "postgres"));
    let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io").unwrap(), Provider::Github)).unwrap();
    let id = SessionId::generate();
    data.kv().create_session(&id, &user, vec![]).unwrap();
    assert_eq!(data.kv().get_session(&id).unwrap().map(|s| s.user_id), Some(user.id));
    drop(data);
}

#[tokio::main]
async fn in_tokio_main(db: &TestDatabase, emulator: &CloudflareEmulator) {
    open_serve_and_drop(db, emulator);
    // And from the blocking pool, as a handler would call it.
    let (url, config) = (db.url().to_owned(), cloudflare_config(emulator));
    let served = tokio::task::spawn_blocking(move || {
        let data = DataLayer::open(Config::new(url).with_kv(KvBackendConfig::Cloudflare(config)))?;
        let state = dployr_data::OAuthState::generate();
        data.kv().create_state(&state, "https://app.example/next")?;
        data.kv().validate_state(&state)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(served.as_deref(), Some("https://app.example/next"));
}

#[test]
fn cloudflare_data_layer_opens_serves_and_drops_inside_tokio_main() {
    let (db, emulator) = (dployr_testkit::database(), CloudflareEmulator::start());
    in_tokio_main(&db, &emulator);
}

#[tokio::test(flavor = "current_thread")]
async fn cloudflare_data_layer_opens_serves_and_drops_inside_a_current_thread_tokio_test() {
    let (db, emulator) = (dployr_testkit::database(), CloudflareEmulator::start());
    open_serve_and_drop(&db, &emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_data_layer_opens_serves_and_drops_inside_a_multi_thread_tokio_test() {
    let (db, emulator) = (dployr_testkit::database(), CloudflareEmulator::start());
    open_serve_and_drop(&db, &emulator);
}

#[test]
fn the_cloudflare_base_url_comes_from_the_environment() {
    let config = with(&[("CLOUDFLARE_API_BASE_URL", "https://kv-proxy.internal/client/v4/")]).unwrap();
    let KvBackendConfig::Cloudflare(cloudflare) = &config.kv else { panic!("{config:?}") };
    assert_eq!(cloudflare.base_url, "https://kv-proxy.internal/client/v4");
    let error = with(&[("CLOUDFLARE_API_BASE_URL", "kv-proxy.internal")]).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "CLOUDFLARE_API_BASE_URL", .. }), "{error}");
    let default = with(&[]).unwrap();
    let KvBackendConfig::Cloudflare(cloudflare) = &default.kv else { panic!("{default:?}") };
    assert_eq!(cloudflare.base_url, "https://api.cloudflare.com/client/v4");
}

#[test]
fn one_time_records_default_to_postgres_and_cloudflare_is_an_explicit_opt_in() {
    assert_eq!(with(&[]).unwrap().one_time_kv, OneTimeKvConfig::Default);
    assert_eq!(with(&[("DPLOYR_KV_ONE_TIME", "memory")]).unwrap().one_time_kv, OneTimeKvConfig::Memory);
    assert_eq!(with(&[("DPLOYR_KV_ONE_TIME", "Cloudflare")]).unwrap().one_time_kv, OneTimeKvConfig::Cloudflare);
    assert!(matches!(
        with(&[("DPLOYR_KV_ONE_TIME", "postgres")]).unwrap().one_time_kv,
        OneTimeKvConfig::Postgres { purge_every: Some(_) }
    ));
    let error = with(&[("DPLOYR_KV_ONE_TIME", "redis")]).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_KV_ONE_TIME", .. }), "{error}");
    let not_on_cloudflare =
        Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app"), ("DPLOYR_KV_ONE_TIME", "cloudflare")]));
    assert!(matches!(not_on_cloudflare, Err(StoreError::Configuration { setting: "DPLOYR_KV_ONE_TIME", .. })));
}

#[test]
fn one_time_records_on_cloudflare_are_opted_into_explicitly() {
    let (db, emulator) = (dployr_testkit::database(), CloudflareEmulator::start());
    let config = Config::new(db.url())
        .with_kv(KvBackendConfig::Cloudflare(cloudflare_config(&emulator)))
        .with_one_time_kv(OneTimeKvConfig::Cloudflare);
    let data = DataLayer::open(config).unwrap();
    assert_eq!((data.kv_backend(), data.one_time_kv_backend()), ("cloudflare", "cloudflare"));
    assert!(!data.kv().one_time_backend().limits().atomic);
    let memory = DataLayer::open(
        Config::new(db.url())
            .with_kv(KvBackendConfig::Cloudflare(cloudflare_config(&emulator)))
            .with_one_time_kv(OneTimeKvConfig::Memory),
    )
    .unwrap();
    assert_eq!(memory.one_time_kv_backend(), "memory");
}

/// A TTL under Cloudflare's shortest (60 s) names the backend that refused
/// it and the variable that chose it: the same 30 s passes with one-time
/// records on PostgreSQL, which the operator could not tell from "below
/// this backend's minimum" alone.
#[test]
fn a_ttl_cloudflare_refuses_names_the_backend_and_the_variable_that_chose_it() {
    let (db, emulator) = (dployr_testkit::database(), CloudflareEmulator::start());
    let mut config = Config::new(db.url())
        .with_kv(KvBackendConfig::Cloudflare(cloudflare_config(&emulator)))
        .with_one_time_kv(OneTimeKvConfig::Cloudflare);
    config.kv_store.state_ttl = Duration::from_secs(30);
    match DataLayer::open(config.clone()) {
        Err(StoreError::Configuration { setting, reason }) => {
            assert_eq!(setting, "DPLOYR_STATE_TTL_SECS");
            assert!(reason.contains("the backend chosen by DPLOYR_KV_ONE_TIME: cloudflare"), "{reason}");
        }
        other => panic!("a 30 s state TTL on Cloudflare: {:?}", other.map(|_| ())),
    }
    assert!(DataLayer::open(config.with_one_time_kv(OneTimeKvConfig::Postgres { purge_every: None })).is_ok());
}
