//! `cargo xtask demo [--kv memory|postgres|cloudflare-emulator]`: the seed
//! README's usage story, end to end, printing what each step returns. It
//! runs on a throwaway PostgreSQL that it starts and stops itself, or, with
//! `DATABASE_URL` set, on that database (its rows stay there; the demo's
//! instance tag and nonce carry a random suffix so it can run again).
//! Without `DATABASE_URL`, the test kit picks the server as it does for the
//! tests: `DPLOYR_TEST_DATABASE_URL`'s server, where the demo's empty
//! database is dropped at the end, comes before a throwaway one.

use std::time::Instant;

use dployr_data::{
    BootstrapTokenStore, CloudflareConfig, ClusterStore, Config, DataLayer, Email, InstanceStore, KvBackendConfig,
    Metadata, NewInstance, NewUser, OAuthState, OtpCode, Page, Provider, SessionId, UserStore,
};
use dployr_migrate::{MigrationRunner, MigrationSet};
use dployr_testkit::ServerKind;
use dployr_testkit::cloudflare_emulator::CloudflareEmulator;

use crate::Failure;

fn step(title: &str) {
    println!("\n== {title}");
}

/// `answer`, if it is what the seed's story says it must be; otherwise the
/// demo fails (CI runs it: a single-use rule that broke must not print its
/// way through).
fn holds<T: std::fmt::Debug>(what: &str, answer: T, rule: impl FnOnce(&T) -> bool) -> Result<T, Failure> {
    if rule(&answer) {
        Ok(answer)
    } else {
        Err(format!("{what} answered {answer:?}, which the story does not allow").into())
    }
}

/// Which key-value backend the demo uses.
#[derive(Clone, Copy)]
pub enum DemoKv {
    Memory,
    Postgres,
    CloudflareEmulator,
}

impl DemoKv {
    pub fn parse(word: &str) -> Result<Self, Failure> {
        match word {
            "memory" => Ok(Self::Memory),
            "postgres" => Ok(Self::Postgres),
            "cloudflare-emulator" => Ok(Self::CloudflareEmulator),
            other => Err(format!("--kv {other}: use memory, postgres or cloudflare-emulator").into()),
        }
    }
}

pub fn run(kv: DemoKv) -> Result<(), Failure> {
    step("PostgreSQL");
    // Kept until the end: dropping them deletes the throwaway database.
    let (database_url, throwaway, suffix) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            println!("   DATABASE_URL is set: using that database");
            (url, None, format!("-{:04x}", rand::random::<u16>()))
        }
        _ => {
            let started = Instant::now();
            let server = dployr_testkit::server()?;
            let db = dployr_testkit::try_empty_database()?;
            let ready_in = started.elapsed().as_millis();
            // The test kit's order: a server the user named comes first, and
            // it is neither started nor deleted here.
            if server.kind() == ServerKind::External {
                println!(
                    "   DPLOYR_TEST_DATABASE_URL is set: empty database {} on that server, ready in {ready_in} ms",
                    db.name()
                );
            } else {
                println!(
                    "   a throwaway {:?} server, ready in {ready_in} ms; empty database {}",
                    server.kind(),
                    db.name()
                );
            }
            (db.url().to_owned(), Some((db, server.kind())), String::new())
        }
    };

    step("migrations (each file whole, in one transaction with its record, under an advisory lock)");
    let runner = MigrationRunner::new(database_url.clone(), MigrationSet::embedded()?);
    let applied = runner.run_pending(&mut |event| println!("   {event}"))?;
    println!("   {} applied", applied.len());

    step("open the data layer");
    let (kv_config, _emulator) = match kv {
        DemoKv::Memory => (KvBackendConfig::Memory, None),
        DemoKv::Postgres => (KvBackendConfig::Postgres { purge_every: None }, None),
        DemoKv::CloudflareEmulator => {
            let emulator = CloudflareEmulator::start();
            // As Workers KV documents it, not kinder: reads up to 60 s
            // stale (every read of this run sees the namespace empty), one
            // write per second per key, 1200 requests per 5 minutes.
            emulator.set_stale_reads(std::time::Duration::from_secs(60));
            emulator.limit_writes_per_key(true);
            emulator.set_request_budget(Some((1200, std::time::Duration::from_secs(300))));
            let config = CloudflareConfig {
                base_url: emulator.base_url().to_owned(),
                ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
            };
            println!("   Cloudflare KV emulator on {}", emulator.base_url());
            (KvBackendConfig::Cloudflare(config), Some(emulator))
        }
    };
    let data = DataLayer::open(Config::new(database_url).with_kv(kv_config))?;
    println!(
        "   key-value backend: {}; migrations applied on open: {}",
        data.kv_backend(),
        data.applied_on_open().len()
    );

    step("a user signs in with GitHub");
    let metadata = Metadata::try_from(serde_json::json!({"gitHub": {"loginId": "1234"}}))?;
    let ada = data.users().upsert(NewUser {
        metadata: Some(metadata),
        ..NewUser::new(Email::parse("Ada@Example.io")?, Provider::Github)
    })?;
    println!(
        "   users.upsert -> {} <{}> named {:?}, provider {}, metadata {}",
        ada.id,
        ada.email,
        ada.name,
        ada.provider,
        ada.metadata.to_value()
    );

    step("their cluster");
    let cluster = data.clusters().create_for_owner(&ada.id)?;
    let owner = cluster.owner().map_or("-", |m| m.email.as_str());
    println!("   clusters.create_for_owner -> {} named {:?}, owner {owner}", cluster.id, cluster.name);

    step("invite two people; one accepts");
    let invited = data.clusters().add_users(
        &cluster.id,
        &[Email::parse(&format!("bob{suffix}@example.io"))?, Email::parse(&format!("cy{suffix}@example.io"))?],
    )?;
    for member in &invited {
        println!("   clusters.add_users -> {} ({})", member.email, member.role);
    }
    let Some(bob) = invited.first() else {
        return Err("add_users returned no member".into());
    };
    let pending = data.clusters().pending_invites(&bob.user_id)?;
    println!("   clusters.pending_invites(bob) -> {:?}", pending.iter().map(|p| &p.cluster_name).collect::<Vec<_>>());
    data.clusters().accept_invite(&bob.user_id, &cluster.id)?;
    println!(
        "   clusters.accept_invite(bob) -> ok; bob is now {:?}",
        data.clusters().role_of(&bob.user_id, &cluster.id)?
    );
    let members = data.clusters().members(&cluster.id, &Page::first(20))?;
    let invites = data.clusters().invites(&cluster.id, &Page::first(20))?;
    let list = |items: &[dployr_data::Member]| {
        items.iter().map(|m| format!("{} ({})", m.email, m.role)).collect::<Vec<_>>().join(", ")
    };
    println!("   clusters.members -> {} of {}: {}", members.items.len(), members.total, list(&members.items));
    println!("   clusters.invites -> {} of {}: {}", invites.items.len(), invites.total, list(&invites.items));

    step("register an instance and use its bootstrap token once");
    let instance = data.instances().create(
        &cluster.id,
        NewInstance {
            address: format!("10.0.0.7{suffix}").try_into()?,
            tag: format!("web-1{suffix}").try_into()?,
            metadata: None,
        },
    )?;
    println!("   instances.create -> {} tag {} at {}", instance.id, instance.tag, instance.address);
    let nonce: dployr_data::Nonce = format!("nonce-7f3a{suffix}").try_into()?;
    data.bootstrap_tokens().create(&instance.id, &nonce)?;
    let unused = holds("is_used of a new token", data.bootstrap_tokens().is_used(&nonce)?, |used| !used)?;
    println!("   bootstrap_tokens.create -> issued; is_used: {unused}");
    let first = holds("the first mark_used", data.bootstrap_tokens().mark_used(&nonce)?, |used| *used)?;
    println!("   bootstrap_tokens.mark_used -> {first} (first use)");
    let second = holds("the second mark_used", data.bootstrap_tokens().mark_used(&nonce)?, |used| !used)?;
    println!("   bootstrap_tokens.mark_used -> {second} (second use refused)");

    step("a session");
    let session_id = SessionId::generate();
    let session = data.kv().create_session(&session_id, &ada, data.clusters().user_clusters(&ada.id)?)?;
    println!(
        "   kv.create_session({session_id:?}) -> for {}, {} cluster(s), expires {}",
        session.email,
        session.clusters.len(),
        session.expires_at
    );
    let read = holds("get_session of a new session", data.kv().get_session(&session_id)?, Option::is_some)?;
    println!(
        "   kv.get_session -> {}",
        read.map_or("none".to_owned(), |s| format!(
            "{} with clusters {:?}",
            s.email,
            s.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
        ))
    );

    step("an OAuth state, validated twice");
    let state = OAuthState::generate();
    data.kv().create_state(&state, "https://app.example/clusters")?;
    println!("   kv.create_state({state:?}) -> ok");
    let first = holds("the first validate_state", data.kv().validate_state(&state)?, Option::is_some)?;
    println!("   kv.validate_state -> {first:?}");
    let again = holds("the second validate_state", data.kv().validate_state(&state)?, Option::is_none)?;
    println!("   kv.validate_state again -> {again:?} (single use)");

    step("a one-time code: a wrong guess, then the right one");
    let code = data.kv().create_otp(&ada.email)?;
    println!("   kv.create_otp -> {code:?} ({} characters, sent by e-mail in real life)", code.expose().len());
    let wrong = data.kv().validate_otp(&ada.email, &OtpCode::new("WRONG1"))?;
    println!("   kv.validate_otp(WRONG1) -> {}", holds("a wrong code", wrong, |ok| !ok)?);
    let right = data.kv().validate_otp(&ada.email, &OtpCode::new(code.expose().to_lowercase()))?;
    println!("   kv.validate_otp(the code, lower-cased) -> {}", holds("the right code", right, |ok| *ok)?);
    let again = data.kv().validate_otp(&ada.email, &code)?;
    println!("   kv.validate_otp(the code again) -> {} (consumed)", holds("a used code", again, |ok| !ok)?);

    step("signing out");
    data.kv().delete_session(&session_id)?;
    let gone = holds("get_session after delete_session", data.kv().get_session(&session_id)?, Option::is_none)?;
    println!("   kv.delete_session -> ok; kv.get_session -> {gone:?}");

    step("done");
    let stats = data.pool().stats();
    println!("   {} statements in {} transactions", stats.statements, stats.transactions);
    drop(data);
    match throwaway {
        None => {}
        Some((db, ServerKind::External)) => {
            println!(
                "   database {} is dropped now; the server keeps its migrated template (`cargo xtask db clean` drops it)",
                db.name()
            );
        }
        Some(_) => println!("   the throwaway server stops and its directory is deleted as this command exits"),
    }
    Ok(())
}
