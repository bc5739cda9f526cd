//! The seed README's usage story, end to end through `DataLayer`, on each
//! key-value backend: a user signs in, gets a cluster, invites two people
//! (one accepts), registers an instance whose bootstrap token works once,
//! and signs in through a session, an OAuth state and a one-time code.

#![cfg(test)]

use dployr_data::{
    BootstrapTokenStore, CloudflareConfig, ClusterStore, Config, DataLayer, Email, InstanceStore, KvBackendConfig,
    Metadata, NewInstance, NewUser, OAuthState, OtpCode, Page, Provider, Role, SessionId, UserStore,
};
use dployr_testkit::cloudflare_emulator::CloudflareEmulator;
use serde_json::json;

fn email(address: &str) -> Email {
    Email::parse(address).unwrap()
}

fn story(data: &DataLayer) {
    // Sign-in creates the user, named after the e-mail when no name is given.
    let metadata = Metadata::try_from(json!({"gitHub": {"loginId": "1234"}})).unwrap();
    let ada = data
        .users()
        .upsert(NewUser { metadata: Some(metadata), ..NewUser::new(email("Ada@Example.io"), Provider::Github) })
        .unwrap();
    assert_eq!((ada.email.as_str(), ada.name.as_str()), ("ada@example.io", "ada"));

    // Their cluster, owned by them.
    let cluster = data.clusters().create_for_owner(&ada.id).unwrap();
    assert_eq!(cluster.owner().unwrap().user_id, ada.id);

    // Two invitations; one is accepted.
    let invited = data.clusters().add_users(&cluster.id, &[email("bob@example.io"), email("cy@example.io")]).unwrap();
    assert_eq!(invited.iter().map(|m| m.role).collect::<Vec<_>>(), [Role::Invited, Role::Invited]);
    let bob = &invited[0];
    assert_eq!(data.clusters().pending_invites(&bob.user_id).unwrap()[0].cluster_id, cluster.id);
    data.clusters().accept_invite(&bob.user_id, &cluster.id).unwrap();
    assert_eq!(data.clusters().role_of(&bob.user_id, &cluster.id).unwrap(), Some(Role::Viewer));
    let members = data.clusters().members(&cluster.id, &Page::first(20)).unwrap();
    assert_eq!(
        members.items.iter().map(|m| m.email.as_str()).collect::<Vec<_>>(),
        ["ada@example.io", "bob@example.io"]
    );
    assert_eq!(data.clusters().invites(&cluster.id, &Page::first(20)).unwrap().total, 1);

    // An instance and its bootstrap token, used once.
    let instance = data
        .instances()
        .create(
            &cluster.id,
            NewInstance { address: "10.0.0.7".try_into().unwrap(), tag: "web-1".try_into().unwrap(), metadata: None },
        )
        .unwrap();
    data.bootstrap_tokens().create(&instance.id, &"nonce-7f3a".try_into().unwrap()).unwrap();
    assert!(!data.bootstrap_tokens().is_used(&"nonce-7f3a".try_into().unwrap()).unwrap());
    assert!(data.bootstrap_tokens().mark_used(&"nonce-7f3a".try_into().unwrap()).unwrap());
    assert!(!data.bootstrap_tokens().mark_used(&"nonce-7f3a".try_into().unwrap()).unwrap());

    // A session, read back with the clusters it carries.
    let session_id = SessionId::generate();
    let clusters = data.clusters().user_clusters(&ada.id).unwrap();
    let session = data.kv().create_session(&session_id, &ada, clusters).unwrap();
    assert_eq!(data.kv().get_session(&session_id).unwrap(), Some(session));
    data.kv().delete_session(&session_id).unwrap();
    assert_eq!(data.kv().get_session(&session_id).unwrap(), None);

    // An OAuth state validates once.
    let state = OAuthState::generate();
    data.kv().create_state(&state, "https://app.example/clusters").unwrap();
    assert_eq!(data.kv().validate_state(&state).unwrap().as_deref(), Some("https://app.example/clusters"));
    assert_eq!(data.kv().validate_state(&state).unwrap(), None);

    // A one-time code: a wrong guess fails, the right one (any case) works once.
    let code = data.kv().create_otp(&ada.email).unwrap();
    assert!(!data.kv().validate_otp(&ada.email, &OtpCode::new("WRONG1")).unwrap());
    assert!(data.kv().validate_otp(&ada.email, &OtpCode::new(code.expose().to_lowercase())).unwrap());
    assert!(!data.kv().validate_otp(&ada.email, &code).unwrap());
}

#[test]
fn the_seed_story_on_the_memory_backend() {
    let db = dployr_testkit::empty_database();
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
    // Every migration the binary embeds, in order (never a list written here,
    // which the next migration would make wrong).
    let embedded: Vec<String> =
        dployr_migrate::MigrationSet::embedded().unwrap().iter().map(|m| m.name().to_owned()).collect();
    assert_eq!(data.applied_on_open(), embedded);
    story(&data);
}

#[test]
fn the_seed_story_on_the_postgres_backend() {
    let db = dployr_testkit::empty_database();
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Postgres { purge_every: None })).unwrap();
    story(&data);
}

#[test]
fn the_seed_story_on_the_cloudflare_backend_through_the_emulator() {
    let db = dployr_testkit::empty_database();
    let emulator = CloudflareEmulator::start();
    let cloudflare = CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    };
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Cloudflare(cloudflare))).unwrap();
    story(&data);
    assert!(emulator.requests() > 0);
}
