//! A randomized concurrent workload with an invariant checker: every
//! operation of the PostgreSQL stores and of the key-value store on its
//! PostgreSQL backend, writes and reads, and the data layer's two-step
//! calls (`DataLayer::delete_user`, `DataLayer::remove_users`), on a few
//! clusters that share their users, from many threads at once, while a
//! checker on its own connection samples the invariants every 10 ms.
//!
//! Invariants checked (each checker sample and each read is one statement,
//! so one snapshot; the checks across samples take a second statement):
//! - every live cluster has exactly one owner;
//! - no membership names a missing user or cluster, no instance a missing
//!   cluster, no bootstrap token a missing instance (cascading foreign
//!   keys);
//! - every listing's total (members, invites, instances), as pages report
//!   it, equals a `count(*)` of its rows;
//! - every membership's copy of its user's e-mail, name and picture (what
//!   member listings show) equals the user's own;
//! - no row of any table was updated before it was created;
//! - across samples (what only moves one way, whatever commits between
//!   two): a row's `updated_at` never decreases; a membership seen with a
//!   role past `invited` is never `invited` again; a user id keeps its
//!   e-mail (a row is one table, key and `created_at`, forgotten once a
//!   sample misses it);
//! - a bootstrap token's `mark_used` returns `true` at most once, and a
//!   token it returned `true` for stays used: every `is_used` that begins
//!   after that `true` returned says used (a token deleted since is
//!   unknown, which counts as used); 8 calls at once for a fresh token
//!   return exactly one `true` (none, if one of them lost its connection);
//! - 4 `create_for_owner` at once for a fresh user all answer one cluster,
//!   the one `owned_cluster` then names;
//! - every write that answers with what it wrote (read inside its own
//!   transaction) shows this call's write: `users.upsert` and
//!   `users.update` the e-mail, name, picture, provider and metadata keys
//!   given, where a blank picture makes `update` remove the picture and
//!   `upsert` keep the stored one (never a blank; on the burst's own user,
//!   exactly the one it gave before); `clusters.update` with roles exactly
//!   its owner and each listed user with the highest role listed for them
//!   (the owner keeps ownership), no one else and no invitation, with the
//!   name and metadata keys given; `add_users` one member per distinct e-mail asked for;
//! - a session reads as its own user's; a session a sign-out ended never
//!   loads, at once or in any read that begins after the sign-out returned:
//!   `delete_session`'s, and for a sign-out everywhere (alone, by
//!   `DataLayer::delete_user`, or by `DataLayer::remove_users` for the
//!   listed accounts gone before it began) every session of the user whose
//!   create returned before it began; `remove_users` of a signed-in
//!   invitee deletes the account and ends its session, finished by calling
//!   again if it lost its connection; an OAuth state validates once; a
//!   one-time code validates once, and never once a newer code for its
//!   e-mail was made in full before the guess began; 8 wrong guesses of one
//!   code at once are given 8 different counts, so at most the limit of
//!   them are compared, and the right code after them is refused;
//! - every read's answer holds what one snapshot must: a cluster with one
//!   owner and each member once, in its role's group; pages in their order,
//!   never longer than asked, with a cursor only after a full page and,
//!   without one, a total equal to the items given; the owner first on a
//!   member page and never on the next; rows that are what was asked for;
//! - `DataLayer::health()`, alone or 2 calls at once, answers ready in a
//!   run nothing disturbs (in a disturbed one, `not ready` is counted);
//! - a listing walked page by page with its cursor (`clusters.members`,
//!   `instances.list_by_cluster`, by a walker beside the checker): beside
//!   the writes, no row comes twice and every row there, unmoved in the
//!   listing's order, from before the walk to after it comes once; at a
//!   quiet moment (the workers paused, and at the end), the pages hold
//!   each row once, as many as every page's total and a `count(*)` say.
//!
//! Also counted: every operation's outcome by error kind, or `skipped` when
//! a step found nothing to act on (no instance, nonce, session, ... known
//! yet) and made no call, which is neither a success nor a failure.
//! `Backend` errors, `Invalid` errors (the workload sends only valid
//! input), panics and deadlocks that PostgreSQL detected are failures, and
//! so is `Unavailable` in a run nothing disturbs (none came in its runs);
//! `NotFound` and `Conflict` are the normal answers of a workload whose
//! rows vanish under it. Run by `cargo xtask stress` (long) and `tests/tests/stress.rs` (10 s).

#![expect(clippy::expect_used, reason = "a harness: a database that fails under it fails the run, loudly")]

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use dployr_data::{Config, DataLayer, Health, KvBackendConfig};
use dployr_domain::{
    BootstrapTokenStore, Cluster, ClusterId, ClusterName, ClusterPatch, ClusterStore, Email, GitHubIntegration,
    InstanceId, InstanceStore, Metadata, NewInstance, NewUser, Nonce, Page, Paged, Provider, Role, StoreError,
    StoreResult, Tag, UserId, UserPatch, UserStore,
};
use dployr_kv::{KvStore, KvStoreConfig, OAuthState, OtpCode, PgKv, SessionId};

use crate::observed_kv::ObservedKv;
use dployr_pg::{PgBootstrapTokenStore, PgClusterStore, PgInstanceStore, PgUserStore, PoolConfig};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};

/// Something done to the server at intervals while the workload runs.
#[derive(Clone)]
pub enum Disturbance {
    /// End every other session of the database (`pg_terminate_backend`),
    /// what a restart does to the sessions, while the server stays up.
    EndSessions,
    /// Run this, given the round (0, 1, ...): a restart of the server, say.
    /// It may take a while; the checker reconnects when the server it
    /// samples went away.
    Run(Arc<dyn Fn(u64) + Send + Sync>),
}

impl fmt::Debug for Disturbance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disturbance::EndSessions => f.write_str("EndSessions"),
            Disturbance::Run(_) => f.write_str("Run(..)"),
        }
    }
}

/// How long, how wide and from which seed a run goes.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Wall-clock length of the run.
    pub duration: Duration,
    /// Worker threads, each with its own random stream.
    pub threads: usize,
    /// The seed of every stream (worker `i` uses `seed + i`).
    pub seed: u64,
    /// E-mail addresses the users are drawn from (users are deleted and
    /// signed in again under them).
    pub emails: usize,
    /// Clusters kept alive (deleted ones are replaced).
    pub clusters: usize,
    /// When set, a thread of its own disturbs the server at this interval
    /// (ends the sessions, restarts it), so calls lose their connection
    /// mid-statement and mid-transaction: they must fail as `Unavailable`,
    /// leave nothing half done, and the pool must serve again on new
    /// connections. None begins in the last interval of the run, so the
    /// run ends with at least one interval undisturbed.
    pub disturb: Option<(Duration, Disturbance)>,
}

impl Default for StressConfig {
    fn default() -> Self {
        Self { duration: Duration::from_secs(10), threads: 16, seed: 1, emails: 24, clusters: 4, disturb: None }
    }
}

/// What happened in a run.
#[derive(Debug, Default)]
pub struct StressReport {
    /// The configuration it ran with.
    pub seed: u64,
    /// How long it ran.
    pub elapsed: Duration,
    /// Worker threads.
    pub threads: usize,
    /// Connections the workers' pool may hold (its maximum size).
    pub connections: u64,
    /// Connections the pool discarded (found ended by the server before a
    /// call, lost under one, or left by an expired call): what shows that a
    /// disturbance reached the pool, whether or not a call failed for it.
    pub connections_discarded: u64,
    /// Per operation: outcome (`ok`, `skipped`, or an error kind) -> count.
    pub outcomes: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Samples the checker took.
    pub samples: u64,
    /// Invariant violations seen, with what was seen (at most 20 kept).
    pub violations: Vec<String>,
    /// Violations counted (all of them).
    pub violation_count: u64,
    /// Unexpected errors (`Backend`, `Invalid`) and panics (at most 20 kept).
    pub unexpected: Vec<String>,
    /// Deadlocks PostgreSQL detected in the run's database (since the
    /// server last started: a crash resets the count).
    pub deadlocks: i64,
    /// Disturbances done ([`StressConfig::disturb`]).
    pub disturbances: u64,
    /// Calls that succeeded after the last disturbance ended: the pool
    /// serves again.
    pub ok_after_last_disturbance: u64,
    /// `Unavailable` errors by their text (at most 20 texts kept).
    pub unavailable: BTreeMap<String, u64>,
    /// Whether the run was disturbed on purpose ([`StressConfig::disturb`]),
    /// which is what makes `Unavailable` errors and not-ready health answers
    /// expected.
    pub disturbed: bool,
    /// `Unavailable` errors of a run nothing disturbed: those calls
    /// answered, and those a step got past (a racer beside one that
    /// answered, a call tried again). Each is also listed, with its
    /// operation, among [`unexpected`](Self::unexpected).
    pub unavailable_undisturbed: u64,
    /// The listings the checker walked page by page ([`Walks`]).
    pub walks: Walks,
}

/// The listings (`clusters.members`, `instances.list_by_cluster`) the
/// checker walked page by page with their cursor (`WALK_PAGES`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Walks {
    /// Walks beside the workers' writes, checked for what holds whatever
    /// commits between the pages (`Walk::racing`).
    pub racing: u64,
    /// Pages those walks took.
    pub racing_pages: u64,
    /// Rows of those walks there, and not moved in the listing's order,
    /// from before the walk began to after it ended: each must have been
    /// given exactly once.
    pub racing_rows_kept: u64,
    /// Walks at a quiet moment (the workers paused, or done), checked
    /// exactly against a `count(*)` (`Walk::quiet`).
    pub quiet: u64,
    /// Pages those walks took.
    pub quiet_pages: u64,
    /// Rows those walks held (each given once, as every page's total said).
    pub quiet_rows: u64,
    /// The most rows a walked listing held.
    pub largest: u64,
    /// Walks of a disturbed run given up because the disturbance failed a
    /// page or a read of the rows.
    pub given_up: u64,
}

impl StressReport {
    /// No violation, no unexpected error or panic, no deadlock, and, in a
    /// run nothing disturbed, no `Unavailable`: with no connection ended,
    /// a retry that gave up or a checkout that timed out is a fault of the
    /// data layer (or of the machine), not a normal answer.
    pub fn is_clean(&self) -> bool {
        self.violation_count == 0
            && self.unavailable_undisturbed == 0
            && self.count_of("Backend") == 0
            && self.count_of("Invalid") == 0
            && self.count_of("panic") == 0
            && self.deadlocks == 0
    }

    /// Calls of every operation.
    pub fn calls(&self) -> u64 {
        self.outcomes.values().flat_map(BTreeMap::values).sum()
    }

    /// Outcomes of one kind over every operation.
    pub fn count_of(&self, kind: &str) -> u64 {
        self.outcomes.values().filter_map(|outcomes| outcomes.get(kind)).sum()
    }
}

/// The outcomes a report counts, in its columns: `ok`, `skipped` (a call
/// that found nothing to act on, [`Acted::NothingToActOn`]: neither a
/// success nor a failure), then the error kinds, and `not ready`: a
/// `DataLayer::health()` that answered (it never fails) that the process
/// cannot serve, expected only while a disturbance is under way.
const KINDS: [&str; 9] =
    ["ok", "skipped", "NotFound", "Conflict", "Unavailable", "Invalid", "Backend", "panic", "not ready"];

impl fmt::Display for StressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64().max(f64::EPSILON);
        writeln!(
            f,
            "stress: {} threads, {:.1} s, seed {}: {} calls, {:.0} ops/s",
            self.threads,
            seconds,
            self.seed,
            self.calls(),
            self.calls() as f64 / seconds
        )?;
        write!(f, "{:<40} {:>8}", "operation", "ops/s")?;
        for kind in KINDS {
            write!(f, " {kind:>11}")?;
        }
        writeln!(f)?;
        for (operation, outcomes) in &self.outcomes {
            let calls: u64 = outcomes.values().sum();
            write!(f, "{operation:<40} {:>8.0}", calls as f64 / seconds)?;
            for kind in KINDS {
                write!(f, " {:>11}", outcomes.get(kind).copied().unwrap_or(0))?;
            }
            writeln!(f)?;
        }
        writeln!(f, "checker samples: {}", self.samples)?;
        let walks = &self.walks;
        writeln!(
            f,
            "listing walks: {} beside the writes ({} pages, {} rows kept throughout), {} at quiet moments \
             ({} pages, {} rows), the largest {} rows{}",
            walks.racing,
            walks.racing_pages,
            walks.racing_rows_kept,
            walks.quiet,
            walks.quiet_pages,
            walks.quiet_rows,
            walks.largest,
            if walks.given_up > 0 { format!(", {} given up to a disturbance", walks.given_up) } else { String::new() }
        )?;
        if self.unavailable_undisturbed > 0 {
            writeln!(
                f,
                "Unavailable in a run nothing disturbed: {} (listed, with their operation, below)",
                self.unavailable_undisturbed
            )?;
        }
        for (reason, count) in &self.unavailable {
            writeln!(f, "  Unavailable x{count}: {reason}")?;
        }
        if self.disturbances > 0 {
            writeln!(
                f,
                "disturbances: {}, calls that succeeded after the last: {}, connections discarded: {}",
                self.disturbances, self.ok_after_last_disturbance, self.connections_discarded
            )?;
        }
        writeln!(f, "invariant violations: {}", self.violation_count)?;
        for violation in &self.violations {
            writeln!(f, "  {violation}")?;
        }
        writeln!(f, "deadlocks detected by PostgreSQL: {}", self.deadlocks)?;
        writeln!(f, "unexpected errors and panics: {}", self.unexpected.len())?;
        for error in &self.unexpected {
            writeln!(f, "  {error}")?;
        }
        write!(f, "verdict: {}", if self.is_clean() { "clean" } else { "FAILED" })
    }
}

/// The stores of one database, and what the workers know of its rows.
struct World {
    users: PgUserStore,
    clusters: PgClusterStore,
    instances: PgInstanceStore,
    tokens: PgBootstrapTokenStore,
    /// Sessions, OAuth states and one-time codes, on the PostgreSQL backend
    /// of the same database (seen through [`ObservedKv`]).
    kv: KvStore,
    /// The guesses `kv` evaluates per one-time code.
    otp_max_attempts: u32,
    /// The data layer on the same pool, with its sessions on PostgreSQL
    /// (the table `kv` uses, so each sees the other's sessions): for
    /// `delete_user` and `remove_users`, which sign out the accounts they
    /// delete.
    data: DataLayer,
    emails: Vec<Email>,
    /// Ids seen for users, clusters and instances; some are stale, on purpose.
    user_ids: Mutex<Vec<UserId>>,
    cluster_ids: Mutex<Vec<ClusterId>>,
    instance_ids: Mutex<Vec<InstanceId>>,
    /// Invitations handed out by `add_users`, for accept and decline to find.
    invitations: Mutex<Vec<(UserId, ClusterId)>>,
    /// Nonces created, and the `mark_used` calls that returned `true` for each.
    nonces: Mutex<Vec<String>>,
    used: Mutex<HashMap<String, Used>>,
    next_nonce: AtomicU64,
    /// Bursts begun: each names its own e-mail, instance and nonce by it.
    bursts: AtomicU64,
    /// A clock of the calls whose order a check compares: a tick when one
    /// starts and when it returns, so "returned before that started" can be
    /// told (one atomic, `SeqCst`: a tick taken after another was taken
    /// after what preceded it).
    ticks: AtomicU64,
    /// Sessions created (the last 64), and whether a sign-out ended them.
    sessions: Mutex<Vec<MadeSession>>,
    /// The calls that sign out and forget deleted accounts
    /// (`data.delete_user`, `data.remove_users`): each listed account, the
    /// tick the call started and the one it returned (`u64::MAX` while it
    /// runs). A call that finds an account still to sign out owes its
    /// sessions only if no other such call ran beside it: that one may have
    /// ended them and forgotten the account first.
    forgetters: Mutex<Vec<(UserId, u64, u64)>>,
    /// OAuth states created, and how many validations returned the state's
    /// data for each.
    states: Mutex<Vec<OAuthState>>,
    states_taken: Mutex<HashMap<String, u64>>,
    /// One-time codes created: the e-mail, the code, and the ticks its
    /// create started and returned; and how many validations of each
    /// (e-mail, code) returned true.
    codes: Mutex<Vec<(Email, OtpCode, u64, u64)>>,
    codes_taken: Mutex<HashMap<(String, String), u64>>,
    outcomes: Mutex<BTreeMap<&'static str, BTreeMap<&'static str, u64>>>,
    unexpected: Mutex<Vec<String>>,
    /// Answers of reads that broke what any answer must hold (at most 20
    /// kept), and how many there were.
    answers: Mutex<Vec<String>>,
    answer_violations: AtomicU64,
    target_clusters: usize,
    /// Calls that succeeded since the last disturbance ended.
    ok_since_disturbed: AtomicU64,
    /// `Unavailable` errors by their text.
    unavailable: Mutex<BTreeMap<String, u64>>,
    /// Whether a disturbance runs ([`StressConfig::disturb`]): without one,
    /// an `Unavailable` or a not-ready health answer counts against the run.
    disturbed: bool,
    /// `Unavailable` errors seen in a run nothing disturbed.
    undisturbed_unavailable: AtomicU64,
    /// Held for reading by each worker's step, for writing by the checker
    /// for a quiet moment: the workers pause between two steps, so no write
    /// is under way while it walks the listings.
    quiet: RwLock<()>,
}

/// A session the workload created.
#[derive(Clone)]
struct MadeSession {
    id: SessionId,
    user: UserId,
    /// The tick its `create_session` returned.
    created: u64,
    /// The first sign-out that ended it: the tick that call returned, and
    /// the operation. Every read that begins after that tick must find none.
    ended: Option<(u64, &'static str)>,
}

/// The `mark_used` calls of one nonce that returned `true`: how many, and
/// the tick the first returned (every `is_used` that begins after it must
/// say used).
#[derive(Clone, Copy)]
struct Used {
    times: u64,
    first: u64,
}

fn pick<T: Clone>(rng: &mut StdRng, items: &Mutex<Vec<T>>) -> Option<T> {
    items.lock().unwrap_or_else(std::sync::PoisonError::into_inner).choose(rng).cloned()
}

fn remember<T>(items: &Mutex<Vec<T>>, item: T) {
    let mut items = items.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // A bounded pool: old ids fall out, so picks stay mostly fresh.
    if items.len() >= 64 {
        items.remove(0);
    }
    items.push(item);
}

/// Whether a picture URL is blank: it shows nothing (empty, white space,
/// invisible characters), as the stores' rule says.
fn is_blank(picture: &str) -> bool {
    dployr_domain::text::is_blank(picture)
}

/// Whether no item comes twice.
fn each_once<T: Eq + std::hash::Hash>(items: impl IntoIterator<Item = T>) -> bool {
    let mut seen = std::collections::HashSet::new();
    items.into_iter().all(|item| seen.insert(item))
}

/// What a call that did not fail did. A workload step that finds nothing
/// to act on (no instance, nonce, session, state or code known yet, or the
/// user gone) makes no call of its operation: counting it as `ok` would let
/// an operation look exercised that never ran.
enum Acted {
    /// The operation ran and answered.
    Yes,
    /// Nothing to act on: counted as `skipped`.
    NothingToActOn,
    /// `DataLayer::health()` answered not ready: counted as `not ready`.
    NotReady,
}

/// A step whose work returns nothing ran its operation.
impl From<()> for Acted {
    fn from((): ()) -> Self {
        Acted::Yes
    }
}

/// Whether `stored` holds every key of `given` with the value given: what a
/// merge of `given` (`jsonb ||`) leaves, whatever else the object holds.
fn merged(stored: &Metadata, given: &Metadata) -> bool {
    given.as_map().iter().all(|(key, value)| stored.get(key) == Some(value))
}

/// Whether `cluster`, as `clusters.update` gave back after setting the roles
/// `desired` (each listed user's highest), has exactly one owner and each
/// listed user, with their desired role unless they are the owner (who keeps
/// ownership), and no one else: members not listed are removed, invitations
/// included.
fn has_exactly_the_roles(cluster: &Cluster, desired: &BTreeMap<UserId, Role>) -> bool {
    let [owner] = cluster.with_role(Role::Owner) else { return false };
    let members: Vec<_> = cluster.members.values().flatten().collect();
    let listed_or_owner =
        members.iter().all(|member| member.role == Role::Owner || desired.get(&member.user_id) == Some(&member.role));
    let each_listed = desired.keys().all(|user| members.iter().any(|member| member.user_id == *user));
    let expected = desired.len() + usize::from(!desired.contains_key(&owner.user_id));
    listed_or_owner && each_listed && members.len() == expected
}

/// Runs `work` on `threads` threads that start it together (behind a
/// barrier, so the calls race), and gives back each one's answer.
fn at_once<T: Send>(threads: usize, work: impl Fn() -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(threads);
    thread::scope(|scope| {
        let racers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    work()
                })
            })
            .collect();
        racers.into_iter().map(|racer| racer.join().expect("a racing call does not panic")).collect()
    })
}

thread_local! {
    /// The count this thread's last one-time-code guess was given, and the
    /// limit it was checked against ([`ObservedKv`] sets it).
    static LAST_ATTEMPT: Cell<Option<(i64, i64)>> = const { Cell::new(None) };
}

/// The count and the limit of this thread's last one-time-code guess,
/// once (set by the [`ObservedKv`] the mix's key-value store runs on).
fn last_attempt() -> Option<(i64, i64)> {
    LAST_ATTEMPT.with(Cell::take)
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

impl World {
    fn record(&self, operation: &'static str, kind: &'static str, detail: Option<String>) {
        if kind == "ok" {
            self.ok_since_disturbed.fetch_add(1, Ordering::Relaxed);
        }
        let mut outcomes = self.outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *outcomes.entry(operation).or_default().entry(kind).or_default() += 1;
        if let Some(detail) = detail {
            let mut unexpected = self.unexpected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if unexpected.len() < 20 {
                unexpected.push(format!("{operation}: {detail}"));
            }
        }
    }

    /// Runs one call of `operation`, recording its outcome.
    fn call<A: Into<Acted>>(&self, operation: &'static str, work: impl FnOnce() -> Result<A, StoreError>) {
        match catch_unwind(AssertUnwindSafe(work)) {
            Ok(Ok(acted)) => match acted.into() {
                Acted::Yes => self.record(operation, "ok", None),
                Acted::NothingToActOn => self.record(operation, "skipped", None),
                Acted::NotReady => self.record(operation, "not ready", None),
            },
            Ok(Err(error)) => {
                let kind = kind_of(&error);
                self.got_past(operation, &error);
                let detail = matches!(kind, "Backend" | "Invalid").then(|| format!("{error:?}"));
                self.record(operation, kind, detail);
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                self.record(operation, "panic", Some(message));
            }
        }
    }

    /// Counts an `Unavailable` error of `operation` (any other error is
    /// left alone), whether the call answered it or a step got past it (a
    /// racer beside one that answered, a call tried again): by its text,
    /// and, in a run nothing disturbs, against the run, named with its
    /// operation. No connection is ended there, so a retry that gave up or
    /// a checkout that timed out is a fault to see, not a normal answer.
    fn got_past(&self, operation: &'static str, error: &StoreError) {
        if !matches!(error, StoreError::Unavailable { .. }) {
            return;
        }
        let reason = error.to_string();
        {
            let mut unavailable = self.unavailable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if unavailable.len() < 20 || unavailable.contains_key(&reason) {
                *unavailable.entry(reason.clone()).or_default() += 1;
            }
        }
        if !self.disturbed {
            self.undisturbed_unavailable.fetch_add(1, Ordering::Relaxed);
            let mut unexpected = self.unexpected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if unexpected.len() < 20 {
                unexpected.push(format!("{operation}: Unavailable in a run nothing disturbed: {reason}"));
            }
        }
    }

    fn email(&self, rng: &mut StdRng) -> Email {
        self.emails.choose(rng).cloned().unwrap_or_else(|| self.emails[0].clone())
    }

    fn metadata(rng: &mut StdRng) -> Metadata {
        let key = format!("k{}", rng.random_range(0..8));
        Metadata::try_from(serde_json::json!({ key: rng.random_range(0..1000) })).unwrap_or_default()
    }

    /// A picture for a sign-in or an update: a URL (30 %), a blank one
    /// (10 %, empty or spaces), or none.
    fn picture(rng: &mut StdRng, prefix: &str) -> Option<String> {
        match rng.random_range(0..10) {
            0..=2 => Some(format!("https://example.io/{prefix}{}.png", rng.random_range(0..100))),
            3 => Some(["", "   ", "\u{200b}", " \u{feff}"].choose(rng).copied().unwrap_or_default().to_owned()),
            _ => None,
        }
    }

    /// A role `clusters.update` may give. Not `Invited`: a member who got
    /// further never goes back to it, so listing one there is `Invalid` by
    /// design (invitations come from `add_users`).
    fn role(rng: &mut StdRng) -> Role {
        *[Role::Admin, Role::Developer, Role::Viewer].choose(rng).unwrap_or(&Role::Viewer)
    }

    /// One random operation, weighted towards membership writes (where the
    /// owner rule can break) but covering every write of every store. A
    /// write that answers with what it wrote reads that answer inside its
    /// own transaction, so the answer must show this call's write, whatever
    /// runs beside it: those answers are checked too.
    fn step(&self, rng: &mut StdRng) {
        let user = pick(rng, &self.user_ids);
        let cluster = pick(rng, &self.cluster_ids);
        let (Some(user), Some(cluster)) = (user, cluster) else {
            return self.replenish(rng);
        };
        match rng.random_range(0..153) {
            0..=7 => self.call("users.upsert", || {
                let provider = *[Provider::Google, Provider::Github, Provider::Microsoft, Provider::Email]
                    .choose(rng)
                    .unwrap_or(&Provider::Email);
                let metadata = rng.random_bool(0.5).then(|| Self::metadata(rng));
                // Some sign-ins bring a name and a picture (the copies every
                // membership keeps must follow them), a few a blank picture,
                // which gives none: the stored one stays.
                let name = rng.random_bool(0.3).then(|| format!("signed in {}", rng.random_range(0..100)));
                let name = name.map(TryInto::try_into).transpose()?;
                let picture = Self::picture(rng, "s");
                let email = self.email(rng);
                let new = NewUser {
                    metadata: metadata.clone(),
                    name: name.clone(),
                    picture: picture.clone(),
                    ..NewUser::new(email.clone(), provider)
                };
                let user = self.users.upsert(new)?;
                remember(&self.user_ids, user.id);
                // The row as this call's statement left it (RETURNING): the
                // name and picture it brought replace the stored ones; a
                // blank one left the stored picture, which no write leaves
                // blank (what it is, other writes decide: the burst checks
                // it exactly on a user of its own).
                let kept_or_given = match picture.as_deref() {
                    Some(blank) if is_blank(blank) => user.picture.as_deref().is_none_or(|kept| !is_blank(kept)),
                    Some(given) => user.picture.as_deref() == Some(given),
                    None => true,
                };
                let right = user.email == email
                    && user.provider == provider
                    && name.as_ref().is_none_or(|name| user.name == name.as_str())
                    && kept_or_given
                    && metadata.as_ref().is_none_or(|metadata| merged(&user.metadata, metadata));
                self.expect("users.upsert", right, || {
                    format!("signed in {email} with {provider:?}, {name:?}, {picture:?}, {metadata:?}; got {user:?}")
                });
                Ok(())
            }),
            8..=10 => self.call("users.update", || {
                let patch = UserPatch {
                    name: Some(format!("name {}", rng.random_range(0..100)).try_into()?),
                    picture: Self::picture(rng, "u"),
                    provider: rng.random_bool(0.3).then_some(Provider::Email),
                    metadata: Some(Self::metadata(rng)),
                };
                let email = self.email(rng);
                let Some(user) = self.users.update(&email, patch.clone())? else { return Ok(()) };
                // The row as this call's UPDATE left it (RETURNING): a blank
                // picture removed the picture.
                let picture_right = match patch.picture.as_deref() {
                    Some(blank) if is_blank(blank) => user.picture.is_none(),
                    Some(given) => user.picture.as_deref() == Some(given),
                    None => true,
                };
                let right = user.email == email
                    && patch.name.as_ref().is_none_or(|name| user.name == name.as_str())
                    && picture_right
                    && patch.provider.is_none_or(|provider| user.provider == provider)
                    && patch.metadata.as_ref().is_none_or(|metadata| merged(&user.metadata, metadata));
                self.expect("users.update", right, || format!("updated {email} with {patch:?}; got {user:?}"));
                Ok(())
            }),
            11..=16 => self.call("users.delete", || self.users.delete(&user)),
            17..=19 => self.call("clusters.create_for_owner", || {
                let cluster = self.clusters.create_for_owner(&user)?;
                remember(&self.cluster_ids, cluster.id);
                let owner = cluster.owner().map(|member| member.user_id);
                self.expect("clusters.create_for_owner", owner == Some(user), || {
                    format!("asked for {user}'s cluster; got {} whose owner is {owner:?}", cluster.id)
                });
                Ok(())
            }),
            20..=27 => self.call("clusters.update (roles)", || {
                let mut roles: BTreeMap<Role, Vec<UserId>> = BTreeMap::new();
                // Each listed user's highest role: what the cluster must hold.
                let mut desired: BTreeMap<UserId, Role> = BTreeMap::new();
                for _ in 0..rng.random_range(0..4) {
                    if let Some(member) = pick(rng, &self.user_ids) {
                        let role = Self::role(rng);
                        roles.entry(role).or_default().push(member);
                        let highest = desired.entry(member).or_insert(role);
                        *highest = (*highest).max(role);
                    }
                }
                let name = rng
                    .random_bool(0.2)
                    .then(|| ClusterName::try_from(format!("cluster {}", rng.random_range(0..100))))
                    .transpose()?;
                let metadata = rng.random_bool(0.2).then(|| Self::metadata(rng));
                let patch = ClusterPatch { name: name.clone(), metadata: metadata.clone(), roles: Some(roles) };
                let Some(found) = self.clusters.update(&cluster, patch)? else { return Ok(()) };
                // Read back under the cluster's lock, which every other
                // membership write of this cluster waits for, with each
                // listed user share-locked (a listed user already deleted
                // fails the call as NotFound): nothing can change the
                // memberships between the write and the answer, except
                // accept and decline, which touch only invitations, and
                // none is left.
                let right = found.id == cluster
                    && has_exactly_the_roles(&found, &desired)
                    && name.as_ref().is_none_or(|name| found.name == name.as_str())
                    && metadata.as_ref().is_none_or(|metadata| merged(&found.metadata, metadata));
                self.expect("clusters.update (roles)", right, || {
                    format!("set {cluster} to {desired:?}, {name:?}, {metadata:?}; got {found:?}")
                });
                Ok(())
            }),
            28..=30 => self.call("clusters.delete", || self.clusters.delete(&cluster)),
            31..=32 => {
                let login_id = format!("login-{}", rng.random_range(0..4));
                if rng.random_bool(0.5) {
                    // A cluster linked to a login, for the installs to find.
                    self.call("clusters.update (metadata)", || {
                        let linked = Metadata::try_from(serde_json::json!({ "gitHub": { "loginId": login_id } }))
                            .unwrap_or_default();
                        let patch = ClusterPatch { metadata: Some(linked), ..ClusterPatch::default() };
                        self.clusters.update(&cluster, patch).map(drop)
                    });
                } else {
                    self.call("clusters.install_github_integration", || {
                        let integration = GitHubIntegration { login_id, settings: Self::metadata(rng) };
                        self.clusters.install_github_integration(integration).map(drop)
                    });
                }
            }
            33..=44 => self.call("clusters.transfer_ownership", || {
                let previous =
                    *[Some(Role::Admin), Some(Role::Developer), Some(Role::Viewer), None].choose(rng).unwrap_or(&None);
                self.clusters.transfer_ownership(&cluster, &user, previous)
            }),
            45..=54 => self.call("clusters.add_users", || {
                // Now and then none: an empty invitation changes nothing.
                let emails: Vec<Email> = (0..rng.random_range(0..=3)).map(|_| self.email(rng)).collect();
                let members = self.clusters.add_users(&cluster, &emails)?;
                for member in &members {
                    remember(&self.user_ids, member.user_id);
                    if member.role == Role::Invited {
                        remember(&self.invitations, (member.user_id, cluster));
                    }
                }
                // One member per distinct e-mail asked for, read in the
                // call's transaction under the cluster's lock; an e-mail's
                // user never changes its e-mail, and one e-mail is one user.
                let asked: BTreeSet<&str> = emails.iter().map(Email::as_str).collect();
                let given: BTreeSet<&str> = members.iter().map(|member| member.email.as_str()).collect();
                self.expect("clusters.add_users", members.len() == asked.len() && given == asked, || {
                    format!("invited {asked:?} to {cluster}; got {members:?}")
                });
                Ok(())
            }),
            55..=64 => {
                let mut ids = vec![user];
                ids.extend(pick(rng, &self.user_ids));
                // Half of the time as the data layer does it, signing out
                // the accounts the removal deleted.
                if rng.random_bool(0.5) {
                    self.call("clusters.remove_users", || self.clusters.remove_users(&cluster, &ids));
                } else {
                    self.call("data.remove_users", || self.remove_users_signing_out(&cluster, &ids));
                }
            }
            65..=69 => self.call("clusters.accept_invite", || {
                let (user, cluster) = pick(rng, &self.invitations).unwrap_or((user, cluster));
                self.clusters.accept_invite(&user, &cluster)
            }),
            70..=72 => self.call("clusters.decline_invite", || {
                let (user, cluster) = pick(rng, &self.invitations).unwrap_or((user, cluster));
                self.clusters.decline_invite(&user, &cluster)
            }),
            73..=76 => self.call("instances.create", || {
                let n = rng.random_range(0..40);
                let new = NewInstance {
                    address: format!("10.0.0.{n}").try_into()?,
                    tag: format!("web-{}", rng.random_range(0..40)).try_into()?,
                    metadata: Some(Self::metadata(rng)),
                };
                let instance = self.instances.create(&cluster, new)?;
                remember(&self.instance_ids, instance.id);
                Ok(())
            }),
            77..=78 => self.call("instances.update_metadata", || {
                let Some(instance) = pick(rng, &self.instance_ids) else { return Ok(Acted::NothingToActOn) };
                self.instances.update_metadata(&instance, Self::metadata(rng)).map(|_| Acted::Yes)
            }),
            79..=80 => self.call("instances.delete", || {
                let Some(instance) = pick(rng, &self.instance_ids) else { return Ok(Acted::NothingToActOn) };
                self.instances.delete(&instance).map(|()| Acted::Yes)
            }),
            81..=83 => self.call("bootstrap_tokens.create", || {
                let Some(instance) = pick(rng, &self.instance_ids) else { return Ok(Acted::NothingToActOn) };
                // One in four takes a nonce issued before, maybe used and
                // gone with its instance: refused (Conflict) while its
                // token lives or once it was used, so that `mark_used`
                // stays true once per nonce (checked at the end).
                let issued = if rng.random_range(0..4) == 0 { pick(rng, &self.nonces) } else { None };
                let nonce =
                    issued.unwrap_or_else(|| format!("nonce-{}", self.next_nonce.fetch_add(1, Ordering::Relaxed)));
                self.tokens.create(&instance, &Nonce::parse(&nonce)?)?;
                remember(&self.nonces, nonce);
                Ok(Acted::Yes)
            }),
            84..=88 => self.call("bootstrap_tokens.mark_used", || {
                let Some(nonce) = pick(rng, &self.nonces) else { return Ok(Acted::NothingToActOn) };
                if self.tokens.mark_used(&Nonce::parse(&nonce)?)? {
                    let returned = self.tick();
                    let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    used.entry(nonce).or_insert(Used { times: 0, first: returned }).times += 1;
                }
                Ok(Acted::Yes)
            }),
            89 => self.health(rng),
            130..=151 => self.kv_step(rng, &user),
            152 => self.burst(),
            _ => self.read(rng, &user, &cluster),
        }
    }

    /// `DataLayer::health()`, now alone, now from 2 threads at once (what a
    /// readiness and a liveness probe do): two calls at once used to
    /// report a healthy process not ready, the second told the first one's
    /// probe of the migrations had not answered yet. Nothing here makes the
    /// process unhealthy: primary, key-value backend and migrations are up,
    /// so in a run nothing disturbs every answer must be ready. While a
    /// disturbance ends the sessions or restarts the server, a not-ready
    /// answer is the right one: counted (`not ready`), not a violation.
    fn health(&self, rng: &mut StdRng) {
        if rng.random_bool(0.5) {
            self.call("data.health", || Ok(self.ready("data.health", &self.data.health())));
        } else {
            const OPERATION: &str = "data.health (2 at once)";
            self.call(OPERATION, || {
                let answers = at_once(2, || self.data.health());
                // Not ready if either was (each one checked).
                let acted = answers.iter().map(|health| self.ready(OPERATION, health)).collect::<Vec<_>>();
                Ok(acted.into_iter().find(|acted| matches!(acted, Acted::NotReady)).unwrap_or(Acted::Yes))
            });
        }
    }

    /// Whether `health` says ready; in a run nothing disturbs, a not-ready
    /// answer is a violation too, shown whole (each probe's error says why).
    fn ready(&self, operation: &'static str, health: &Health) -> Acted {
        if health.is_ready() {
            return Acted::Yes;
        }
        self.expect(operation, self.disturbed, || {
            format!("not ready in a run nothing disturbed (primary, kv and migrations are up): {health:?}")
        });
        Acted::NotReady
    }

    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::SeqCst)
    }

    /// The first sign-out that ended the session `id` (the tick it
    /// returned, and the operation), if one did and the session is still
    /// among those remembered.
    fn ended(&self, id: &SessionId) -> Option<(u64, &'static str)> {
        let sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.iter().find(|made| made.id == *id).and_then(|made| made.ended)
    }

    /// Marks the sessions `ends` picks as ended by `operation`, which
    /// returned at tick `returned` (unless a sign-out that returned earlier
    /// did), and gives them back.
    fn mark_ended(
        &self,
        operation: &'static str,
        returned: u64,
        ends: impl Fn(&MadeSession) -> bool,
    ) -> Vec<MadeSession> {
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ended = Vec::new();
        for made in sessions.iter_mut().filter(|made| ends(made)) {
            if made.ended.is_none_or(|(earlier, _)| returned < earlier) {
                made.ended = Some((returned, operation));
            }
            ended.push(made.clone());
        }
        ended
    }

    /// Records what a sign-out everywhere of `users`, begun at tick
    /// `started`, ended when it returned (just now): every session of theirs
    /// whose create returned before it began. (A sign-in that ran beside it
    /// may write its session after the sign-out looked: not its to end.)
    /// Then reads each back: none may load.
    fn record_sign_out(&self, operation: &'static str, users: &[UserId], started: u64) -> StoreResult<()> {
        let returned = self.tick();
        let ended = self.mark_ended(operation, returned, |made| users.contains(&made.user) && made.created < started);
        for MadeSession { id, user, .. } in ended {
            let left = self.kv.get_session(&id)?;
            self.expect(operation, left.is_none(), || {
                format!("a session of {user} made before the sign-out began still loads after it")
            });
        }
        Ok(())
    }

    /// A call that forgets the accounts `users` it signs out began at
    /// `started` (see `forgetters`); [`forgot`](Self::forgot) when it returns.
    fn forgetting(&self, users: &[UserId], started: u64) {
        let mut forgetters = self.forgetters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The last few hundred are enough to overlap any call still running.
        if forgetters.len() > 512 {
            forgetters.retain(|(_, _, returned)| *returned == u64::MAX);
        }
        forgetters.extend(users.iter().map(|user| (*user, started, u64::MAX)));
    }

    fn forgot(&self, started: u64, returned: u64) {
        let mut forgetters = self.forgetters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for entry in forgetters.iter_mut().filter(|(_, began, _)| *began == started) {
            entry.2 = returned;
        }
    }

    /// Whether a call other than the one begun at `own` that forgets
    /// accounts it signs out listed `user` and returned after `since` (or
    /// runs still).
    fn another_forgetter(&self, user: &UserId, own: u64, since: u64) -> bool {
        let forgetters = self.forgetters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        forgetters.iter().any(|(listed, began, returned)| listed == user && *began != own && *returned > since)
    }

    /// `DataLayer::remove_users`, recording the sign-outs it must have done:
    /// of the listed accounts deleted and not yet signed out when it began
    /// (by a store-level removal, or a call that failed half-way; an id never
    /// comes back, so they are still to sign out when it looks, unless
    /// another such call signed them out beside it; its answer `NotFound`,
    /// for a cluster gone, comes after that sign-out too). An account an
    /// earlier call signed out is not its to sign out again. Those it
    /// deletes itself cannot be told here from those another thread deletes
    /// beside it; the burst checks them on an invitee no other thread knows.
    fn remove_users_signing_out(&self, cluster: &ClusterId, ids: &[UserId]) -> StoreResult<()> {
        let started = self.tick();
        self.forgetting(ids, started);
        let pending = self.users.sessions_to_end(ids);
        let removed = pending.map(|pending| (pending, self.data.remove_users(cluster, ids)));
        let returned = self.tick();
        self.forgot(started, returned);
        let (pending, removed) = removed?;
        if let Ok(_) | Err(StoreError::NotFound { .. }) = removed {
            let owed: Vec<UserId> =
                pending.into_iter().filter(|user| !self.another_forgetter(user, started, started)).collect();
            self.record_sign_out("data.remove_users", &owed, started)?;
        }
        removed.map(drop)
    }

    /// One random call of the key-value store (sessions, OAuth states,
    /// one-time codes) or of a sign-out everywhere (`kv` alone, or
    /// `DataLayer::delete_user`), with what its answer must hold: a session
    /// read is its own user's; a session deleted, or a user's signed out
    /// everywhere (what was created before the sign-out started), does not
    /// load afterwards, at once or in any read begun after the sign-out
    /// returned; a state validates once; a code validates once, and never
    /// after a newer code for its e-mail was made in full.
    fn kv_step(&self, rng: &mut StdRng, user: &UserId) {
        match rng.random_range(0..22) {
            0..=3 => self.call("kv.create_session", || {
                // A sign-in: the user as the store has it now.
                let Some(found) = self.users.get(user)? else { return Ok(Acted::NothingToActOn) };
                let id = SessionId::generate();
                self.kv.create_session(&id, &found, Vec::new())?;
                let created = self.tick();
                remember(&self.sessions, MadeSession { id, user: found.id, created, ended: None });
                Ok(Acted::Yes)
            }),
            4..=7 => self.call("kv.get_session", || {
                let Some(MadeSession { id, user: owner, .. }) = pick(rng, &self.sessions) else {
                    return Ok(Acted::NothingToActOn);
                };
                let started = self.tick();
                let session = self.kv.get_session(&id)?;
                self.expect("kv.get_session", session.as_ref().is_none_or(|s| s.user_id == owner), || {
                    format!("a session of {owner} read as {:?}'s", session.as_ref().map(|s| s.user_id))
                });
                // A sign-out that returned before this read began ended it.
                let ended = self.ended(&id).filter(|(returned, _)| *returned < started);
                if let (Some(_), Some((_, by))) = (&session, ended) {
                    self.expect("kv.get_session", false, || {
                        format!("a session of {owner} loads in a read that began after {by} ended it")
                    });
                }
                Ok(Acted::Yes)
            }),
            8..=9 => self.call("kv.delete_session", || {
                let Some(MadeSession { id, user: owner, .. }) = pick(rng, &self.sessions) else {
                    return Ok(Acted::NothingToActOn);
                };
                self.kv.delete_session(&id)?;
                let returned = self.tick();
                self.mark_ended("kv.delete_session", returned, |made| made.id == id);
                let after = self.kv.get_session(&id)?;
                self.expect("kv.delete_session", after.is_none(), || {
                    format!("a session of {owner} loads after its delete")
                });
                Ok(Acted::Yes)
            }),
            10..=12 => {
                // Sign-out everywhere, half of the time with the account.
                let with_account = rng.random_bool(0.5);
                let operation = if with_account { "data.delete_user" } else { "kv.delete_user_sessions" };
                self.call(operation, || {
                    let started = self.tick();
                    if with_account {
                        self.forgetting(&[*user], started);
                    }
                    let signed_out =
                        if with_account { self.data.delete_user(user) } else { self.kv.delete_user_sessions(user) };
                    if with_account {
                        let returned = self.tick();
                        self.forgot(started, returned);
                    }
                    // delete_user's `NotFound` (a user already gone) comes
                    // after it ended their sessions all the same.
                    if let Ok(_) | Err(StoreError::NotFound { .. }) = signed_out {
                        self.record_sign_out(operation, &[*user], started)?;
                    }
                    signed_out.map(drop)
                });
            }
            // Now a new state, now a validation of one made by any thread;
            // each counted under its own name, so that the run's check that
            // every operation succeeded sees each.
            13..=15 if rng.random_bool(0.4) => self.call("kv.create_state", || {
                let state = OAuthState::generate();
                self.kv.create_state(&state, "/clusters")?;
                remember(&self.states, state);
                Ok(())
            }),
            13..=15 => self.call("kv.validate_state", || {
                let Some(state) = pick(rng, &self.states) else { return Ok(Acted::NothingToActOn) };
                if self.kv.validate_state(&state)?.is_some() {
                    *self
                        .states_taken
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(state.expose().to_owned())
                        .or_default() += 1;
                }
                Ok(Acted::Yes)
            }),
            16..=17 => self.call("kv.create_otp", || {
                let email = self.email(rng);
                let started = self.tick();
                let code = self.kv.create_otp(&email)?;
                let returned = self.tick();
                remember(&self.codes, (email, code, started, returned));
                Ok(())
            }),
            _ => self.call("kv.validate_otp", || {
                let Some((email, code, _, made)) = pick(rng, &self.codes) else { return Ok(Acted::NothingToActOn) };
                // Now and then a wrong guess, which counts as an attempt.
                let guess = if rng.random_bool(0.3) { OtpCode::new("ZZZZZZ") } else { code.clone() };
                let started = self.tick();
                if self.kv.validate_otp(&email, &guess)? {
                    let key = (email.as_str().to_owned(), guess.expose().to_owned());
                    *self
                        .codes_taken
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(key)
                        .or_default() += 1;
                    let replaced = self
                        .codes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .any(|(other, _, from, to)| *other == email && *from > made && *to < started);
                    self.expect("kv.validate_otp", !replaced, || {
                        format!("a code of {email} validated after a newer one was made in full")
                    });
                }
                Ok(Acted::Yes)
            }),
        }
    }

    /// One random read, whose answer is checked against what any single
    /// answer must hold, whatever the writes around it do: a read is one
    /// statement, so one snapshot.
    fn read(&self, rng: &mut StdRng, user: &UserId, cluster: &ClusterId) {
        match rng.random_range(0..20) {
            0 => self.call("users.get", || {
                let found = self.users.get(user)?;
                self.expect("users.get", found.as_ref().is_none_or(|found| found.id == *user), || {
                    format!("asked for {user}, got {found:?}")
                });
                Ok(())
            }),
            1 => self.call("users.get_by_email", || {
                let email = self.email(rng);
                let found = self.users.get_by_email(&email)?;
                self.expect("users.get_by_email", found.as_ref().is_none_or(|found| found.email == email), || {
                    format!("asked for {email}, got {found:?}")
                });
                Ok(())
            }),
            2 | 3 => self.call("clusters.get", || {
                let Some(found) = self.clusters.get(cluster)? else { return Ok(()) };
                let mut seen = std::collections::HashSet::new();
                let grouped = found.members.iter().all(|(role, members)| {
                    members.iter().all(|member| member.role == *role && seen.insert(member.user_id))
                        && members.is_sorted_by(|a, b| a.email.as_str() <= b.email.as_str())
                });
                self.expect(
                    "clusters.get",
                    found.id == *cluster && found.with_role(Role::Owner).len() == 1 && grouped,
                    || {
                        format!(
                            "asked for {cluster}: one owner, each member once, in its role's group by e-mail: {found:?}"
                        )
                    },
                );
                Ok(())
            }),
            4 | 5 => self.call("clusters.members", || {
                let page = self.clusters.members(cluster, &Page::first(5))?;
                let sorted = page.items.is_sorted_by(|a, b| {
                    (std::cmp::Reverse(a.role), a.email.as_str()) <= (std::cmp::Reverse(b.role), b.email.as_str())
                });
                let owner_first = page.items.first().is_none_or(|first| first.role == Role::Owner);
                let no_invited = page.items.iter().all(|member| member.role != Role::Invited);
                self.expect_page("clusters.members", &page, 5, sorted && owner_first && no_invited);
                if let Some(next) = page.next {
                    let page = self.clusters.members(cluster, &Page::after(next, 5))?;
                    let no_owner = page.items.iter().all(|member| !matches!(member.role, Role::Owner | Role::Invited));
                    self.expect("clusters.members", no_owner, || {
                        format!("a second page with the owner or an invitee: {page:?}")
                    });
                }
                Ok(())
            }),
            6 => self.call("clusters.invites", || {
                let page = self.clusters.invites(cluster, &Page::first(5))?;
                let sorted = page.items.is_sorted_by(|a, b| a.email.as_str() <= b.email.as_str());
                let invited = page.items.iter().all(|member| member.role == Role::Invited);
                self.expect_page("clusters.invites", &page, 5, sorted && invited);
                if let Some(next) = page.next {
                    let later = self.clusters.invites(cluster, &Page::after(next, 5))?;
                    let after = later.items.iter().all(|member| {
                        member.role == Role::Invited
                            && page.items.last().is_none_or(|last| last.email.as_str() < member.email.as_str())
                    });
                    self.expect("clusters.invites", after, || format!("a second page not after the first: {later:?}"));
                }
                Ok(())
            }),
            7 => self.call("clusters.pending_invites", || {
                let invites = self.clusters.pending_invites(user)?;
                let once = each_once(invites.iter().map(|invite| invite.cluster_id));
                self.expect("clusters.pending_invites", once, || format!("a cluster twice: {invites:?}"));
                Ok(())
            }),
            8 => self.call("clusters.owned_cluster", || self.clusters.owned_cluster(user).map(drop)),
            9 => self.call("clusters.user_clusters", || {
                let clusters = self.clusters.user_clusters(user)?;
                let once = each_once(clusters.iter().map(|summary| summary.id));
                self.expect("clusters.user_clusters", once, || format!("a cluster twice: {clusters:?}"));
                Ok(())
            }),
            10 => self.call("clusters.role_of", || self.clusters.role_of(user, cluster).map(drop)),
            11 => self.call("clusters.owner", || {
                let owner = self.clusters.owner(cluster)?;
                self.expect("clusters.owner", owner.as_ref().is_none_or(|owner| owner.role == Role::Owner), || {
                    format!("{owner:?}")
                });
                Ok(())
            }),
            12 => self.call("clusters.users_with_role", || {
                let role = *Role::ALL.choose(rng).unwrap_or(&Role::Owner);
                let members = self.clusters.users_with_role(cluster, role)?;
                let right = members.iter().all(|member| member.role == role)
                    && members.is_sorted_by(|a, b| a.email.as_str() <= b.email.as_str())
                    && (role != Role::Owner || members.len() <= 1);
                self.expect("clusters.users_with_role", right, || format!("{role:?}: {members:?}"));
                Ok(())
            }),
            13 => self.call("clusters.can_read", || self.clusters.can_read(user, cluster).map(drop)),
            14 => self.call("clusters.can_write", || self.clusters.can_write(user, cluster).map(drop)),
            15 => self.call("clusters.is_admin", || self.clusters.is_admin(user, cluster).map(drop)),
            16 => self.call("clusters.is_owner", || self.clusters.is_owner(user, cluster).map(drop)),
            17 => self.call("clusters.integrations", || self.clusters.integrations(cluster).map(drop)),
            18 if rng.random_bool(0.5) => self.call("instances.get", || {
                let Some(instance) = pick(rng, &self.instance_ids) else { return Ok(Acted::NothingToActOn) };
                let found = self.instances.get(&instance)?;
                self.expect("instances.get", found.as_ref().is_none_or(|found| found.id == instance), || {
                    format!("asked for {instance}, got {found:?}")
                });
                Ok(Acted::Yes)
            }),
            18 => self.call("instances.get_by_tag", || {
                let tag: Tag = format!("web-{}", rng.random_range(0..40)).try_into()?;
                let found = self.instances.get_by_tag(&tag)?;
                let right = found.as_ref().is_none_or(|found| found.tag == tag.as_str());
                self.expect("instances.get_by_tag", right, || format!("asked for tag {tag}, got {found:?}"));
                Ok(())
            }),
            _ => {
                if rng.random_bool(0.3) {
                    return self.call("bootstrap_tokens.is_used", || {
                        let Some(nonce) = pick(rng, &self.nonces) else { return Ok(Acted::NothingToActOn) };
                        let started = self.tick();
                        let used = self.tokens.is_used(&Nonce::parse(&nonce)?)?;
                        // A token `mark_used` took before this read began
                        // is used; one deleted since is unknown, which
                        // counts as used too: `true` either way.
                        let marked =
                            self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&nonce).copied();
                        let marked_before = marked.is_some_and(|marked| marked.first < started);
                        self.expect("bootstrap_tokens.is_used", used || !marked_before, || {
                            format!("{nonce}: mark_used returned true before this read began, which says unused")
                        });
                        Ok(Acted::Yes)
                    });
                }
                self.call("instances.list_by_cluster", || {
                    let page = self.instances.list_by_cluster(cluster, &Page::first(5))?;
                    let right = page.items.iter().all(|instance| instance.cluster_id == *cluster)
                        && page.items.is_sorted_by(|a, b| a.created_at >= b.created_at);
                    self.expect_page("instances.list_by_cluster", &page, 5, right);
                    if let Some(next) = page.next {
                        let later = self.instances.list_by_cluster(cluster, &Page::after(next, 5))?;
                        let after = later.items.iter().all(|instance| {
                            instance.cluster_id == *cluster
                                && page.items.last().is_none_or(|last| {
                                    (last.created_at, last.id.to_string())
                                        > (instance.created_at, instance.id.to_string())
                                })
                        });
                        self.expect("instances.list_by_cluster", after, || {
                            format!("a second page not after the first: {later:?}")
                        });
                    }
                    Ok(())
                });
            }
        }
    }

    /// Records a violation of what `operation`'s answer must hold.
    fn expect(&self, operation: &'static str, holds: bool, seen: impl FnOnce() -> String) {
        if !holds {
            self.answer_violations.fetch_add(1, Ordering::Relaxed);
            let mut kept = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.len() < 20 {
                kept.push(format!("{operation}: {}", seen()));
            }
        }
    }

    /// What every first page of `limit` must hold, besides `holds`: no more
    /// items than the limit or the total, a cursor only after a full page
    /// and, without one, a total that counts exactly the items given (the
    /// page and its total are one statement, so one snapshot).
    fn expect_page<T: fmt::Debug>(&self, operation: &'static str, page: &Paged<T>, limit: usize, holds: bool) {
        let len = page.items.len() as u64;
        let counted = match page.next {
            Some(_) => page.items.len() == limit && page.total > len,
            None => page.total == len,
        };
        self.expect(operation, holds && page.items.len() <= limit && counted, || format!("{page:?}"));
    }

    /// Races on purpose, now and then: a user of a fresh e-mail asks for its
    /// cluster from 4 threads at once (all must get one cluster, the one
    /// `owned_cluster` names), then a fresh token of a fresh instance in that
    /// cluster is marked used from 8 threads at once (exactly one `true`).
    /// Then, with nothing racing: the user signs in with a blank picture
    /// (the one given before stays), an invitee of the cluster signs in and
    /// is removed by `DataLayer::remove_users`, and a fresh e-mail's code is
    /// guessed wrong from 8 threads at once, then right.
    /// No other thread knows those e-mails, users, cluster, instance or nonce
    /// (the workload draws from its own lists, by id, e-mail, tag and nonce),
    /// so nothing else touches them and the answers owe nothing to the rest
    /// of the workload. The cluster and the user are deleted afterwards.
    fn burst(&self) {
        let serial = self.bursts.fetch_add(1, Ordering::Relaxed);
        let mut made: Option<(UserId, Option<ClusterId>)> = None;
        self.call("clusters.create_for_owner (4 at once)", || {
            let email = Email::parse(&format!("burst{serial}@stress.example"))?;
            let user = self.users.upsert(NewUser::new(email, Provider::Google))?.id;
            made = Some((user, None));
            let answers = at_once(4, || self.clusters.create_for_owner(&user).map(|cluster| cluster.id));
            let ids: BTreeSet<ClusterId> = answers.iter().filter_map(|answer| answer.as_ref().ok()).copied().collect();
            // A call that lost its connection (a disturbance) may have
            // committed or not; those that answered agree all the same.
            let Some(&cluster) = ids.first() else {
                return answers.into_iter().find_map(Result::err).map_or(Ok(()), Err);
            };
            for lost in answers.iter().filter_map(|answer| answer.as_ref().err()) {
                self.got_past("clusters.create_for_owner (4 at once)", lost);
            }
            made = Some((user, Some(cluster)));
            self.expect("clusters.create_for_owner (4 at once)", ids.len() == 1, || {
                format!("4 calls at once for {user} gave {} clusters: {ids:?}", ids.len())
            });
            let owned = self.clusters.owned_cluster(&user)?.map(|summary| summary.id);
            self.expect("clusters.create_for_owner (4 at once)", owned == Some(cluster), || {
                format!("4 calls at once for {user} gave {cluster}, owned_cluster gives {owned:?}")
            });
            Ok(())
        });
        let Some((user, cluster)) = made else { return };
        self.call("bootstrap_tokens.mark_used (8 at once)", || {
            let Some(cluster) = cluster else { return Ok(Acted::NothingToActOn) };
            let new = NewInstance {
                address: format!("10.1.{}.{}", serial / 250 % 250, serial % 250).try_into()?,
                tag: format!("burst-{serial}").try_into()?,
                metadata: None,
            };
            let instance = self.instances.create(&cluster, new)?;
            let nonce = Nonce::parse(&format!("burst-{serial}"))?;
            self.tokens.create(&instance.id, &nonce)?;
            let answers = at_once(8, || self.tokens.mark_used(&nonce));
            let trues = answers.iter().filter(|answer| matches!(answer, Ok(true))).count();
            // A call that lost its connection may have marked it unseen:
            // then none of those that answered says true.
            let all_answered = answers.iter().all(Result::is_ok);
            self.expect("bootstrap_tokens.mark_used (8 at once)", trues == 1 || (trues == 0 && !all_answered), || {
                format!("8 calls at once for {nonce:?} answered {answers:?}")
            });
            // The first error is the call's answer when none said true; the
            // others (all of them, otherwise) were got past.
            let mut lost = answers.into_iter().filter_map(Result::err);
            let answer = if trues == 0 { lost.next() } else { None };
            for error in lost {
                self.got_past("bootstrap_tokens.mark_used (8 at once)", &error);
            }
            answer.map_or(Ok(Acted::Yes), Err)
        });
        self.call("users.upsert (a blank picture)", || {
            // The burst's user, whom no other thread knows: exactly what
            // the store documents, a blank picture keeps the stored one.
            let email = Email::parse(&format!("burst{serial}@stress.example"))?;
            let picture = format!("https://example.io/burst{serial}.png");
            let given = NewUser { picture: Some(picture.clone()), ..NewUser::new(email.clone(), Provider::Google) };
            self.users.upsert(given)?;
            let blank = if serial.is_multiple_of(2) { "" } else { "   " };
            let again = NewUser { picture: Some(blank.to_owned()), ..NewUser::new(email, Provider::Google) };
            let found = self.users.upsert(again)?;
            self.expect("users.upsert (a blank picture)", found.picture.as_deref() == Some(picture.as_str()), || {
                format!("signed in with {picture}, then with {blank:?}: the picture is {:?}", found.picture)
            });
            Ok(())
        });
        self.call("data.remove_users (a signed-in invitee)", || self.remove_a_signed_in_invitee(serial, cluster));
        self.call("kv.validate_otp (8 wrong guesses at once)", || self.spend_a_code(serial));
        // Clean-up, so bursts do not pile up rows for every sample to scan.
        if let Some(cluster) = cluster {
            self.call("clusters.delete", || self.clusters.delete(&cluster));
        }
        self.call("users.delete", || self.users.delete(&user));
    }

    /// An invitee of the burst's `cluster` (an account the invitation made,
    /// provider `email`, in no other cluster: no other thread knows its
    /// e-mail or id) signs in, then `DataLayer::remove_users` removes it:
    /// the account is deleted and its one session ended, so it never loads
    /// again. A call that lost its connection is finished by calling again
    /// with the same ids, as `remove_users` documents.
    fn remove_a_signed_in_invitee(&self, serial: u64, cluster: Option<ClusterId>) -> StoreResult<Acted> {
        const OPERATION: &str = "data.remove_users (a signed-in invitee)";
        let Some(cluster) = cluster else { return Ok(Acted::NothingToActOn) };
        let email = Email::parse(&format!("burst{serial}-guest@stress.example"))?;
        let invited = self.clusters.add_users(&cluster, &[email])?;
        let Some(guest) = invited.first().map(|member| member.user_id) else {
            self.expect(OPERATION, false, || format!("invited one e-mail to {cluster}, got {invited:?}"));
            return Ok(Acted::Yes);
        };
        let Some(account) = self.users.get(&guest)? else { return Ok(Acted::NothingToActOn) };
        let id = SessionId::generate();
        self.kv.create_session(&id, &account, Vec::new())?;
        let started = self.tick();
        let mut removed = self.data.remove_users(&cluster, &[guest]);
        let first = removed.as_ref().ok().copied();
        for _ in 0..3 {
            let Err(lost @ StoreError::Unavailable { .. }) = &removed else { break };
            self.got_past(OPERATION, lost);
            removed = self.data.remove_users(&cluster, &[guest]);
        }
        removed?;
        let returned = self.tick();
        remember(
            &self.sessions,
            MadeSession { id: id.clone(), user: guest, created: started, ended: Some((returned, OPERATION)) },
        );
        // A first call that answered ended the one session (a retry may
        // find it ended already).
        if let Some(ended) = first {
            self.expect(OPERATION, ended == 1, || {
                format!("removing {guest} from {cluster} ended {ended} sessions, not 1")
            });
        }
        let account = self.users.get(&guest)?;
        self.expect(OPERATION, account.is_none(), || {
            format!("the invitee {guest} is still there after its removal: {account:?}")
        });
        let session = self.kv.get_session(&id)?;
        self.expect(OPERATION, session.is_none(), || format!("a session of the removed invitee {guest} still loads"));
        Ok(Acted::Yes)
    }

    /// A one-time code of an e-mail no other thread knows, guessed wrong by
    /// 8 threads at once (more than the limit of guesses), then right: no
    /// two guesses were given one count, so at most the limit were compared
    /// (as [`ObservedKv`] sees them), no wrong one was taken, and the
    /// right one, counted past the limit, is refused. A guess that lost its
    /// connection may have been counted unseen: the right one is then
    /// refused all the same once the limit's worth answered.
    fn spend_a_code(&self, serial: u64) -> StoreResult<()> {
        const OPERATION: &str = "kv.validate_otp (8 wrong guesses at once)";
        let email = Email::parse(&format!("burst{serial}-otp@stress.example"))?;
        let code = self.kv.create_otp(&email)?;
        let wrong = OtpCode::new(if code.expose() == "ZZZZZZ" { "YYYYYY" } else { "ZZZZZZ" });
        let guesses = at_once(8, || (self.kv.validate_otp(&email, &wrong), last_attempt()));
        for (answer, _) in &guesses {
            if let Err(lost) = answer {
                self.got_past(OPERATION, lost);
            }
        }
        let limit = i64::from(self.otp_max_attempts);
        let counts: Vec<i64> = guesses.iter().filter_map(|(_, attempt)| attempt.map(|(count, _)| count)).collect();
        let compared = guesses.iter().filter(|(_, attempt)| attempt.is_some_and(|(count, max)| count <= max)).count();
        let right = guesses
            .iter()
            .all(|(answer, attempt)| !matches!(answer, Ok(true)) && attempt.is_none_or(|(_, max)| max == limit))
            && each_once(&counts)
            && compared as i64 <= limit;
        self.expect(OPERATION, right, || {
            format!("8 wrong guesses at once of a code with {limit} allowed: {guesses:?}")
        });
        last_attempt();
        let taken = self.kv.validate_otp(&email, &code)?;
        let attempt = last_attempt();
        if counts.len() as i64 >= limit {
            let refused = !taken && attempt.is_some_and(|(count, max)| count > max);
            self.expect(OPERATION, refused, || {
                format!("the right code after {} wrong guesses answered: {taken}, counted {attempt:?}", counts.len())
            });
        }
        Ok(())
    }

    /// Keeps some users and clusters alive for the workers to pick.
    fn replenish(&self, rng: &mut StdRng) {
        self.call("users.upsert", || {
            let user = self.users.upsert(NewUser::new(self.email(rng), Provider::Google))?;
            remember(&self.user_ids, user.id);
            if self.cluster_ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() < self.target_clusters {
                let cluster = self.clusters.create_for_owner(&user.id)?;
                remember(&self.cluster_ids, cluster.id);
            }
            Ok(())
        });
    }
}

/// One checker sample: clusters whose owner count is not one (with the
/// count), memberships of a missing user or cluster, instances of a missing
/// cluster and tokens of a missing instance, clusters whose listing
/// totals (`cluster_counts`, what every page reports) differ from a
/// `count(*)` of the rows, memberships whose copy of the user's e-mail,
/// name or picture differs from the user's, and rows whose `updated_at` is
/// before their `created_at`.
#[derive(QueryableByName)]
struct Sample {
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    bad_owners: Option<String>,
    #[diesel(sql_type = BigInt)]
    orphans: i64,
    #[diesel(sql_type = BigInt)]
    orphan_instances: i64,
    #[diesel(sql_type = BigInt)]
    orphan_tokens: i64,
    #[diesel(sql_type = BigInt)]
    tokens_of_spent_nonces: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    bad_totals: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    stale_copies: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    updated_before_created: Option<String>,
}

const SAMPLE: &str = "SELECT
    (SELECT string_agg(c.id || ' has ' || n || ' owners', ', ')
       FROM (SELECT c.id, (SELECT count(*) FROM user_clusters m WHERE m.cluster_id = c.id AND m.role = 'owner') AS n
               FROM clusters c) c
      WHERE n <> 1) AS bad_owners,
    (SELECT count(*) FROM user_clusters m
      WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = m.user_id)
         OR NOT EXISTS (SELECT 1 FROM clusters c WHERE c.id = m.cluster_id)) AS orphans,
    (SELECT count(*) FROM instances i
      WHERE NOT EXISTS (SELECT 1 FROM clusters c WHERE c.id = i.cluster_id)) AS orphan_instances,
    (SELECT count(*) FROM bootstrap_tokens t
      WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = t.instance_id)) AS orphan_tokens,
    (SELECT count(*) FROM bootstrap_tokens t JOIN spent_nonces s USING (nonce)) AS tokens_of_spent_nonces,
    (SELECT string_agg(format('%s counts %s/%s/%s members/invites/instances, has %s/%s/%s',
                              c.id, t.members, t.invites, t.instances, r.members, r.invites, r.instances), ', ')
       FROM clusters c
       LEFT JOIN cluster_counts t ON t.cluster_id = c.id
       CROSS JOIN LATERAL (
           SELECT (SELECT count(*) FROM user_clusters m WHERE m.cluster_id = c.id AND m.role <> 'invited') AS members,
                  (SELECT count(*) FROM user_clusters m WHERE m.cluster_id = c.id AND m.role = 'invited') AS invites,
                  (SELECT count(*) FROM instances i WHERE i.cluster_id = c.id) AS instances) r
      WHERE (t.members, t.invites, t.instances) IS DISTINCT FROM (r.members, r.invites, r.instances)) AS bad_totals,
    (SELECT string_agg(format('%s in %s shows %s/%s, the user is %s/%s',
                              m.user_id, m.cluster_id, m.name, m.picture, u.name, u.picture), ', ')
       FROM user_clusters m
       JOIN users u ON u.id = m.user_id
      WHERE (m.email, m.name, m.picture) IS DISTINCT FROM (u.email, u.name, u.picture)) AS stale_copies,
    (SELECT string_agg(format('%s %s updated at %s, created at %s', t, k, updated_at, created_at), ', ')
       FROM (SELECT 'user' AS t, id AS k, created_at, updated_at FROM users
             UNION ALL SELECT 'cluster', id, created_at, updated_at FROM clusters
             UNION ALL SELECT 'membership', user_id || ' in ' || cluster_id, created_at, updated_at FROM user_clusters
             UNION ALL SELECT 'instance', id, created_at, updated_at FROM instances
             UNION ALL SELECT 'token', nonce, created_at, updated_at FROM bootstrap_tokens) AS rows
      WHERE updated_at < created_at) AS updated_before_created";

/// Ends every session of the database but the caller's, as a server
/// restart (or an administrator) does.
const TERMINATE_OTHERS: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid()";

/// The database invariants broken at this moment in the database `conn`
/// is connected to, one line each (none when all hold), from one statement,
/// so one snapshot: a live cluster without exactly one owner, memberships of
/// a missing user or cluster, instances of a missing cluster, tokens of a
/// missing instance, tokens holding a spent nonce, listing totals that differ from a `count(*)`,
/// memberships whose copy of the user's profile is not the user's, rows
/// updated before they were created.
///
/// # Panics
/// When the statement fails: a harness, not a store.
pub fn broken_invariants(conn: &mut PgConnection) -> Vec<String> {
    try_broken_invariants(conn).expect("a checker sample")
}

/// [`broken_invariants`], with the statement's error (a server that went
/// away) given back.
fn try_broken_invariants(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    let sample: Sample = diesel::sql_query(SAMPLE).get_result(conn)?;
    let mut broken = Vec::new();
    broken.extend(sample.bad_owners);
    if sample.orphans > 0 {
        broken.push(format!("{} memberships of a missing user or cluster", sample.orphans));
    }
    if sample.orphan_instances > 0 {
        broken.push(format!("{} instances of a missing cluster", sample.orphan_instances));
    }
    if sample.orphan_tokens > 0 {
        broken.push(format!("{} bootstrap tokens of a missing instance", sample.orphan_tokens));
    }
    if sample.tokens_of_spent_nonces > 0 {
        broken.push(format!(
            "{} bootstrap tokens hold the nonce of a used token that was deleted (usable twice)",
            sample.tokens_of_spent_nonces
        ));
    }
    broken.extend(sample.bad_totals.map(|bad| format!("listing totals: {bad}")));
    broken.extend(sample.stale_copies.map(|stale| format!("membership copies of a profile: {stale}")));
    broken.extend(sample.updated_before_created.map(|rows| format!("updated before created: {rows}")));
    Ok(broken)
}

/// Every row's identity and update time, for [`History`]: the table, the
/// key, when the row was created and last updated (microseconds since 1970,
/// exact: `extract` gives a `numeric`), and for a membership its role, for
/// a user their e-mail. The key-value entries are left out: sessions pile up
/// over a run, and the table of each is scanned every 10 ms.
const STAMPS: &str = "SELECT kind, key,
       (extract(epoch FROM created_at) * 1000000)::bigint AS created,
       (extract(epoch FROM updated_at) * 1000000)::bigint AS updated,
       detail
  FROM (SELECT 'user' AS kind, id AS key, created_at, updated_at, email AS detail FROM users
        UNION ALL SELECT 'cluster', id, created_at, updated_at, NULL FROM clusters
        UNION ALL SELECT 'membership', user_id || ' in ' || cluster_id, created_at, updated_at, role
                    FROM user_clusters
        UNION ALL SELECT 'instance', id, created_at, updated_at, NULL FROM instances
        UNION ALL SELECT 'token', nonce, created_at, updated_at, NULL FROM bootstrap_tokens) AS rows";

#[derive(QueryableByName)]
struct Stamp {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    created: i64,
    #[diesel(sql_type = BigInt)]
    updated: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    detail: Option<String>,
}

/// A row as the last sample saw it.
struct Seen {
    updated: i64,
    /// A membership with the role `invited`.
    invited: bool,
}

/// The most user ids whose e-mail [`History`] remembers (the oldest are
/// forgotten first): a long run signs in and deletes users without end.
const EMAILS_REMEMBERED: usize = 10_000;

/// What the checker remembers between its samples, to check what only
/// moves one way, whatever commits between two samples:
/// - a row's `updated_at` never decreases (the trigger of
///   `008_update_times`);
/// - a membership once seen past `invited` is never `invited` again (the
///   trigger `user_clusters_no_return_to_invited`); every sample since
///   saw it (or it would be forgotten), so the last one's role is enough
///   to compare with, and a return is reported once;
/// - a user id always has the same e-mail (`users_email_immutable`; ids
///   are never reused).
///
/// A row is one (table, key, `created_at`): a membership removed and made
/// again is a new one, which may be invited. Rows absent from a sample are
/// forgotten, which keeps this bounded by the rows alive, and leaves only
/// one way to mistake a new row for an old one: removed and made again
/// between two samples 10 ms apart by a transaction that began in the same
/// microsecond as the first one's (`created_at` is `now()`). E-mails are
/// remembered past their user's deletion, up to [`EMAILS_REMEMBERED`] ids.
#[derive(Default)]
struct History {
    rows: HashMap<(String, String, i64), Seen>,
    emails: HashMap<String, String>,
    emails_in_order: VecDeque<String>,
}

impl History {
    /// Takes one sample of [`STAMPS`]: what broke since the last one, one
    /// line each. A statement of its own: what it checks compares samples,
    /// so it needs no snapshot in common with the other checks.
    fn sample(&mut self, conn: &mut PgConnection) -> QueryResult<Vec<String>> {
        let stamps: Vec<Stamp> = diesel::sql_query(STAMPS).load(conn)?;
        let mut broken = Vec::new();
        let mut rows = HashMap::with_capacity(stamps.len());
        for Stamp { kind, key, created, updated, detail } in stamps {
            let invited = kind == "membership" && detail.as_deref() == Some(Role::Invited.as_str());
            let identity = (kind, key, created);
            let (kind, key, _) = &identity;
            if let Some(before) = self.rows.get(&identity) {
                if updated < before.updated {
                    broken.push(format!(
                        "{kind} {key}: updated_at went back from {} to {}",
                        micros_text(before.updated),
                        micros_text(updated)
                    ));
                }
                if !before.invited && invited {
                    broken.push(format!("membership {key}: invited again after it was seen joined"));
                }
            }
            if kind == "user"
                && let Some(email) = detail
            {
                match self.emails.get(key) {
                    Some(before) if *before != email => {
                        broken.push(format!("user {key}: e-mail {before}, then {email}"));
                        // Reported once, not again in every sample after.
                        self.emails.insert(key.clone(), email);
                    }
                    Some(_) => {}
                    None => {
                        if self.emails_in_order.len() >= EMAILS_REMEMBERED
                            && let Some(oldest) = self.emails_in_order.pop_front()
                        {
                            self.emails.remove(&oldest);
                        }
                        self.emails_in_order.push_back(key.clone());
                        self.emails.insert(key.clone(), email);
                    }
                }
            }
            rows.insert(identity, Seen { updated, invited });
        }
        self.rows = rows;
        Ok(broken)
    }
}

/// Microseconds since 1970 as a time, for a violation's text.
fn micros_text(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros).map_or_else(|| micros.to_string(), |time| time.to_rfc3339())
}

/// The page sizes of the checker's walks, one drawn per walk: small, so
/// that a listing takes several pages, each after the last one's cursor.
/// The mix keeps its listings short (a few rows each: a cluster's users
/// come and go, and its instances go with it), so sizes down to 1 are
/// what make most walks follow a cursor at all; 7 crosses longer ones.
const WALK_PAGES: [u32; 4] = [1, 2, 3, 7];

/// The most pages a walk follows: a listing whose cursors never end is
/// reported, not followed for ever.
const WALK_MOST_PAGES: usize = 1_000;

/// How often the checker pauses the workers for a quiet moment, and how
/// many clusters it walks then (every cluster at the end of the run).
const QUIET_EVERY: Duration = Duration::from_secs(1);

/// The two listings the checker walks, as its report names them.
const MEMBERS_WALK: &str = "clusters.members (walked by the checker)";
const INSTANCES_WALK: &str = "instances.list_by_cluster (walked by the checker)";

/// The rows of the two walked listings of cluster `$1`, from one
/// statement, so one snapshot: members (every role but `invited`) by user
/// id with their role, instances by id; each with when it was created and
/// last updated (microseconds, exact, as in [`STAMPS`]). A real change of
/// a row always moves its `updated_at` forward (`008_update_times`), so a
/// row the same in two of these reads was not written between them.
const LISTED: &str = "SELECT kind, key,
       (extract(epoch FROM created_at) * 1000000)::bigint AS created,
       (extract(epoch FROM updated_at) * 1000000)::bigint AS updated,
       detail
  FROM (SELECT 'members' AS kind, user_id AS key, created_at, updated_at, role AS detail
          FROM user_clusters WHERE cluster_id = $1 AND role <> 'invited'
        UNION ALL SELECT 'instances', id, created_at, updated_at, NULL
          FROM instances WHERE cluster_id = $1) AS rows";

/// A row of a walked listing as a statement of the checker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedRow {
    created: i64,
    updated: i64,
    /// A membership's role.
    role: Option<String>,
}

/// The rows of one listing by key (a member's user id, an instance's id).
type Rows = BTreeMap<String, ListedRow>;

/// Both walked listings of a cluster at one snapshot ([`LISTED`]).
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    members: Rows,
    instances: Rows,
}

fn listed(conn: &mut PgConnection, cluster: &ClusterId) -> QueryResult<Listed> {
    let stamps: Vec<Stamp> = diesel::sql_query(LISTED).bind::<Text, _>(cluster.to_string()).load(conn)?;
    let mut listed = Listed { members: Rows::new(), instances: Rows::new() };
    for Stamp { kind, key, created, updated, detail } in stamps {
        let rows = if kind == "members" { &mut listed.members } else { &mut listed.instances };
        rows.insert(key, ListedRow { created, updated, role: detail });
    }
    Ok(listed)
}

/// Live clusters to walk: the one with the longest listings (what takes
/// the most pages) and one drawn at random, or every one (`all`).
fn some_clusters(conn: &mut PgConnection, all: bool) -> QueryResult<Vec<ClusterId>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = Text)]
        id: String,
    }
    let query = if all {
        "SELECT id FROM clusters"
    } else {
        "(SELECT c.id FROM clusters c LEFT JOIN cluster_counts t ON t.cluster_id = c.id
           ORDER BY coalesce(t.members + t.instances, 0) DESC LIMIT 1)
         UNION (SELECT id FROM clusters ORDER BY random() LIMIT 1)"
    };
    let ids: Vec<Id> = diesel::sql_query(query).load(conn)?;
    Ok(ids.into_iter().filter_map(|Id { id }| id.parse().ok()).collect())
}

/// An item a walk was given: its key, role (a member's) and creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Item {
    key: String,
    role: Option<String>,
    created: i64,
}

/// What a walk of one listing was given, page after page.
#[derive(Debug, Default)]
struct Walked {
    items: Vec<Item>,
    /// Each page's total.
    totals: Vec<u64>,
    /// Whether a page without a cursor came (within [`WALK_MOST_PAGES`]).
    ended: bool,
}

/// Walks a listing from its first page, each next page after the last
/// one's cursor, `size` items a page, until a page has no cursor.
fn walk<T>(
    size: u32,
    mut page: impl FnMut(&Page) -> StoreResult<Paged<T>>,
    item: impl Fn(&T) -> Item,
) -> StoreResult<Walked> {
    let mut walked = Walked::default();
    let mut request = Page::first(size);
    while walked.totals.len() < WALK_MOST_PAGES {
        let answer = page(&request)?;
        walked.totals.push(answer.total);
        walked.items.extend(answer.items.iter().map(&item));
        let Some(next) = answer.next else {
            walked.ended = true;
            break;
        };
        request = Page::after(next, size);
    }
    Ok(walked)
}

/// Why a walk gave no verdict: the checker's own statement failed, or a
/// page of the listing `.0`.
enum WalkFailed {
    Checker(diesel::result::Error),
    Store(&'static str, StoreError),
}

impl From<diesel::result::Error> for WalkFailed {
    fn from(error: diesel::result::Error) -> Self {
        WalkFailed::Checker(error)
    }
}

/// Both listings of `cluster` walked through the stores, between two reads
/// of its rows on the checker's connection (before the first page began,
/// after the last page returned).
fn walk_both(world: &World, conn: &mut PgConnection, cluster: &ClusterId, size: u32) -> Result<[Walk; 2], WalkFailed> {
    let before = listed(conn, cluster)?;
    let members = walk(
        size,
        |page| world.clusters.members(cluster, page),
        |member| Item {
            key: member.user_id.to_string(),
            role: Some(member.role.as_str().to_owned()),
            created: member.since.timestamp_micros(),
        },
    )
    .map_err(|error| WalkFailed::Store(MEMBERS_WALK, error))?;
    let instances = walk(
        size,
        |page| world.instances.list_by_cluster(cluster, page),
        |instance| Item { key: instance.id.to_string(), role: None, created: instance.created_at.timestamp_micros() },
    )
    .map_err(|error| WalkFailed::Store(INSTANCES_WALK, error))?;
    let after = listed(conn, cluster)?;
    Ok([
        // A member's key in the listing (rank, e-mail) moves when its role
        // changes; an instance's (creation time, id) never does.
        Walk { listing: MEMBERS_WALK, walked: members, before: before.members, after: after.members, key_fixed: false },
        Walk {
            listing: INSTANCES_WALK,
            walked: instances,
            before: before.instances,
            after: after.instances,
            key_fixed: true,
        },
    ])
}

/// One listing walked, with its rows read before and after the walk.
struct Walk {
    listing: &'static str,
    walked: Walked,
    before: Rows,
    after: Rows,
    /// Whether no write moves a row within the listing's order.
    key_fixed: bool,
}

impl Walk {
    /// What this walk must hold whatever the workers commit between its
    /// pages (each page is one statement, so one snapshot, but the pages
    /// are not one): a keyset walk goes on strictly after the key of the
    /// last item given, so
    /// - no item comes twice (the same row, in the same role): to come
    ///   again, a row's key must have moved past the cursor, which only a
    ///   member's change of role does, and then it comes in another role;
    /// - a row there from before the walk began to after it ended, and not
    ///   moved in the listing's order meanwhile, is given exactly once: its
    ///   key was the same in every page's snapshot, and each page covers
    ///   the keys from the last cursor on. An instance never moves; a
    ///   member is known not to have moved when its row is exactly the
    ///   same in both reads (a real change moves `updated_at` forward).
    ///
    /// Not its totals or its count: rows come and go between the pages, so
    /// no two pages need agree on one. The exact count is what a quiet
    /// walk checks ([`Walk::quiet`]). Gives what broke, and how many rows
    /// were there, unmoved, throughout.
    fn racing(&self, cluster: &ClusterId) -> (Vec<String>, u64) {
        let Walk { listing, walked, before, after, key_fixed } = self;
        let mut broken = self.common(cluster);
        let mut untouched = 0;
        for (key, row) in before {
            let kept =
                after.get(key).is_some_and(|now| if *key_fixed { now.created == row.created } else { now == row });
            if !kept {
                continue;
            }
            untouched += 1;
            let given = walked.items.iter().filter(|item| item.key == *key).count();
            if given != 1 {
                broken.push(format!(
                    "{listing} of {cluster}: {key}, there and unmoved from before the walk to after it ({row:?}), \
                     was given {given} times in {} pages",
                    walked.totals.len()
                ));
            }
        }
        (broken, untouched)
    }

    /// What this walk must hold when nothing was written while it ran (the
    /// workers paused, or done): its rows the same before and after it;
    /// the pages together give each row of the table exactly once and
    /// nothing else, as many as a `count(*)` (the rows read) and as every
    /// page's total says.
    fn quiet(&self, cluster: &ClusterId) -> Vec<String> {
        let Walk { listing, walked, before, after, .. } = self;
        let mut broken = self.common(cluster);
        if before != after {
            broken.push(format!(
                "{listing} of {cluster}: rows written during a quiet moment: {before:?}, then {after:?}"
            ));
        }
        let given: BTreeSet<&str> = walked.items.iter().map(|item| item.key.as_str()).collect();
        let missing: Vec<&String> = before.keys().filter(|key| !given.contains(key.as_str())).collect();
        let extra: Vec<&&str> = given.iter().filter(|key| !before.contains_key(**key)).collect();
        if !missing.is_empty() || !extra.is_empty() || given.len() != walked.items.len() {
            broken.push(format!(
                "{listing} of {cluster}: {} pages gave {} items, {} of them distinct, of the {} rows; missing \
                 {missing:?}, not rows {extra:?}",
                walked.totals.len(),
                walked.items.len(),
                given.len(),
                before.len()
            ));
        }
        let count = before.len() as u64;
        if walked.totals.iter().any(|total| *total != count) {
            broken
                .push(format!("{listing} of {cluster}: pages gave the totals {:?}, a count(*) {count}", walked.totals));
        }
        broken
    }

    /// What any walk must hold: it ended, and no item came twice.
    fn common(&self, cluster: &ClusterId) -> Vec<String> {
        let Walk { listing, walked, .. } = self;
        let mut broken = Vec::new();
        if !walked.ended {
            broken.push(format!("{listing} of {cluster}: still a cursor after {WALK_MOST_PAGES} pages"));
        }
        let mut times: HashMap<&Item, usize> = HashMap::new();
        for item in &walked.items {
            *times.entry(item).or_default() += 1;
        }
        for (item, times) in times.into_iter().filter(|(_, times)| *times > 1) {
            broken.push(format!("{listing} of {cluster}: {item:?} given {times} times in one walk"));
        }
        broken
    }
}

impl World {
    /// Walks both listings of `cluster`, pages of `size`, and checks them:
    /// exactly when `quiet` (the caller made sure nothing writes:
    /// [`Walk::quiet`]), else for what holds whatever the writes beside
    /// them commit ([`Walk::racing`]).
    fn walk_cluster(
        &self,
        conn: &mut PgConnection,
        cluster: &ClusterId,
        size: u32,
        quiet: bool,
        walks: &mut Walks,
    ) -> Result<Vec<String>, WalkFailed> {
        let mut broken = Vec::new();
        for walk in walk_both(self, conn, cluster, size)? {
            let pages = walk.walked.totals.len() as u64;
            walks.largest = walks.largest.max(walk.before.len() as u64);
            if quiet {
                broken.extend(walk.quiet(cluster));
                walks.quiet += 1;
                walks.quiet_pages += pages;
                walks.quiet_rows += walk.before.len() as u64;
            } else {
                let (seen, kept) = walk.racing(cluster);
                broken.extend(seen);
                walks.racing += 1;
                walks.racing_pages += pages;
                walks.racing_rows_kept += kept;
            }
        }
        Ok(broken)
    }

    /// Walks the listings of a few live clusters, or of every one (`all`),
    /// pages of a size drawn from [`WALK_PAGES`] per cluster, checked as
    /// [`World::walk_cluster`] does, and gives what broke.
    fn walk_clusters(
        &self,
        conn: &mut PgConnection,
        url: &str,
        rng: &mut StdRng,
        (all, quiet): (bool, bool),
        walks: &mut Walks,
    ) -> Vec<String> {
        let clusters = match some_clusters(conn, all) {
            Ok(clusters) => clusters,
            Err(error) => return self.walk_verdict(Err(error.into()), conn, url, walks),
        };
        let mut broken = Vec::new();
        for cluster in clusters {
            let size = *WALK_PAGES.choose(rng).unwrap_or(&1);
            let walked = self.walk_cluster(conn, &cluster, size, quiet, walks);
            broken.extend(self.walk_verdict(walked, conn, url, walks));
        }
        broken
    }

    /// What a walk found broken; when it failed instead: in a disturbed
    /// run, nothing (the disturbance failed it: it is given up, and the
    /// checker's connection made anew if that was the one lost); in a run
    /// nothing disturbs, a failed page is itself broken (and an
    /// `Unavailable` counts as one), a failed statement of the checker's
    /// own fails the run as a failed sample does.
    fn walk_verdict(
        &self,
        walked: Result<Vec<String>, WalkFailed>,
        conn: &mut PgConnection,
        url: &str,
        walks: &mut Walks,
    ) -> Vec<String> {
        match walked {
            Ok(broken) => broken,
            Err(WalkFailed::Checker(_)) if self.disturbed => {
                walks.given_up += 1;
                *conn = connect_patiently(url);
                Vec::new()
            }
            Err(WalkFailed::Store(..)) if self.disturbed => {
                walks.given_up += 1;
                Vec::new()
            }
            Err(WalkFailed::Checker(error)) => panic!("a checker walk's read of the rows: {error}"),
            Err(WalkFailed::Store(listing, error)) => {
                self.got_past(listing, &error);
                vec![format!("{listing}: a page failed: {error:?}")]
            }
        }
    }
}

/// A connection to `url`, tried again for up to 30 s while the server
/// restarts.
fn connect_patiently(url: &str) -> PgConnection {
    let started = Instant::now();
    loop {
        match PgConnection::establish(url) {
            Ok(conn) => return conn,
            Err(error) if started.elapsed() > Duration::from_secs(30) => panic!("{url} never answered again: {error}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Runs the workload against the migrated database at `database_url`.
///
/// # Panics
/// When the database cannot be reached or the checker's queries fail: a
/// harness, not a store.
pub fn run(database_url: &str, config: StressConfig) -> StressReport {
    let threads = config.threads.max(1);
    let pool_config = PoolConfig { max_size: u32::try_from(threads + 2).unwrap_or(64), ..PoolConfig::default() };
    // The data layer opens the one pool of the run (the database is
    // migrated already); its sessions are on PostgreSQL, in the table the
    // workers' own key-value store uses, without a purger (nothing expires
    // within a run).
    let data = DataLayer::open(
        Config::new(database_url)
            .with_pool(pool_config)
            .with_kv(KvBackendConfig::Postgres { purge_every: None })
            .without_migrations_on_start(),
    )
    .expect("the stress database answers");
    let pool = data.pool().clone();
    let kv_config = KvStoreConfig::default();
    let world = Arc::new(World {
        users: PgUserStore::new(pool.clone()),
        clusters: PgClusterStore::new(pool.clone()),
        instances: PgInstanceStore::new(pool.clone()),
        tokens: PgBootstrapTokenStore::new(pool.clone()),
        kv: KvStore::with_config(
            Arc::new(ObservedKv::new(Arc::new(PgKv::new(pool.clone()))).on_attempt(|count, limit| {
                LAST_ATTEMPT.with(|last| last.set(Some((count, limit))));
            })),
            kv_config,
        )
        .expect("the default key-value settings"),
        otp_max_attempts: kv_config.otp_max_attempts,
        data,
        emails: (0..config.emails.max(2))
            .map(|i| Email::parse(&format!("user{i}@stress.example")).expect("a valid e-mail"))
            .collect(),
        user_ids: Mutex::default(),
        cluster_ids: Mutex::default(),
        instance_ids: Mutex::default(),
        invitations: Mutex::default(),
        nonces: Mutex::default(),
        used: Mutex::default(),
        next_nonce: AtomicU64::new(0),
        bursts: AtomicU64::new(0),
        ticks: AtomicU64::new(0),
        sessions: Mutex::default(),
        forgetters: Mutex::default(),
        states: Mutex::default(),
        states_taken: Mutex::default(),
        codes: Mutex::default(),
        codes_taken: Mutex::default(),
        outcomes: Mutex::default(),
        unexpected: Mutex::default(),
        answers: Mutex::default(),
        answer_violations: AtomicU64::new(0),
        target_clusters: config.clusters.max(1),
        ok_since_disturbed: AtomicU64::new(0),
        unavailable: Mutex::default(),
        disturbed: config.disturb.is_some(),
        undisturbed_unavailable: AtomicU64::new(0),
        quiet: RwLock::default(),
    });
    let mut setup = StdRng::seed_from_u64(config.seed);
    for _ in 0..config.clusters.max(1) * 3 {
        world.replenish(&mut setup);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let checker = {
        let (stop, url, disturbed) = (Arc::clone(&stop), database_url.to_owned(), config.disturb.is_some());
        thread::spawn(move || {
            let mut conn = connect_patiently(&url);
            let (mut samples, mut count, mut violations) = (0_u64, 0_u64, Vec::new());
            let mut history = History::default();
            while !stop.load(Ordering::Relaxed) {
                let sampled = try_broken_invariants(&mut conn).and_then(|mut seen| {
                    seen.extend(history.sample(&mut conn)?);
                    Ok(seen)
                });
                match sampled {
                    Ok(seen) => {
                        samples += 1;
                        count += seen.len() as u64;
                        let room = 20usize.saturating_sub(violations.len());
                        let when = started.elapsed().as_secs_f64();
                        violations.extend(seen.into_iter().take(room).map(|seen| format!("at {when:.3} s: {seen}")));
                    }
                    // The server went away under the checker too: sample
                    // again on a new connection.
                    Err(_) if disturbed => conn = connect_patiently(&url),
                    Err(error) => panic!("a checker sample: {error}"),
                }
                thread::sleep(Duration::from_millis(10));
            }
            (samples, count, violations)
        })
    };
    // The checker's walks of the listings, on a thread of their own, so
    // that the samples keep their pace (walked between two samples, they
    // cut an undisturbed run's samples from about 415 to about 155, near
    // the test's floor of 100, on 2 cores): two clusters' listings beside
    // the writes every 10 ms, and every second a quiet moment (the workers
    // pause after their step) in which two are walked exactly.
    let walker = {
        let (stop, url, world) = (Arc::clone(&stop), database_url.to_owned(), Arc::clone(&world));
        let mut rng = StdRng::seed_from_u64(config.seed.wrapping_sub(1));
        thread::spawn(move || {
            let mut conn = connect_patiently(&url);
            let (mut count, mut violations, mut walks) = (0_u64, Vec::new(), Walks::default());
            let mut last_quiet = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let quiet = last_quiet.elapsed() >= QUIET_EVERY;
                let held = quiet.then(|| world.quiet.write().unwrap_or_else(std::sync::PoisonError::into_inner));
                let seen = world.walk_clusters(&mut conn, &url, &mut rng, (false, quiet), &mut walks);
                drop(held);
                if quiet {
                    last_quiet = Instant::now();
                }
                count += seen.len() as u64;
                let room = 20usize.saturating_sub(violations.len());
                let when = started.elapsed().as_secs_f64();
                violations.extend(seen.into_iter().take(room).map(|seen| format!("at {when:.3} s: {seen}")));
                thread::sleep(Duration::from_millis(10));
            }
            (count, violations, walks, rng)
        })
    };
    let disturber = config.disturb.map(|(every, disturbance)| {
        let (stop, url, world) = (Arc::clone(&stop), database_url.to_owned(), Arc::clone(&world));
        let last_start = started + config.duration.saturating_sub(every);
        thread::spawn(move || {
            let mut rounds = 0_u64;
            let mut conn = None;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
                if last.elapsed() < every || Instant::now() > last_start {
                    continue;
                }
                match &disturbance {
                    Disturbance::EndSessions => {
                        let conn = conn.get_or_insert_with(|| connect_patiently(&url));
                        diesel::sql_query(TERMINATE_OTHERS).execute(conn).expect("the other sessions end");
                    }
                    Disturbance::Run(disturb) => disturb(rounds),
                }
                world.ok_since_disturbed.store(0, Ordering::Relaxed);
                rounds += 1;
                last = Instant::now();
            }
            rounds
        })
    });
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (world, stop) = (Arc::clone(&world), Arc::clone(&stop));
            let seed = config.seed.wrapping_add(i as u64 + 1);
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                while !stop.load(Ordering::Relaxed) {
                    let _step = world.quiet.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                    world.step(&mut rng);
                }
            })
        })
        .collect();
    let deadline = started + config.duration;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        if worker.join().is_err() {
            world.record("worker", "panic", Some("a worker thread panicked outside a call".into()));
        }
    }
    let elapsed = started.elapsed();
    let disturbances = disturber.map_or(0, |disturber| disturber.join().expect("the disturber finishes"));
    let (samples, mut violation_count, mut violations) = checker.join().expect("the checker finishes");
    let (walk_count, walk_violations, mut walks, mut rng) = walker.join().expect("the walker finishes");
    violation_count += walk_count;
    violations.extend(walk_violations.into_iter().take(20usize.saturating_sub(violations.len())));
    let mut conn = connect_patiently(database_url);
    // A last sample once everything is still, and the token rule.
    for bad in broken_invariants(&mut conn) {
        violation_count += 1;
        violations.push(format!("at the end: {bad}"));
    }
    // Every cluster's listings walked exactly, nothing writing; and the
    // checker did walk beside the writes (a check that never ran proves
    // nothing).
    for bad in world.walk_clusters(&mut conn, database_url, &mut rng, (true, true), &mut walks) {
        violation_count += 1;
        violations.push(format!("at the end: {bad}"));
    }
    if walks.racing == 0 || walks.quiet == 0 {
        violation_count += 1;
        violations.push(format!("the checker hardly walked a listing: {walks:?}"));
    }
    // The run ends with an interval undisturbed: whatever was done to the
    // server, the process is ready again.
    let health = world.data.health();
    if !health.is_ready() {
        violation_count += 1;
        violations.push(format!("at the end: health answered not ready: {health:?}"));
    }
    // A state validates once, a code once.
    let states_taken =
        std::mem::take(&mut *world.states_taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for times in states_taken.values().filter(|times| **times > 1) {
        violation_count += 1;
        violations.push(format!("an OAuth state validated {times} times"));
    }
    let codes_taken = std::mem::take(&mut *world.codes_taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for ((email, taken), times) in codes_taken.iter().filter(|(_, times)| **times > 1) {
        // The same six characters drawn twice for one e-mail (about one
        // chance in 2^31 a pair) are two codes, each validating once.
        let made = world
            .codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(other, code, _, _)| other.as_str() == email && code.expose() == taken)
            .count() as u64;
        if *times > made.max(1) {
            violation_count += 1;
            violations.push(format!("a one-time code of {email} validated {times} times"));
        }
    }
    let used = std::mem::take(&mut *world.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for (nonce, Used { times, .. }) in &used {
        if *times > 1 {
            violation_count += 1;
            violations.push(format!("mark_used({nonce}) returned true {times} times"));
        }
    }
    // A used token stays used (an unknown nonce, after its instance was
    // deleted, counts as used too). After a disturbance, each connection
    // it ended fails one call as `Unavailable` and is then discarded: ask
    // again, at most once per connection the pool holds.
    for nonce in used.keys() {
        let ask = || Nonce::parse(nonce).and_then(|nonce| world.tokens.is_used(&nonce));
        let mut answer = ask();
        for _ in 0..threads + 2 {
            let Err(lost @ StoreError::Unavailable { .. }) = &answer else { break };
            world.got_past("bootstrap_tokens.is_used (at the end)", lost);
            answer = ask();
        }
        if !matches!(answer, Ok(true)) {
            violation_count += 1;
            violations.push(format!("{nonce} was marked used, then is_used answered {answer:?}"));
        }
    }
    #[derive(QueryableByName)]
    struct Deadlocks {
        #[diesel(sql_type = BigInt)]
        deadlocks: i64,
    }
    // The stores hold the last clones of the pool: taken apart here, they
    // go, and every connection of the workload closes with them. A session
    // sends its statistics to pg_stat_database when it ends (a session
    // still open may hold its last second's deadlocks back for 10 s).
    let World {
        ok_since_disturbed,
        unavailable,
        answer_violations,
        answers,
        outcomes,
        unexpected,
        disturbed,
        undisturbed_unavailable,
        ..
    } = Arc::try_unwrap(world).ok().expect("the workers and the checker are done");
    let connections_discarded = pool.deadline_stats().discarded;
    drop(pool);
    thread::sleep(Duration::from_millis(600));
    let deadlocks: Deadlocks =
        diesel::sql_query("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .get_result(&mut conn)
            .expect("the deadlock count");
    let ok_after_last_disturbance = ok_since_disturbed.into_inner();
    let unavailable = unavailable.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    violation_count += answer_violations.into_inner();
    violations.extend(answers.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
    StressReport {
        seed: config.seed,
        elapsed,
        threads,
        connections: u64::from(pool_config.max_size),
        connections_discarded,
        outcomes: outcomes.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
        samples,
        violations,
        violation_count,
        unexpected: unexpected.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
        deadlocks: deadlocks.deadlocks,
        disturbances,
        ok_after_last_disturbance,
        unavailable,
        disturbed,
        unavailable_undisturbed: undisturbed_unavailable.into_inner(),
        walks,
    }
}
