//! `UserSessionIndex`: which sessions a user has, kept in the key-value
//! backend itself, so that "sign out everywhere" finds and removes every
//! session of a user on any backend, in work bounded per session.
//!
//! **One key per session, not one record per user.** Each session of a user
//! gets an entry of its own, `<prefix><sha256(user)>:<session key>`, empty,
//! with the session's TTL: written after a new session (`KvStore`, and
//! tower-sessions' `create`), and before the write of a session whose id a
//! cookie holds already (a tower-sessions `save`), so that such a save
//! never writes a record naming a user that the index does not name,
//! whatever fails after (a new session whose entry and clean-up both fail
//! is left unnamed, but no cookie names it). A single record listing
//! a user's sessions would need a read-modify-write on every sign-in, which
//! loses entries to concurrent sign-ins on any backend without transactions
//! (Cloudflare has none); separate keys have nothing to lose, and an entry
//! expires with its session, so there is nothing to prune. Finding a user's
//! sessions is one prefix listing ([`KvBackend::list`]).
//!
//! **What it guarantees.** On memory and PostgreSQL (reads see every write),
//! [`delete_all`](UserSessionIndex::delete_all) removes every session whose
//! creation returned before it started: a listed entry's session exists
//! (the user's, or, written before its record, one of nobody yet or still
//! of another user, which the caller's `end_session` decides about) or is gone, and a created
//! session's entry is listed. A session created while `delete_all` runs may
//! survive it (it started "after"). On Cloudflare Workers KV, listings and
//! reads are eventually consistent (Cloudflare documents "60 seconds or
//! more", with no promised bound): a session created in the last minute or
//! so, or from another region, may be missing from the listing and
//! survive; a deleted one may still be read for as long in other
//! processes. Sign-out everywhere is therefore not exact on Cloudflare:
//! call it again after a minute, and again later, to catch late entries. (`KvStore` remembers the sessions it deleted, so this process
//! never returns them again.)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dployr_domain::{KvBackend, StoreError, StoreResult};
use sha2::{Digest as _, Sha256};

/// Keys of a list page asked for: the most every backend returns at once.
const PAGE: usize = 1000;
/// The most pages a listing of one user's sessions may take: ten million
/// entries at Cloudflare's 1000 a page, far past any user's sessions.
const MAX_PAGES: usize = 10_000;

/// The per-user index of sessions on one backend (see the module documentation).
#[derive(Clone)]
pub struct UserSessionIndex {
    backend: Arc<dyn KvBackend>,
    prefix: &'static str,
}

impl std::fmt::Debug for UserSessionIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSessionIndex").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl UserSessionIndex {
    /// An index on `backend` whose entries start with `prefix` (one prefix
    /// per kind of session, e.g. `user_sessions:`).
    pub fn new(backend: Arc<dyn KvBackend>, prefix: &'static str) -> Self {
        Self { backend, prefix }
    }

    /// Where the entries of `user` start: the user is hashed, so a listing
    /// of the store names nobody.
    fn user_prefix(&self, user: &str) -> String {
        format!("{}{}:", self.prefix, hex::encode(Sha256::digest(user.as_bytes())))
    }

    /// Records that `session_key` belongs to `user` for `ttl` (the session's
    /// own TTL). Call it after a new session is written, before a session
    /// whose id is handed out already is written again where the caller
    /// can tell (see the module documentation for why those orders).
    ///
    /// # Errors
    /// [`StoreError::Invalid`](dployr_domain::StoreError::Invalid) when the
    /// entry's key is longer than the backend takes; backend errors.
    pub fn add(&self, user: &str, session_key: &str, ttl: Option<Duration>) -> StoreResult<()> {
        self.backend.put(&self.entry_key(user, session_key), b"", ttl)
    }

    /// The key of the entry saying that `session_key` belongs to `user`.
    pub fn entry_key(&self, user: &str, session_key: &str) -> String {
        format!("{}{session_key}", self.user_prefix(user))
    }

    /// Whether an entry says that `session_key` belongs to `user` (as the
    /// backend answers: on one with stale reads, a recent entry may not
    /// show yet).
    ///
    /// # Errors
    /// Backend errors.
    pub fn contains(&self, user: &str, session_key: &str) -> StoreResult<bool> {
        Ok(self.backend.get(&self.entry_key(user, session_key))?.is_some())
    }

    /// Forgets that `session_key` belongs to `user`.
    ///
    /// # Errors
    /// Backend errors.
    pub fn remove(&self, user: &str, session_key: &str) -> StoreResult<()> {
        self.backend.delete(&self.entry_key(user, session_key))
    }

    /// The session keys recorded for `user` and not expired, page by page.
    ///
    /// # Errors
    /// Backend errors.
    pub fn session_keys(&self, user: &str) -> StoreResult<Vec<String>> {
        let prefix = self.user_prefix(user);
        let limits = self.backend.limits();
        let limit = PAGE.clamp(limits.min_list_limit.max(1), limits.max_list_limit.max(1));
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        // A cursor the listing already gave would page forever (a broken
        // proxy or server), spending the account's request budget, which on
        // Cloudflare then refuses every call for minutes: refused instead,
        // as is a listing that does not end within MAX_PAGES (an empty page
        // with a cursor is normal, so no page's content can tell).
        let mut seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            let page = self.backend.list(&prefix, limit, cursor.as_deref())?;
            keys.extend(page.keys.iter().filter_map(|key| key.strip_prefix(&prefix)).map(str::to_owned));
            match page.cursor {
                Some(next) if !seen.insert(next.clone()) => {
                    return Err(StoreError::backend(
                        "listing a user's sessions",
                        "the backend gave a cursor it had already given: the listing would never end",
                    ));
                }
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
        Err(StoreError::backend(
            "listing a user's sessions",
            format!("the listing did not end after {MAX_PAGES} pages"),
        ))
    }

    /// Removes every session of `user`: for each entry, `end_session`
    /// with the session's key, then the entry. `end_session` ends the
    /// session, or answers [`SessionEnd::AnotherUsers`] without ending it
    /// when the session now belongs to someone else (its id was used again
    /// for another user, whose own entry names it too): an entry is never
    /// taken as proof of whose session it is. Such an entry is left to
    /// expire with its TTL: a save naming `user` again, racing this call,
    /// may have just written it, and removing it would leave that session in
    /// no index. For the same reason, once an entry is removed,
    /// `written_again` is asked whether the session is the user's and live
    /// again (written under the same id after `end_session` ended it, its
    /// entry written before the removal): if so, for how long, and the
    /// entry is written back for that long. Returns how many sessions
    /// `end_session` answered [`SessionEnd::Ended`] for (one may have ended
    /// on its own already). Work: one list request per 1000 sessions, and
    /// per session what `end_session` and `written_again` do and one
    /// delete.
    ///
    /// # Errors
    /// The first error of the backend, of `end_session` or of
    /// `written_again`; the entries not reached yet stay, so calling it again
    /// finishes the job.
    pub fn delete_all(
        &self,
        user: &str,
        mut end_session: impl FnMut(&str) -> StoreResult<SessionEnd>,
        mut written_again: impl FnMut(&str) -> StoreResult<Option<Duration>>,
    ) -> StoreResult<usize> {
        // Listed whole first: deleting while paging would move a cursor that
        // some backends (Cloudflare) keep opaque.
        let keys = self.session_keys(user)?;
        let mut ended = 0;
        for session_key in &keys {
            match end_session(session_key)? {
                SessionEnd::AnotherUsers => continue,
                SessionEnd::Ended => ended += 1,
                SessionEnd::Gone => {}
            }
            self.remove(user, session_key)?;
            if let Some(ttl) = written_again(session_key)? {
                self.add(user, session_key, Some(ttl))?;
            }
        }
        Ok(ended)
    }
}

/// What a sign-out everywhere found under an entry of a user's index
/// ([`UserSessionIndex::delete_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The user's session, ended by this call (counted).
    Ended,
    /// Ended by this call or before it, not counted: gone already, or
    /// ended by another call at the same time.
    Gone,
    /// Another user's session now (its id used again): not ended, and its
    /// entry left to expire.
    AnotherUsers,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dployr_domain::{KvBackend as _, KvPage, MockKvBackend, StoreError};

    use super::UserSessionIndex;
    use crate::MemoryKv;

    /// A backend whose every listing page is empty and names the next one
    /// by `cursor(n)` for the n-th call.
    fn listing(cursor: impl Fn(usize) -> String + Send + 'static) -> MockKvBackend {
        let mut backend = MockKvBackend::new();
        backend.expect_limits().returning(|| MemoryKv::new().limits());
        let mut calls = 0;
        backend.expect_list().returning(move |_, _, _| {
            calls += 1;
            Ok(KvPage { keys: Vec::new(), cursor: Some(cursor(calls)) })
        });
        backend
    }

    #[test]
    fn a_listing_that_gives_a_cursor_again_is_an_error_not_an_endless_loop() {
        let index = UserSessionIndex::new(Arc::new(listing(|_| "same".to_owned())), "user_sessions:");
        let listed = index.session_keys("ada");
        assert!(matches!(&listed, Err(StoreError::Backend { .. })), "{listed:?}");
    }

    #[test]
    fn a_listing_that_never_ends_is_an_error_after_its_bound() {
        let index = UserSessionIndex::new(Arc::new(listing(|n| format!("page {n}"))), "user_sessions:");
        let listed = index.session_keys("ada");
        assert!(matches!(&listed, Err(StoreError::Backend { .. })), "{listed:?}");
    }
}
