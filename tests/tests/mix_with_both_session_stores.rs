//! A random mix of EVERY data-layer operation, including what the
//! stress mix (`tests/src/stress.rs`) leaves out: the tower-sessions store
//! (`create`, `load`, `save`, `delete`, `delete_user_sessions`) on the same
//! PostgreSQL key-value table, beside `KvStore` sessions, sign-out
//! everywhere, `DataLayer::delete_user` / `remove_users`, ownership
//! transfers, tokens, OAuth states and one-time codes, on a handful of
//! shared ids so the calls collide. Checked: the schema invariants
//! (`stress::broken_invariants`), single use of nonces, states and codes, no
//! session that a sign-out ended loads in a read begun after it returned
//! (both session stores), no save resurrects an ended tower session, and
//! after a quiet sign-out of everyone, no session row remains live.
//!
//! `DPLOYR_MIX_SECONDS` (default 10) and `DPLOYR_MIX_THREADS` (default 12).

#![cfg(test)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use dployr_data::{Config, DataLayer, KvBackendConfig};
use dployr_domain::{
    BootstrapTokenStore, ClusterId, ClusterPatch, ClusterStore, Email, GitHubIntegration, InstanceId, InstanceStore,
    Metadata, NewInstance, NewUser, Nonce, Provider, Role, StoreError, UserId, UserPatch, UserStore,
};
use dployr_kv::{OAuthState, OtpCode, PgKv, SessionId};
use dployr_pg::PoolConfig;
use dployr_tower_sessions::KvSessionStore;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tower_sessions_core::SessionStore as _;
use tower_sessions_core::session::{Id, Record};

#[derive(Clone)]
struct KvSess {
    id: SessionId,
    user: UserId,
    created: u64,
    ended: Option<(u64, &'static str)>,
}

#[derive(Clone)]
struct TsSess {
    id: Id,
    user: String,
    created: u64,
    ended: Option<(u64, &'static str)>,
}

struct World {
    data: DataLayer,
    ts: KvSessionStore,
    rt: tokio::runtime::Runtime,
    emails: Vec<Email>,
    users: Mutex<Vec<UserId>>,
    clusters: Mutex<Vec<ClusterId>>,
    instances: Mutex<Vec<InstanceId>>,
    invitations: Mutex<Vec<(UserId, ClusterId)>>,
    nonces: Mutex<Vec<String>>,
    next: AtomicU64,
    used: Mutex<HashMap<String, (u64, u64)>>, // nonce -> (times true, first tick)
    ticks: AtomicU64,
    kv_sessions: Mutex<Vec<KvSess>>,
    ts_sessions: Mutex<Vec<TsSess>>,
    states: Mutex<Vec<OAuthState>>,
    states_taken: Mutex<HashMap<String, u64>>,
    codes: Mutex<Vec<(Email, OtpCode, u64, u64)>>,
    codes_taken: Mutex<HashMap<(String, String), u64>>,
    outcomes: Mutex<BTreeMap<&'static str, BTreeMap<&'static str, u64>>>,
    violations: Mutex<Vec<String>>,
    unexpected: Mutex<Vec<String>>,
    ever: Mutex<HashSet<String>>,
    /// Users a call that signs no one out may have deleted.
    quietly_deleted: Mutex<HashSet<UserId>>,
    /// Calls that may delete a user: (op, user, start tick, end tick).
    deleters: Mutex<Vec<(&'static str, UserId, u64, u64)>>,
}

fn pick<T: Clone>(rng: &mut StdRng, items: &Mutex<Vec<T>>) -> Option<T> {
    items.lock().unwrap().choose(rng).cloned()
}

fn remember<T>(items: &Mutex<Vec<T>>, item: T, cap: usize) {
    let mut items = items.lock().unwrap();
    if items.len() >= cap {
        items.remove(0);
    }
    items.push(item);
}

fn kind_of(error: &StoreError) -> &'static str {
    match error {
        StoreError::NotFound { .. } => "NotFound",
        StoreError::Conflict { .. } => "Conflict",
        StoreError::Invalid { .. } => "Invalid",
        StoreError::Unavailable { .. } => "Unavailable",
        _ => "Backend",
    }
}

/// Whether `record` is there and names `user`.
fn names(record: Option<&Record>, user: &str) -> bool {
    record.is_some_and(|r| r.data.get("user_id").and_then(|v| v.as_str()) == Some(user))
}

type Ts<T> = tower_sessions_core::session_store::Result<T>;

#[expect(clippy::needless_pass_by_value, reason = "the shape `map_err` takes")]
fn ts_err(e: tower_sessions_core::session_store::Error) -> StoreError {
    StoreError::backend("tower-sessions", e.to_string())
}

impl World {
    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::SeqCst)
    }

    fn begin_delete(&self, op: &'static str, users: &[UserId], st: u64) {
        let mut d = self.deleters.lock().unwrap();
        for u in users {
            d.push((op, *u, st, u64::MAX));
        }
    }

    fn end_delete(&self, op: &'static str, users: &[UserId], st: u64, t: u64) {
        let mut d = self.deleters.lock().unwrap();
        for e in d.iter_mut().filter(|e| e.0 == op && users.contains(&e.1) && e.2 == st) {
            e.3 = t;
        }
    }

    /// Whether a call other than the one begun at `own` that may delete
    /// `user` ran (or runs) at some point after `since`.
    fn another_deleter(&self, user: &UserId, own: u64, since: u64) -> bool {
        self.deleters.lock().unwrap().iter().any(|e| e.1 == *user && e.2 != own && e.3 > since)
    }

    fn violation(&self, what: String) {
        let mut v = self.violations.lock().unwrap();
        if v.len() < 40 {
            v.push(what);
        }
    }

    fn expect(&self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.violation(what());
        }
    }

    fn call(&self, op: &'static str, work: impl FnOnce() -> Result<(), StoreError>) {
        let kind = match catch_unwind(AssertUnwindSafe(work)) {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                let kind = kind_of(&e);
                if matches!(kind, "Backend" | "Invalid" | "Unavailable") {
                    let mut u = self.unexpected.lock().unwrap();
                    if u.len() < 40 {
                        u.push(format!("{op}: {e:?}"));
                    }
                }
                kind
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                self.unexpected.lock().unwrap().push(format!("{op}: panic {msg}"));
                "panic"
            }
        };
        *self.outcomes.lock().unwrap().entry(op).or_default().entry(kind).or_default() += 1;
    }

    fn ts<T>(&self, f: impl Future<Output = Ts<T>>) -> Result<T, StoreError> {
        self.rt.block_on(f).map_err(ts_err)
    }

    fn email(&self, rng: &mut StdRng) -> Email {
        self.emails.choose(rng).unwrap().clone()
    }

    fn metadata(rng: &mut StdRng) -> Metadata {
        Metadata::try_from(serde_json::json!({ format!("k{}", rng.random_range(0..4)): rng.random_range(0..100) }))
            .unwrap()
    }

    /// A KvStore sign-out everywhere of `users` begun at `started` returned now.
    fn kv_signed_out(&self, op: &'static str, users: &[UserId], started: u64) {
        let returned = self.tick();
        let ended: Vec<KvSess> = {
            let mut s = self.kv_sessions.lock().unwrap();
            s.iter_mut()
                .filter(|m| users.contains(&m.user) && m.created < started)
                .map(|m| {
                    if m.ended.is_none_or(|(t, _)| returned < t) {
                        m.ended = Some((returned, op));
                    }
                    m.clone()
                })
                .collect()
        };
        for m in ended {
            match self.data.kv().get_session(&m.id) {
                Ok(found) => self.expect(found.is_none(), || {
                    let dels: Vec<_> = self.deleters.lock().unwrap().iter().filter(|d| d.1 == m.user).map(|d| (d.0, d.2, d.3)).collect();
                    let exists = self.data.users().get(&m.user).map(|u| u.is_some());
                    let again = self.data.kv().delete_user_sessions(&m.user);
                    let after = self.data.kv().get_session(&m.id).map(|s| s.is_some());
                    format!("{op}: a KvStore session of {} created at {} before the sign-out [{started}..{returned}] still loads after it; deleters {dels:?}; user exists now {exists:?}; a second sign-out ended {again:?}, still loads {after:?}", m.user, m.created)
                }),
                Err(e) => self.violation(format!("{op}: get_session after sign-out failed {e:?}")),
            }
        }
    }

    fn ts_signed_out(&self, op: &'static str, user: &str, started: u64) {
        let returned = self.tick();
        let ended: Vec<TsSess> = {
            let mut s = self.ts_sessions.lock().unwrap();
            s.iter_mut()
                .filter(|m| m.user == user && m.created < started)
                .map(|m| {
                    if m.ended.is_none_or(|(t, _)| returned < t) {
                        m.ended = Some((returned, op));
                    }
                    m.clone()
                })
                .collect()
        };
        for m in ended {
            match self.ts(self.ts.load(&m.id)) {
                Ok(found) => self.expect(!names(found.as_ref(), user), || {
                    format!("{op}: a tower session of {user} created before the sign-out still loads after it")
                }),
                Err(e) => self.violation(format!("{op}: load after sign-out failed {e:?}")),
            }
        }
    }

    fn step(&self, rng: &mut StdRng) {
        let (Some(user), Some(cluster)) = (pick(rng, &self.users), pick(rng, &self.clusters)) else {
            return self.replenish(rng);
        };
        let d = &self.data;
        match rng.random_range(0..100) {
            0..=5 => self.call("users.upsert", || {
                let mut new = NewUser::new(self.email(rng), *[Provider::Google, Provider::Email].choose(rng).unwrap());
                if rng.random_bool(0.5) {
                    new.metadata = Some(Self::metadata(rng));
                }
                let u = d.users().upsert(new)?;
                remember(&self.users, u.id, 32);
                Ok(())
            }),
            6..=7 => self.call("users.update", || {
                let patch = UserPatch { metadata: Some(Self::metadata(rng)), ..UserPatch::default() };
                d.users().update(&self.email(rng), patch).map(drop)
            }),
            8..=9 => self.call("users.delete", || {
                let st = self.tick();
                self.begin_delete("users.delete", &[user], st);
                let r = d.users().delete(&user);
                let t = self.tick();
                self.end_delete("users.delete", &[user], st, t);
                r?;
                self.quietly_deleted.lock().unwrap().insert(user);
                Ok(())
            }),
            10..=13 => self.call("data.delete_user", || {
                let started = self.tick();
                self.begin_delete("data.delete_user", &[user], started);
                let r = d.delete_user(&user);
                let t = self.tick();
                self.end_delete("data.delete_user", &[user], started, t);
                if let Ok(_) | Err(StoreError::NotFound { .. }) = r {
                    self.kv_signed_out("data.delete_user", &[user], started);
                    if r.is_ok() {
                        let after = d.users().get(&user)?;
                        self.expect(after.is_none(), || format!("delete_user({user}) Ok, user still there"));
                    }
                }
                r.map(drop)
            }),
            14..=16 => self.call("clusters.create_for_owner", || {
                let c = d.clusters().create_for_owner(&user)?;
                self.expect(c.owner().map(|m| m.user_id) == Some(user), || format!("create_for_owner: {c:?}"));
                remember(&self.clusters, c.id, 8);
                Ok(())
            }),
            17..=21 => self.call("clusters.add_users", || {
                let emails: Vec<Email> = (0..rng.random_range(1..=2)).map(|_| self.email(rng)).collect();
                for m in d.clusters().add_users(&cluster, &emails)? {
                    remember(&self.users, m.user_id, 32);
                    if m.role == Role::Invited {
                        remember(&self.invitations, (m.user_id, cluster), 32);
                    }
                }
                Ok(())
            }),
            22..=24 => self.call("clusters.remove_users", || {
                let mut ids = vec![user];
                ids.extend(pick(rng, &self.users));
                let st = self.tick();
                self.begin_delete("clusters.remove_users", &ids, st);
                let r = d.clusters().remove_users(&cluster, &ids);
                let t = self.tick();
                self.end_delete("clusters.remove_users", &ids, st, t);
                if r.is_ok() {
                    let gone = d.users().missing(&ids)?;
                    self.quietly_deleted.lock().unwrap().extend(gone);
                }
                r
            }),
            25..=28 => self.call("data.remove_users", || {
                let mut ids = vec![user];
                ids.extend(pick(rng, &self.users));
                let started = self.tick();
                self.begin_delete("data.remove_users", &ids, started);
                let gone = d.users().missing(&ids)?;
                // Of those, the accounts deleted and not yet signed out (by
                // a store-level removal, or a call that failed half-way):
                // this call ends their sessions. An account an earlier call
                // already signed out is not listed again (its sessions made
                // since are `delete_user`'s to end), nor one that another
                // deleter running beside this call may have signed out and
                // forgotten first.
                let pending: Vec<UserId> = d
                    .users()
                    .sessions_to_end(&ids)?
                    .into_iter()
                    .filter(|u| !self.another_deleter(u, started, started))
                    .collect();
                let r = d.remove_users(&cluster, &ids);
                let t = self.tick();
                self.end_delete("data.remove_users", &ids, started, t);
                if let Ok(_) | Err(StoreError::NotFound { .. }) = r {
                    let pending: Vec<UserId> =
                        pending.into_iter().filter(|u| !self.another_deleter(u, started, started)).collect();
                    self.kv_signed_out("data.remove_users", &pending, started);
                }
                if r.is_ok() {
                    // Those it deleted itself (or a plain delete beside it:
                    // a hit here is checked by hand).
                    let now_gone: Vec<UserId> =
                        d.users().missing(&ids)?.into_iter().filter(|u| !gone.contains(u)).collect();
                    // Only those no other call may have deleted while this
                    // one ran: then this call deleted them itself.
                    let now_gone: Vec<UserId> =
                        now_gone.into_iter().filter(|u| !self.another_deleter(u, started, started)).collect();
                    self.kv_signed_out("data.remove_users (deleted by it?)", &now_gone, started);
                }
                r.map(drop)
            }),
            29..=34 => self.call("clusters.transfer_ownership", || {
                let prev = *[Some(Role::Admin), Some(Role::Viewer), None].choose(rng).unwrap();
                d.clusters().transfer_ownership(&cluster, &user, prev)
            }),
            35..=36 => self.call("clusters.accept_invite", || {
                let (u, c) = pick(rng, &self.invitations).unwrap_or((user, cluster));
                d.clusters().accept_invite(&u, &c)
            }),
            37 => self.call("clusters.decline_invite", || {
                let (u, c) = pick(rng, &self.invitations).unwrap_or((user, cluster));
                d.clusters().decline_invite(&u, &c)
            }),
            38..=39 => self.call("clusters.update (roles)", || {
                let mut roles: BTreeMap<Role, Vec<UserId>> = BTreeMap::new();
                for _ in 0..rng.random_range(0..3) {
                    if let Some(m) = pick(rng, &self.users) {
                        roles
                            .entry(*[Role::Admin, Role::Developer, Role::Viewer].choose(rng).unwrap())
                            .or_default()
                            .push(m);
                    }
                }
                let patch =
                    ClusterPatch { roles: Some(roles), metadata: Some(Self::metadata(rng)), ..ClusterPatch::default() };
                d.clusters().update(&cluster, patch).map(drop)
            }),
            40 => self.call("clusters.delete", || d.clusters().delete(&cluster)),
            41 => self.call("clusters.install_github_integration", || {
                let login_id = format!("login-{}", rng.random_range(0..2));
                if rng.random_bool(0.5) {
                    let linked = Metadata::try_from(serde_json::json!({ "gitHub": { "loginId": login_id } })).unwrap();
                    d.clusters()
                        .update(&cluster, ClusterPatch { metadata: Some(linked), ..ClusterPatch::default() })
                        .map(drop)
                } else {
                    d.clusters()
                        .install_github_integration(GitHubIntegration { login_id, settings: Self::metadata(rng) })
                        .map(drop)
                }
            }),
            42..=43 => self.call("instances.create", || {
                let n = rng.random_range(0..12);
                let new = NewInstance {
                    address: format!("10.0.0.{n}").try_into()?,
                    tag: format!("web-{}", rng.random_range(0..12)).try_into()?,
                    metadata: None,
                };
                let i = d.instances().create(&cluster, new)?;
                remember(&self.instances, i.id, 16);
                Ok(())
            }),
            44 => self.call("instances.delete", || match pick(rng, &self.instances) {
                Some(i) => d.instances().delete(&i),
                None => Ok(()),
            }),
            45 => self.call("instances.update_metadata", || match pick(rng, &self.instances) {
                Some(i) => d.instances().update_metadata(&i, Self::metadata(rng)).map(drop),
                None => Ok(()),
            }),
            46..=47 => self.call("bootstrap_tokens.create", || {
                let Some(i) = pick(rng, &self.instances) else { return Ok(()) };
                let nonce = if rng.random_range(0..3) == 0 {
                    pick(rng, &self.nonces).unwrap_or_else(|| "n-x".into())
                } else {
                    format!("n-{}", self.next.fetch_add(1, Ordering::Relaxed))
                };
                d.bootstrap_tokens().create(&i, &Nonce::parse(&nonce)?)?;
                remember(&self.nonces, nonce, 32);
                Ok(())
            }),
            48..=50 => self.call("bootstrap_tokens.mark_used", || {
                let Some(n) = pick(rng, &self.nonces) else { return Ok(()) };
                if d.bootstrap_tokens().mark_used(&Nonce::parse(&n)?)? {
                    let t = self.tick();
                    self.used.lock().unwrap().entry(n).or_insert((0, t)).0 += 1;
                }
                Ok(())
            }),
            51 => self.call("bootstrap_tokens.is_used", || {
                let Some(n) = pick(rng, &self.nonces) else { return Ok(()) };
                let started = self.tick();
                let used = d.bootstrap_tokens().is_used(&Nonce::parse(&n)?)?;
                let before = self.used.lock().unwrap().get(&n).is_some_and(|(_, t)| *t < started);
                self.expect(used || !before, || format!("is_used({n}) false after mark_used returned true"));
                Ok(())
            }),
            // KvStore sessions on PostgreSQL.
            52..=55 => self.call("kv.create_session", || {
                let Some(u) = d.users().get(&user)? else { return Ok(()) };
                let id = SessionId::generate();
                let clusters = d.clusters().user_clusters(&u.id)?;
                d.kv().create_session(&id, &u, clusters)?;
                let created = self.tick();
                self.ever.lock().unwrap().insert(u.id.to_string());
                remember(&self.kv_sessions, KvSess { id, user: u.id, created, ended: None }, 96);
                Ok(())
            }),
            56..=58 => self.call("kv.get_session", || {
                let Some(m) = pick(rng, &self.kv_sessions) else { return Ok(()) };
                let started = self.tick();
                let s = d.kv().get_session(&m.id)?;
                self.expect(s.as_ref().is_none_or(|s| s.user_id == m.user), || "session of another user".into());
                let ended = self.kv_sessions.lock().unwrap().iter().find(|x| x.id == m.id).and_then(|x| x.ended);
                if let (Some(_), Some((t, by))) = (&s, ended)
                    && t < started
                {
                    self.violation(format!("kv.get_session: session of {} loads after {by} ended it", m.user));
                }
                Ok(())
            }),
            59..=60 => self.call("kv.delete_session", || {
                let Some(m) = pick(rng, &self.kv_sessions) else { return Ok(()) };
                d.kv().delete_session(&m.id)?;
                let t = self.tick();
                if let Some(x) = self.kv_sessions.lock().unwrap().iter_mut().find(|x| x.id == m.id)
                    && x.ended.is_none_or(|(e, _)| t < e)
                {
                    x.ended = Some((t, "kv.delete_session"));
                }
                self.expect(d.kv().get_session(&m.id)?.is_none(), || "session loads after its delete".into());
                Ok(())
            }),
            61..=63 => self.call("kv.delete_user_sessions", || {
                let started = self.tick();
                d.kv().delete_user_sessions(&user)?;
                self.kv_signed_out("kv.delete_user_sessions", &[user], started);
                Ok(())
            }),
            64..=66 => self.call("kv.oauth_state", || {
                if rng.random_bool(0.4) {
                    let s = OAuthState::generate();
                    d.kv().create_state(&s, "/after")?;
                    remember(&self.states, s, 32);
                    return Ok(());
                }
                let Some(s) = pick(rng, &self.states) else { return Ok(()) };
                if let Some(url) = d.kv().validate_state(&s)? {
                    self.expect(url == "/after", || format!("state gave {url}"));
                    *self.states_taken.lock().unwrap().entry(s.expose().to_owned()).or_default() += 1;
                }
                Ok(())
            }),
            67..=68 => self.call("kv.create_otp", || {
                let e = self.email(rng);
                let s = self.tick();
                let c = d.kv().create_otp(&e)?;
                let r = self.tick();
                remember(&self.codes, (e, c, s, r), 32);
                Ok(())
            }),
            69..=71 => self.call("kv.validate_otp", || {
                let Some((e, c, _, made)) = pick(rng, &self.codes) else { return Ok(()) };
                let guess = if rng.random_bool(0.3) { OtpCode::new("ZZZZZZ") } else { c.clone() };
                let started = self.tick();
                if d.kv().validate_otp(&e, &guess)? {
                    *self
                        .codes_taken
                        .lock()
                        .unwrap()
                        .entry((e.as_str().to_owned(), guess.expose().to_owned()))
                        .or_default() += 1;
                    let replaced = self
                        .codes
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|(o, _, from, to)| *o == e && *from > made && *to < started);
                    self.expect(!replaced, || format!("a code of {e} validated after a newer one was made"));
                }
                Ok(())
            }),
            // The tower-sessions store on the same table.
            72..=75 => self.call("ts.create", || {
                let u = user.to_string();
                let mut record = Record {
                    id: Id::default(),
                    data: HashMap::from([
                        ("user_id".to_owned(), serde_json::Value::from(u.clone())),
                        ("n".to_owned(), serde_json::Value::from(0)),
                    ]),
                    expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                };
                self.ts(self.ts.create(&mut record))?;
                let created = self.tick();
                self.ever.lock().unwrap().insert(u.clone());
                remember(&self.ts_sessions, TsSess { id: record.id, user: u, created, ended: None }, 96);
                Ok(())
            }),
            76..=79 => self.call("ts.load", || {
                let Some(m) = pick(rng, &self.ts_sessions) else { return Ok(()) };
                let started = self.tick();
                let r = self.ts(self.ts.load(&m.id))?;
                let ended = self.ts_sessions.lock().unwrap().iter().find(|x| x.id == m.id).and_then(|x| x.ended);
                if let Some((t, by)) = ended
                    && t < started
                    && names(r.as_ref(), &m.user)
                {
                    self.violation(format!("ts.load: tower session of {} loads after {by} ended it", m.user));
                }
                Ok(())
            }),
            80..=83 => self.call("ts.save", || {
                // A request: load, change, save back.
                let Some(m) = pick(rng, &self.ts_sessions) else { return Ok(()) };
                let started = self.tick();
                let Some(mut r) = self.ts(self.ts.load(&m.id))? else { return Ok(()) };
                let n = r.data.get("n").and_then(serde_json::Value::as_i64).unwrap_or(0);
                r.data.insert("n".into(), (n + 1).into());
                self.ts(self.ts.save(&r))?;
                let after_start = self.tick();
                let _ = after_start;
                let ended = self.ts_sessions.lock().unwrap().iter().find(|x| x.id == m.id).and_then(|x| x.ended);
                if let Some((t, by)) = ended
                    && t < started
                    && n >= 0
                    && names(Some(&r), &m.user)
                {
                    // Ended before the request began: the load must have been None.
                    self.violation(format!("ts.save: loaded a tower session {by} had ended"));
                }
                if let Some((t, by)) = ended {
                    // Ended at some point (perhaps during the save): once
                    // ended, a save never brings it back.
                    let _ = t;
                    let again = self.ts(self.ts.load(&m.id))?;
                    self.expect(!names(again.as_ref(), &m.user), || {
                        format!("ts.save brought back a tower session {by} ended")
                    });
                }
                Ok(())
            }),
            98..=99 => self.call("ts.save (another user signs in on it)", || {
                let Some(m) = pick(rng, &self.ts_sessions) else { return Ok(()) };
                let Some(mut r) = self.ts(self.ts.load(&m.id))? else { return Ok(()) };
                let Some(other) = pick(rng, &self.users) else { return Ok(()) };
                let other = other.to_string();
                r.data.insert("user_id".into(), other.clone().into());
                self.ts(self.ts.save(&r))?;
                let t = self.tick();
                self.ever.lock().unwrap().insert(other.clone());
                // From now on it is `other`'s session: a sign-out of theirs
                // that begins after this returned must end it. (Tracked as
                // a new session; the old entry is left as it was.)
                self.ts_sessions.lock().unwrap().retain(|x| x.id != m.id);
                if self.ts(self.ts.load(&m.id))?.is_some() {
                    remember(&self.ts_sessions, TsSess { id: m.id, user: other, created: t, ended: None }, 96);
                }
                Ok(())
            }),
            84..=85 => self.call("ts.delete", || {
                let Some(m) = pick(rng, &self.ts_sessions) else { return Ok(()) };
                self.ts(self.ts.delete(&m.id))?;
                let t = self.tick();
                if let Some(x) = self.ts_sessions.lock().unwrap().iter_mut().find(|x| x.id == m.id)
                    && x.ended.is_none_or(|(e, _)| t < e)
                {
                    x.ended = Some((t, "ts.delete"));
                }
                self.expect(self.ts(self.ts.load(&m.id))?.is_none(), || "tower session loads after its delete".into());
                Ok(())
            }),
            86..=88 => self.call("ts.delete_user_sessions", || {
                let u = user.to_string();
                let started = self.tick();
                self.rt.block_on(self.ts.delete_user_sessions(&u))?;
                self.ts_signed_out("ts.delete_user_sessions", &u, started);
                Ok(())
            }),
            // Reads.
            89 => self.call("clusters.get", || {
                if let Some(c) = d.clusters().get(&cluster)? {
                    self.expect(c.with_role(Role::Owner).len() == 1, || format!("clusters.get owners: {c:?}"));
                }
                Ok(())
            }),
            90 => self.call("clusters.members", || {
                let p = d.clusters().members(&cluster, &dployr_domain::Page::first(50))?;
                self.expect(p.next.is_some() || p.total == p.items.len() as u64, || format!("members total {p:?}"));
                self.expect(p.items.iter().filter(|m| m.role == Role::Owner).count() <= 1, || format!("{p:?}"));
                Ok(())
            }),
            91 => self.call("clusters.invites", || {
                let p = d.clusters().invites(&cluster, &dployr_domain::Page::first(50))?;
                self.expect(p.next.is_some() || p.total == p.items.len() as u64, || format!("invites total {p:?}"));
                Ok(())
            }),
            92 => self.call("instances.list_by_cluster", || {
                let p = d.instances().list_by_cluster(&cluster, &dployr_domain::Page::first(50))?;
                self.expect(p.next.is_some() || p.total == p.items.len() as u64, || format!("instances total {p:?}"));
                Ok(())
            }),
            93 => self.call("clusters.owner/is_owner/role_of", || {
                let _ = d.clusters().owner(&cluster)?;
                let _ = d.clusters().is_owner(&user, &cluster)?;
                let _ = d.clusters().role_of(&user, &cluster)?;
                let _ = d.clusters().can_write(&user, &cluster)?;
                let _ = d.clusters().can_read(&user, &cluster)?;
                let _ = d.clusters().is_admin(&user, &cluster)?;
                Ok(())
            }),
            94 => self.call("clusters.user_clusters/pending/owned", || {
                let _ = d.clusters().user_clusters(&user)?;
                let _ = d.clusters().pending_invites(&user)?;
                let _ = d.clusters().owned_cluster(&user)?;
                let _ = d.clusters().users_with_role(&cluster, Role::Admin)?;
                let _ = d.clusters().integrations(&cluster)?;
                Ok(())
            }),
            95 => self.call("users.get/get_by_email", || {
                let _ = d.users().get(&user)?;
                let _ = d.users().get_by_email(&self.email(rng))?;
                Ok(())
            }),
            96 => self.call("instances.get/get_by_tag", || {
                if let Some(i) = pick(rng, &self.instances) {
                    let _ = d.instances().get(&i)?;
                }
                let _ = d.instances().get_by_tag(&format!("web-{}", rng.random_range(0..12)).try_into()?)?;
                Ok(())
            }),
            97 => self.call("kv.purge_expired", || PgKv::new(d.pool().clone()).purge_expired(100).map(drop)),
            _ => {}
        }
    }

    fn replenish(&self, rng: &mut StdRng) {
        self.call("users.upsert", || {
            let u = self.data.users().upsert(NewUser::new(self.email(rng), Provider::Google))?;
            remember(&self.users, u.id, 32);
            if self.clusters.lock().unwrap().len() < 4 {
                let c = self.data.clusters().create_for_owner(&u.id)?;
                remember(&self.clusters, c.id, 8);
            }
            Ok(())
        });
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

#[test]
fn a_random_mix_of_every_operation_with_both_session_stores_keeps_every_invariant() {
    let seconds: u64 = std::env::var("DPLOYR_MIX_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let threads: usize = std::env::var("DPLOYR_MIX_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let seed: u64 = std::env::var("DPLOYR_MIX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let db = dployr_testkit::database();
    let data = DataLayer::open(
        Config::new(db.url())
            .with_pool(PoolConfig { max_size: u32::try_from(threads + 8).unwrap(), ..PoolConfig::default() })
            .with_kv(KvBackendConfig::Postgres { purge_every: None })
            .without_migrations_on_start(),
    )
    .unwrap();
    let ts = KvSessionStore::new(Arc::new(PgKv::new(data.pool().clone()))).with_user_field("user_id");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let world = Arc::new(World {
        data,
        ts,
        rt,
        emails: (0..6).map(|i| Email::parse(&format!("p{i}@mix.example")).unwrap()).collect(),
        users: Mutex::default(),
        clusters: Mutex::default(),
        instances: Mutex::default(),
        invitations: Mutex::default(),
        nonces: Mutex::default(),
        next: AtomicU64::new(0),
        used: Mutex::default(),
        ticks: AtomicU64::new(0),
        kv_sessions: Mutex::default(),
        ts_sessions: Mutex::default(),
        states: Mutex::default(),
        states_taken: Mutex::default(),
        codes: Mutex::default(),
        codes_taken: Mutex::default(),
        outcomes: Mutex::default(),
        violations: Mutex::default(),
        unexpected: Mutex::default(),
        ever: Mutex::default(),
        quietly_deleted: Mutex::default(),
        deleters: Mutex::default(),
    });
    let mut setup = StdRng::seed_from_u64(seed);
    for _ in 0..8 {
        world.replenish(&mut setup);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (stop, url) = (Arc::clone(&stop), db.url().to_owned());
        thread::spawn(move || {
            let mut conn = PgConnection::establish(&url).unwrap();
            let mut seen = Vec::new();
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                for b in dployr_tests::stress::broken_invariants(&mut conn) {
                    if seen.len() < 20 {
                        seen.push(b);
                    }
                }
                samples += 1;
                thread::sleep(Duration::from_millis(20));
            }
            (samples, seen)
        })
    };
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (world, stop) = (Arc::clone(&world), Arc::clone(&stop));
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64 + 1));
                while !stop.load(Ordering::Relaxed) {
                    world.step(&mut rng);
                }
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (samples, checker_seen) = checker.join().unwrap();
    let mut violations = std::mem::take(&mut *world.violations.lock().unwrap());
    violations.extend(checker_seen.into_iter().map(|b| format!("checker: {b}")));

    let mut conn = db.connect();
    violations.extend(dployr_tests::stress::broken_invariants(&mut conn).into_iter().map(|b| format!("end: {b}")));
    for (s, n) in world.states_taken.lock().unwrap().iter() {
        if *n > 1 {
            violations.push(format!("state {}.. validated {n} times", &s[..4]));
        }
    }
    for ((e, _), n) in world.codes_taken.lock().unwrap().iter() {
        if *n > 1 {
            violations.push(format!("a code of {e} validated {n} times"));
        }
    }
    for (nonce, (n, _)) in world.used.lock().unwrap().iter() {
        if *n > 1 {
            violations.push(format!("mark_used({nonce}) true {n} times"));
        }
        if !world.data.bootstrap_tokens().is_used(&Nonce::parse(nonce).unwrap()).unwrap() {
            violations.push(format!("{nonce} marked used, is_used says false"));
        }
    }
    // Every session (both stores) that a sign-out ended stays ended.
    for m in world.kv_sessions.lock().unwrap().iter() {
        if let Some((_, by)) = m.ended
            && world.data.kv().get_session(&m.id).unwrap().is_some()
        {
            violations.push(format!("end: a KvStore session of {} loads though {by} ended it", m.user));
        }
    }
    for m in world.ts_sessions.lock().unwrap().iter() {
        if let Some((_, by)) = m.ended
            && names(world.rt.block_on(world.ts.load(&m.id)).unwrap().as_ref(), &m.user)
        {
            violations.push(format!("end: a tower session of {} loads though {by} ended it", m.user));
        }
    }
    // Quiet: every user ever seen (all sessions belong to one) signed out
    // everywhere in both stores; then no session row may stay live.
    let orphan_counts = count(
        &mut conn,
        "SELECT count(*) AS n FROM cluster_counts t WHERE NOT EXISTS (SELECT 1 FROM clusters c WHERE c.id = t.cluster_id)",
    );
    if orphan_counts > 0 {
        violations.push(format!("{orphan_counts} cluster_counts rows of deleted clusters"));
    }
    let mut all_users: HashSet<String> = HashSet::new();
    all_users.extend(world.kv_sessions.lock().unwrap().iter().map(|m| m.user.to_string()));
    all_users.extend(world.ts_sessions.lock().unwrap().iter().map(|m| m.user.clone()));
    #[derive(QueryableByName)]
    struct IdRow {
        #[diesel(sql_type = Text)]
        id: String,
    }
    let live_users: Vec<IdRow> = diesel::sql_query("SELECT id FROM users").load(&mut conn).unwrap();
    all_users.extend(live_users.into_iter().map(|r| r.id));
    all_users.extend(world.ever.lock().unwrap().iter().cloned());
    let kv_before = count(
        &mut conn,
        "SELECT count(*) AS n FROM kv_entries WHERE key LIKE 'session:%' AND (expires_at IS NULL OR expires_at > now())",
    );
    let ts_before = count(
        &mut conn,
        "SELECT count(*) AS n FROM kv_entries WHERE key LIKE 'tower\\_session:%' AND (expires_at IS NULL OR expires_at > now())",
    );
    let (mut kv_ended, mut ts_ended) = (0, 0);
    for u in &all_users {
        let id: UserId = u.parse().unwrap();
        kv_ended += world.data.kv().delete_user_sessions(&id).unwrap();
        ts_ended += world.rt.block_on(world.ts.delete_user_sessions(u)).unwrap();
    }
    let kv_left = count(
        &mut conn,
        "SELECT count(*) AS n FROM kv_entries WHERE key LIKE 'session:%' AND (expires_at IS NULL OR expires_at > now())",
    );
    let ts_left = count(
        &mut conn,
        "SELECT count(*) AS n FROM kv_entries WHERE key LIKE 'tower\\_session:%' AND (expires_at IS NULL OR expires_at > now())",
    );
    if kv_left > 0 {
        violations.push(format!(
            "after signing out all {} users, {kv_left} KvStore sessions are still live (were {kv_before}, {kv_ended} ended)",
            all_users.len()
        ));
    }
    if ts_left > 0 {
        violations.push(format!(
            "after signing out all {} users, {ts_left} tower sessions are still live (were {ts_before}, {ts_ended} ended)",
            all_users.len()
        ));
    }
    let outcomes = world.outcomes.lock().unwrap().clone();
    for (op, o) in &outcomes {
        println!("{op:<40} {o:?}");
    }
    println!(
        "seed {seed}, checker samples {samples}, kv sessions {kv_before}->{kv_left}, tower {ts_before}->{ts_left}"
    );
    let unexpected = world.unexpected.lock().unwrap().clone();
    println!("unexpected: {unexpected:#?}");
    println!("violations: {violations:#?}");
    assert!(violations.is_empty() && unexpected.is_empty(), "{violations:#?}\n{unexpected:#?}");
    // The run did what it says: each operation this mix adds to the stress
    // mix's succeeded at least once.
    for op in [
        "ts.create",
        "ts.load",
        "ts.save",
        "ts.save (another user signs in on it)",
        "ts.delete",
        "ts.delete_user_sessions",
        "kv.create_session",
        "kv.delete_user_sessions",
        "data.delete_user",
        "data.remove_users",
        "clusters.transfer_ownership",
        "bootstrap_tokens.mark_used",
    ] {
        let ok = outcomes.get(op).and_then(|kinds| kinds.get("ok")).copied().unwrap_or(0);
        assert!(ok > 0, "{op} never succeeded: {:?}", outcomes.get(op));
    }
}
