//! The seed README's usage story as a load: one run signs a user in, gives
//! them a cluster, invites two people (one accepts), registers an instance
//! whose bootstrap token works once, and signs in through a session, an
//! OAuth state and a one-time code, checking each answer.
//!
//! Unlike `tests/tests/seed_story.rs`, which asserts, a run here returns
//! what went wrong, told apart: an **error** (a store call failed) or a
//! **rule violation** (a call answered, wrongly: a state validated twice, a
//! right code accepted after the attempt limit, a token used twice, a
//! wrong member list). Many runs share one database, so each run's names
//! carry a `unique` part. `cargo xtask pgbouncer` runs it from many threads
//! and processes behind PgBouncer in transaction mode, where a prepared
//! statement reaching the wrong client gives exactly such wrong answers.

use dployr_data::{
    Address, BootstrapTokenStore as _, ClusterStore as _, DataLayer, Email, InstanceStore as _, NewInstance, NewUser,
    Nonce, OAuthState, OtpCode, Page, Provider, Role, SessionId, StoreError, Tag, UserStore as _,
};

/// What went wrong in one run.
#[derive(Debug)]
pub enum Failure {
    /// A store call failed.
    Error(String),
    /// A call answered against a rule of the story.
    Violation(String),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self::Error(error.to_string())
    }
}

fn check(holds: bool, rule: impl FnOnce() -> String) -> Result<(), Failure> {
    if holds { Ok(()) } else { Err(Failure::Violation(rule())) }
}

fn email(address: &str) -> Result<Email, Failure> {
    Email::parse(address).map_err(Failure::from)
}

/// One run of the story; `unique` makes its users, tag, address and nonce
/// its own. `otp_max_attempts` is the store's attempt limit.
///
/// # Errors
/// The first error or rule violation.
pub fn run(data: &DataLayer, unique: &str, otp_max_attempts: u32) -> Result<(), Failure> {
    let ada_email = email(&format!("ada-{unique}@example.io"))?;
    let ada = data.users().upsert(NewUser::new(ada_email.clone(), Provider::Github))?;
    check(ada.email == ada_email, || format!("signed in as {} instead of {ada_email}", ada.email))?;

    let cluster = data.clusters().create_for_owner(&ada.id)?;
    check(cluster.owner().is_some_and(|owner| owner.user_id == ada.id), || {
        "the new cluster's owner is not its creator".into()
    })?;

    let bob_email = email(&format!("bob-{unique}@example.io"))?;
    let cy_email = email(&format!("cy-{unique}@example.io"))?;
    let invited = data.clusters().add_users(&cluster.id, &[bob_email.clone(), cy_email])?;
    check(invited.len() == 2 && invited.iter().all(|m| m.role == Role::Invited), || {
        format!("invitations answered {invited:?}")
    })?;
    let bob = invited[0].user_id;
    let pending = data.clusters().pending_invites(&bob)?;
    check(pending.len() == 1 && pending[0].cluster_id == cluster.id, || format!("bob's invites: {pending:?}"))?;
    data.clusters().accept_invite(&bob, &cluster.id)?;
    let role = data.clusters().role_of(&bob, &cluster.id)?;
    check(role == Some(Role::Viewer), || format!("bob's role after accepting: {role:?}"))?;
    let members = data.clusters().members(&cluster.id, &Page::first(20))?;
    let emails: Vec<&str> = members.items.iter().map(|m| m.email.as_str()).collect();
    check(emails == [ada_email.as_str(), bob_email.as_str()], || format!("members: {emails:?}"))?;

    let instance = data.instances().create(
        &cluster.id,
        NewInstance {
            address: Address::parse(&format!("host-{unique}.internal"))?,
            tag: Tag::parse(&format!("web-{unique}"))?,
            metadata: None,
        },
    )?;
    let nonce = Nonce::parse(&format!("nonce-{unique}"))?;
    data.bootstrap_tokens().create(&instance.id, &nonce)?;
    check(!data.bootstrap_tokens().is_used(&nonce)?, || "a new token is used already".into())?;
    check(data.bootstrap_tokens().mark_used(&nonce)?, || "a new token could not be used".into())?;
    check(!data.bootstrap_tokens().mark_used(&nonce)?, || "a bootstrap token was used twice".into())?;

    let session_id = SessionId::generate();
    let clusters = data.clusters().user_clusters(&ada.id)?;
    let session = data.kv().create_session(&session_id, &ada, clusters)?;
    check(data.kv().get_session(&session_id)? == Some(session), || "the session read back differs".into())?;
    data.kv().delete_session(&session_id)?;
    check(data.kv().get_session(&session_id)?.is_none(), || "a deleted session was returned".into())?;

    // Single use: an OAuth state validates once.
    let state = OAuthState::generate();
    data.kv().create_state(&state, "https://app.example/clusters")?;
    let first = data.kv().validate_state(&state)?;
    check(first.as_deref() == Some("https://app.example/clusters"), || format!("state validated to {first:?}"))?;
    check(data.kv().validate_state(&state)?.is_none(), || "an OAuth state validated twice".into())?;

    // Attempt limit: after the allowed wrong guesses, even the right code fails.
    let code = data.kv().create_otp(&ada.email)?;
    for guess in 0..otp_max_attempts {
        check(!data.kv().validate_otp(&ada.email, &OtpCode::new(format!("WRONG{guess}")))?, || {
            "a wrong code was accepted".into()
        })?;
    }
    check(!data.kv().validate_otp(&ada.email, &code)?, || {
        format!("the right code was accepted after {otp_max_attempts} wrong guesses")
    })?;
    // Single use: a new code works once.
    let code = data.kv().create_otp(&ada.email)?;
    check(data.kv().validate_otp(&ada.email, &code)?, || "a new right code was refused".into())?;
    check(!data.kv().validate_otp(&ada.email, &code)?, || "a one-time code worked twice".into())?;
    Ok(())
}
