//! Key-value backends (memory, Cloudflare Workers KV, PostgreSQL) behind
//! `dployr-domain`'s [`KvBackend`](dployr_domain::KvBackend), and
//! [`KvStore`], the sessions, OAuth state and one-time codes built on any of
//! them.
//!
//! | backend | read-your-writes | atomic `take` / exact `increment` | expiry |
//! |---|---|---|---|
//! | [`MemoryKv`] | yes | yes (one lock) | to the millisecond on its [`Clock`] |
//! | [`CloudflareKv`] | no (reads stale for 60 s "or more", Cloudflare's words: no bound) | no (read, then write) | whole seconds, 60 s to 2^31 − 1 s |
//! | [`PgKv`] | yes | yes (`DELETE ... RETURNING`, `INSERT ... ON CONFLICT`) | server's `now()`; rows purged in batches |
//!
//! [`KvStore`] keeps sessions on one backend and the one-time records (OAuth
//! states, codes, attempt counters) on another, so that sessions can live on
//! Cloudflare while single use and the attempt limit stay exact.

mod clock;
#[cfg(feature = "cloudflare")]
mod cloudflare;
mod memory;
mod postgres;
mod recent_writes;
mod store;
mod user_sessions;

pub use clock::{Clock, ManualClock, SystemClock};
#[cfg(feature = "cloudflare")]
pub use cloudflare::{
    ACCOUNT_ID_VAR, API_BASE_URL_VAR, API_TOKEN_VAR, CLOUDFLARE_API_URL, CloudflareConfig, CloudflareKv,
    CloudflareRequestCounts, MAX_EXPIRATION_TTL_SECS, NAMESPACE_ID_VAR, RetryPolicy,
};
pub use memory::MemoryKv;
pub use postgres::{DELETE_EXPIRED_BATCHES, PURGE_BATCH, PgKv, Purger};
pub use recent_writes::RecentWrites;
pub use store::{
    CREATED_SESSION_MEMORY, DELETED_SESSION_MEMORY, KvStore, KvStoreConfig, MAX_OTP_TTL, MAX_SECRET_BYTES, OAuthState,
    OTP_ALPHABET, OTP_LENGTH, OtpCode, Session, SessionId,
};
pub use user_sessions::UserSessionIndex;
