//! Key-value backends (memory, Cloudflare Workers KV, PostgreSQL) and the
//! session / OAuth state / one-time code store built on them.
//!
//! **Status: empty on purpose.** It is filled by the key-value issue; until
//! then nothing here pretends to work (see `docs/ARCHITECTURE.md`).
