//! The PostgreSQL backend, for self-hosting with nothing but PostgreSQL: one
//! row per key in `kv_entries` (migration `001_kv_store`), through the pool
//! of `dployr-pg`.
//!
//! Every operation is one statement, so each is atomic: `take` is a
//! `DELETE ... RETURNING`, `increment` an `INSERT ... ON CONFLICT DO UPDATE
//! ... RETURNING` (an expired counter restarts at 1), `replace` an `UPDATE`
//! of a live row only. Expiry is always
//! compared with the server's `now()`, never with a time converted to a
//! zone, so the server's `TimeZone` does not matter. Expired rows are
//! invisible to every read and removed by [`PgKv::purge_expired`], in
//! bounded batches, which a caller runs or a [`Purger`] thread runs for it.
//!
//! Every operation runs through the pool's `PgPool::operation`, as every
//! store call does: the same span, client-side deadline (docs/operations.md),
//! retry of a statement rolled back for a passing reason, and error mapping
//! (the one PostgreSQL error mapper of the workspace). The pool is all this
//! crate uses of `dployr-pg`: the table is described by this crate's own
//! `schema.rs`. The SQL of this backend lives in this file: diesel's query
//! builder where it can express the statement, raw SQL with bound
//! parameters where it cannot (the counter's conditional upsert).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::dsl::{now, sql};
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Interval, Nullable, Text, Timestamptz};
use dployr_domain::{
    KvBackend, KvLimits, KvPage, MAX_COUNTER, StoreError, StoreResult, check_max_attempts, counter_at_its_largest,
    not_a_counter, parse_counter,
};
use dployr_pg::PgPool;

use crate::schema::kv_entries;

/// How many expired rows one purge statement deletes, by default: few
/// enough that no statement holds many row locks or runs long.
pub const PURGE_BATCH: i64 = 1000;

/// The most batches one [`KvBackend::delete_expired`] pass deletes, so
/// that a call ends (100 000 rows at [`PURGE_BATCH`]).
pub const DELETE_EXPIRED_BATCHES: u32 = 100;

/// A [`KvBackend`] on the `kv_entries` table; cheap to clone.
///
/// ```no_run
/// use dployr_kv::PgKv;
/// use dployr_pg::{PgPool, PoolConfig};
///
/// let kv = PgKv::new(PgPool::connect("postgres://localhost/dployr-local", PoolConfig::default())?);
/// let purger = kv.spawn_purger(std::time::Duration::from_secs(60), 1000)?;
/// // ... the purger stops when dropped.
/// # drop(purger);
/// # Ok::<(), dployr_domain::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct PgKv {
    pool: PgPool,
}

/// `expires_at IS NULL OR expires_at > now()`: the row is alive.
fn alive() -> diesel::dsl::Or<diesel::dsl::IsNull<kv_entries::expires_at>, diesel::dsl::Gt<kv_entries::expires_at, now>>
{
    kv_entries::expires_at.is_null().or(kv_entries::expires_at.gt(now))
}

/// The TTL as an interval of whole microseconds, PostgreSQL's resolution,
/// rounded up: an entry never ends before its TTL (as the Cloudflare
/// client rounds up to whole seconds and the memory backend keeps
/// nanoseconds).
fn interval(ttl: Option<Duration>) -> StoreResult<Option<PgInterval>> {
    ttl.map(|ttl| {
        let micros = ttl.as_micros() + u128::from(ttl.subsec_nanos() % 1_000 != 0);
        i64::try_from(micros).map(PgInterval::from_microseconds).map_err(|_| StoreError::invalid("ttl", "too large"))
    })
    .transpose()
}

/// Escapes `\`, `%` and `_` so `prefix` matches literally in `LIKE`.
fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

/// The counter's upsert (`$1` key, `$2` TTL): a new or expired row becomes
/// `1` with the given TTL; a live counter gets one more and keeps its
/// expiry; a live row that is not ASCII digits, or a counter at its
/// largest (`MAX_COUNTER`, 18 nines), is left alone and no row comes back. A macro so the two statements below share its text.
macro_rules! counter_upsert {
    () => {
        r"
INSERT INTO kv_entries AS e (key, value, expires_at)
VALUES ($1, convert_to('1', 'UTF8'), now() + $2)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN e.expires_at <= now() THEN EXCLUDED.value
                 ELSE convert_to((convert_from(e.value, 'UTF8')::bigint + 1)::text, 'UTF8') END,
    expires_at = CASE WHEN e.expires_at <= now() THEN EXCLUDED.expires_at ELSE e.expires_at END
WHERE e.expires_at <= now()
   OR (octet_length(e.value) BETWEEN 1 AND 18 AND ltrim(encode(e.value, 'escape'), '0123456789') = ''
       AND e.value <> convert_to('999999999999999999', 'UTF8'))
RETURNING convert_from(value, 'UTF8')::bigint AS count"
    };
}

/// `increment`: the counter's upsert.
const INCREMENT_SQL: &str = counter_upsert!();

/// `count_attempt_and_take_if` in one statement: the counter's upsert (as
/// [`INCREMENT_SQL`]), and a delete of the value that takes it when the
/// count is within the limit and the value is the expected one, and spends
/// it, whatever it holds, once the count reaches the limit. The delete
/// reads the count, so the upsert (which locks the counter row, serializing
/// concurrent attempts) happens first; of concurrent right guesses, the
/// first delete wins and the others find the row gone.
const ATTEMPT_TAKE_SQL: &str = concat!(
    "WITH attempt AS (",
    counter_upsert!(),
    r"
), taken AS (
    DELETE FROM kv_entries
     WHERE key = $3 AND (expires_at IS NULL OR expires_at > now())
       AND ((SELECT count FROM attempt) >= $5 OR (value = $4 AND (SELECT count FROM attempt) <= $5))
    RETURNING value = $4 AND (SELECT count FROM attempt) <= $5 AS matched
)
SELECT (SELECT count FROM attempt) AS count, EXISTS (SELECT 1 FROM taken WHERE matched) AS taken"
);

/// `put_and_reset_counter` in one statement: the counter (`$1`) is written
/// `0` first, with the value's expiry (the main statement reads the
/// upsert's rows, so it runs to completion before the value's), then the
/// value is upserted as `put` does (`$2` key, `$3` value, `$4` TTL): one
/// `now()`, so the count ends exactly when the value does. Rows are locked
/// in the order of [`ATTEMPT_TAKE_SQL`], counter then value, so the two
/// cannot deadlock. An attempt that waited for the counter's lock is
/// counted under the new count, but its delete reads the value row in its
/// own, older snapshot: the old value there, or none for a value inserted
/// anew. A guess of the old value is then deleted again only if PostgreSQL,
/// finding the row updated, re-reads it and the new value matches too;
/// a guess of the new value does not qualify in the snapshot, is not
/// re-read, and fails, counted all the same. So one attempt of the new code
/// may be lost to a race with its own creation (a guess that could not
/// know the new code before it was made); the attempt limit and the single
/// use hold.
const PUT_AND_RESET_SQL: &str = r"
WITH reset AS (
    INSERT INTO kv_entries AS c (key, value, expires_at)
    VALUES ($1, convert_to('0', 'UTF8'), now() + $4)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
    RETURNING 1
)
INSERT INTO kv_entries AS e (key, value, expires_at)
SELECT $2, $3, now() + $4 FROM (SELECT count(*) FROM reset) AS counter_restarted_first
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at";

/// One bounded batch of the purge. diesel's builder cannot put an ordered,
/// limited, `FOR UPDATE SKIP LOCKED` subquery into a `DELETE`, so this is
/// raw SQL; the batch size is bound.
const PURGE_SQL: &str = r"
DELETE FROM kv_entries WHERE key IN (
    SELECT key FROM kv_entries
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)";

impl PgKv {
    /// Why the counter's upsert left `key` alone: it holds a counter at its
    /// largest, or something that is not a counter. Read again to tell
    /// (only on this refusal's path).
    fn refused_counter(&self, key: &str) -> StoreError {
        match self.get(key) {
            Ok(Some(value)) if parse_counter(&value) == Some(MAX_COUNTER) => counter_at_its_largest(key),
            _ => not_a_counter(key),
        }
    }
    /// A backend on `pool`, whose database has migration `001_kv_store`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, e.g. for its statement counts.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Deletes at most `batch_size` expired rows, oldest expiry first, in
    /// one statement; rows locked by another purger are skipped. Returns how
    /// many went.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a batch size below 1; database errors.
    pub fn purge_expired_batch(&self, batch_size: i64) -> StoreResult<u64> {
        let op = self.pool.operation("kv.postgres.purge_batch");
        if batch_size < 1 {
            return Err(StoreError::invalid("batch_size", "must be at least 1"));
        }
        let deleted = op.run(|conn| diesel::sql_query(PURGE_SQL).bind::<BigInt, _>(batch_size).execute(conn))?;
        Ok(deleted as u64)
    }

    /// Deletes every expired row, `batch_size` rows per statement (so no
    /// statement holds many row locks or runs long), until a batch comes
    /// back short. Returns how many went in total.
    ///
    /// # Errors
    /// As [`purge_expired_batch`](Self::purge_expired_batch); rows purged
    /// before an error stay purged.
    pub fn purge_expired(&self, batch_size: i64) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let deleted = self.purge_expired_batch(batch_size)?;
            total += deleted;
            if deleted < batch_size as u64 {
                return Ok(total);
            }
        }
    }

    /// Starts a thread that runs [`purge_expired`](Self::purge_expired)
    /// every `every`; it stops when the returned [`Purger`] is dropped.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a zero period or a batch size below 1;
    /// [`StoreError::Backend`] if no thread can be started.
    pub fn spawn_purger(&self, every: Duration, batch_size: i64) -> StoreResult<Purger> {
        if every.is_zero() {
            return Err(StoreError::invalid("every", "must not be zero"));
        }
        if batch_size < 1 {
            return Err(StoreError::invalid("batch_size", "must be at least 1"));
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = {
            let kv = self.clone();
            std::thread::Builder::new()
                .name("kv-purger".into())
                .spawn(move || {
                    // Sending never happens: dropping the sender ends the wait.
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        // The pass of `purge_expired`, batch by batch, asking
                        // between batches whether the purger was dropped: a
                        // pass over millions of rows left by an outage (or
                        // one that never ends, where rows expire faster than
                        // a batch a statement) would otherwise hold up the
                        // drop, which joins this thread, until it ends.
                        loop {
                            match kv.purge_expired_batch(batch_size) {
                                Ok(deleted) if deleted >= batch_size.unsigned_abs() => {
                                    if let Err(mpsc::TryRecvError::Disconnected) = stopped.try_recv() {
                                        return;
                                    }
                                }
                                Ok(_) => break,
                                // Retried at the next tick; logged so an operator sees it.
                                Err(error) => {
                                    tracing::warn!(%error, "dployr.kv purge of expired rows failed; retried at the next tick");
                                    break;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| StoreError::backend("starting the KV purger thread", e))?
        };
        Ok(Purger { stop: Some(stop), thread: Some(thread) })
    }
}

/// A background thread purging expired rows of a [`PgKv`]; dropping it
/// stops the thread and waits for it: for the batch statement it is running,
/// if any, not for the rest of its pass.
#[derive(Debug)]
pub struct Purger {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Purger {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // A panicked purger thread has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

impl KvBackend for PgKv {
    fn limits(&self) -> KvLimits {
        KvLimits::default()
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let op = self.pool.operation("kv.postgres.get").idempotent();
        self.limits().check_key(key)?;
        op.run(|conn| {
            kv_entries::table
                .select(kv_entries::value)
                .filter(kv_entries::key.eq(key))
                .filter(alive())
                .first::<Vec<u8>>(conn)
                .optional()
        })
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        let op = self.pool.operation("kv.postgres.put");
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        let ttl = interval(ttl)?;
        op.run(|conn| {
            let expires_at = sql::<Nullable<Timestamptz>>("now() + ").bind::<Nullable<Interval>, _>(ttl);
            diesel::insert_into(kv_entries::table)
                .values((kv_entries::key.eq(key), kv_entries::value.eq(value), kv_entries::expires_at.eq(expires_at)))
                .on_conflict(kv_entries::key)
                .do_update()
                .set((
                    kv_entries::value.eq(diesel::upsert::excluded(kv_entries::value)),
                    kv_entries::expires_at.eq(diesel::upsert::excluded(kv_entries::expires_at)),
                ))
                .execute(conn)
        })?;
        Ok(())
    }

    /// One `UPDATE ... WHERE key = $1 AND` the row is alive, setting the
    /// value and expiry as `put` does: a row that a delete removed first is
    /// not there to update, and a delete that comes second waits for the
    /// update's row lock, so nothing deleted is brought back. An expired row
    /// is left for the purge.
    fn replace(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        let op = self.pool.operation("kv.postgres.replace");
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        let ttl = interval(ttl)?;
        let replaced = op.run(|conn| {
            let expires_at = sql::<Nullable<Timestamptz>>("now() + ").bind::<Nullable<Interval>, _>(ttl);
            diesel::update(kv_entries::table.filter(kv_entries::key.eq(key)).filter(alive()))
                .set((kv_entries::value.eq(value), kv_entries::expires_at.eq(expires_at)))
                .execute(conn)
        })?;
        Ok(replaced > 0)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let op = self.pool.operation("kv.postgres.delete");
        self.limits().check_key(key)?;
        op.run(|conn| diesel::delete(kv_entries::table.filter(kv_entries::key.eq(key))).execute(conn))?;
        Ok(())
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        let op = self.pool.operation("kv.postgres.list").idempotent();
        let limits = self.limits();
        limits.check_list_limit(limit)?;
        // A NUL would reach PostgreSQL, which refuses it in text with an
        // encoding error: refused here as bad input, like in every key.
        limits.check_prefix(prefix)?;
        limits.check_cursor(cursor)?;
        let fetch = i64::try_from(limit + 1).map_err(|_| StoreError::invalid("limit", "too large"))?;
        let pattern = like_prefix(prefix);
        let after = cursor.filter(|c| !c.is_empty());
        let mut keys: Vec<String> = op.run(|conn| {
            let mut query = kv_entries::table
                .select(kv_entries::key)
                .filter(kv_entries::key.like(&pattern))
                .filter(alive())
                .order(kv_entries::key)
                .limit(fetch)
                .into_boxed();
            if let Some(after) = after {
                query = query.filter(kv_entries::key.gt(after));
            }
            query.load(conn)
        })?;
        let more = keys.len() > limit;
        keys.truncate(limit);
        let cursor = if more { keys.last().cloned() } else { None };
        Ok(KvPage { keys, cursor })
    }

    /// One `DELETE ... RETURNING`: of concurrent takes, exactly one gets the value.
    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let op = self.pool.operation("kv.postgres.take");
        self.limits().check_key(key)?;
        op.run(|conn| {
            diesel::delete(kv_entries::table.filter(kv_entries::key.eq(key)).filter(alive()))
                .returning(kv_entries::value)
                .get_result::<Vec<u8>>(conn)
                .optional()
        })
    }

    /// One `INSERT ... ON CONFLICT DO UPDATE ... RETURNING`: concurrent
    /// increments each get a distinct value.
    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
        let op = self.pool.operation("kv.postgres.increment");
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_ttl(ttl)?;
        let ttl = interval(ttl)?;
        let counted = op.run(|conn| {
            diesel::sql_query(INCREMENT_SQL)
                .bind::<Text, _>(key)
                .bind::<Nullable<Interval>, _>(ttl)
                .get_result::<Count>(conn)
                .optional()
        })?;
        match counted {
            Some(counted) => Ok(counted.count),
            None => Err(self.refused_counter(key)),
        }
    }

    fn count_attempt_and_take_if(
        &self,
        attempts_key: &str,
        ttl: Option<Duration>,
        max_attempts: i64,
        key: &str,
        expected: &[u8],
    ) -> StoreResult<(i64, bool)> {
        #[derive(QueryableByName)]
        struct Attempt {
            #[diesel(sql_type = Nullable<BigInt>)]
            count: Option<i64>,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            taken: bool,
        }
        let op = self.pool.operation("kv.postgres.count_attempt_and_take_if");
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_counter_key(key, attempts_key)?;
        limits.check_ttl(ttl)?;
        check_max_attempts(max_attempts)?;
        let ttl = interval(ttl)?;
        let attempt = op.run(|conn| {
            diesel::sql_query(ATTEMPT_TAKE_SQL)
                .bind::<Text, _>(attempts_key)
                .bind::<Nullable<Interval>, _>(ttl)
                .bind::<Text, _>(key)
                .bind::<diesel::sql_types::Binary, _>(expected)
                .bind::<BigInt, _>(max_attempts)
                .get_result::<Attempt>(conn)
        })?;
        match attempt.count {
            Some(count) => Ok((count, attempt.taken)),
            None => Err(self.refused_counter(attempts_key)),
        }
    }

    /// One statement (`PUT_AND_RESET_SQL`): the counter deleted, then the value upserted.
    fn put_and_reset_counter(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        counter_key: &str,
    ) -> StoreResult<()> {
        let op = self.pool.operation("kv.postgres.put_and_reset_counter");
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        limits.check_counter_key(key, counter_key)?;
        let ttl = interval(ttl)?;
        op.run(|conn| {
            diesel::sql_query(PUT_AND_RESET_SQL)
                .bind::<Text, _>(counter_key)
                .bind::<Text, _>(key)
                .bind::<diesel::sql_types::Binary, _>(value)
                .bind::<Nullable<Interval>, _>(ttl)
                .execute(conn)
        })?;
        Ok(())
    }

    /// One pass of [`purge_expired`](PgKv::purge_expired) in batches of
    /// [`PURGE_BATCH`], of at most [`DELETE_EXPIRED_BATCHES`] batches (rows
    /// left by an outage, or expiring faster than a batch a statement, are
    /// left to the next pass): what a caller without a purger thread (a
    /// tower-sessions deletion task) runs on a schedule of its own.
    fn delete_expired(&self) -> StoreResult<u64> {
        let mut total = 0;
        for _ in 0..DELETE_EXPIRED_BATCHES {
            let deleted = self.purge_expired_batch(PURGE_BATCH)?;
            total += deleted;
            if deleted < PURGE_BATCH.unsigned_abs() {
                break;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::interval;

    #[test]
    fn a_ttl_is_rounded_up_to_whole_microseconds_never_down() {
        let micros = |ttl| interval(Some(ttl)).unwrap().unwrap().microseconds;
        assert_eq!(micros(Duration::from_nanos(60_000_000_001)), 60_000_001);
        assert_eq!(micros(Duration::from_nanos(1_000_999)), 1_001);
        assert_eq!(micros(Duration::from_millis(1)), 1_000);
        assert_eq!(micros(Duration::from_secs(60)), 60_000_000);
        assert!(interval(None).unwrap().is_none());
        assert!(interval(Some(Duration::MAX)).is_err());
    }
}
