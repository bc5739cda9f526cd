//! Threads calling in a loop, as many as the pool has connections, each
//! keep one connection (and its server process) for good. A test binary
//! of its own: a thread's slot in the pool is its process-wide number
//! modulo the pool's size, and the threads of other tests would share
//! slots with these.

#![cfg(test)]

use diesel::prelude::*;
use dployr_domain::StoreError;
use dployr_pg::{PgPool, PoolConfig};

const THREADS: usize = 16;

/// The server process behind a pool's call, by `pg_backend_pid()`.
fn backend_of_a_call(pool: &PgPool) -> Result<i32, StoreError> {
    pool.operation("test.backend_pid")
        .run(|conn| diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()")).get_result(conn))
}

/// Before, a checkout that found its slot empty (a thread's first) asked
/// every other thread to send its connection back to r2d2, whose next
/// checkout then found its own slot empty and asked in turn: here, 305 to
/// 1 298 of the 16 000 calls moved between connections (four runs of the
/// old rule, debug build), against a dozen or fewer since. While the pool
/// opens its connections (one at a time; on a loaded 2-core machine that
/// took past the middle of the run), a thread whose own is not open yet
/// uses another's, and moves once more when its own comes; once every
/// connection is open, no call moves. So: few moves in all, and none among
/// the calls made after the pool was full and each thread had made one
/// call more (its move to its own connection).
#[test]
fn threads_calling_in_a_loop_each_keep_one_connection_for_good() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: u32::try_from(THREADS).unwrap(), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (pool, start) = (pool.clone(), std::sync::Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                // Each call's backend, and whether every connection of the
                // pool was open when it began.
                let calls: Vec<(i32, bool)> = (0..1000)
                    .map(|_| {
                        let full = pool.state().0 == u32::try_from(THREADS).unwrap();
                        (backend_of_a_call(&pool).unwrap(), full)
                    })
                    .collect();
                let backends: Vec<i32> = calls.iter().map(|(backend, _)| *backend).collect();
                let moved = |calls: &[i32]| calls.windows(2).filter(|pair| pair[0] != pair[1]).count();
                // From the second call after the pool was full.
                let settled = calls.iter().position(|(_, full)| *full).map_or(backends.len(), |first| first + 1);
                (moved(&backends), moved(&backends[settled.min(backends.len())..]))
            })
        })
        .collect();
    let moves: Vec<(usize, usize)> = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
    let (all, late): (usize, usize) = moves.iter().fold((0, 0), |(all, late), (a, l)| (all + a, late + l));
    assert!(
        all <= 2 * THREADS && late == 0,
        "calls moved between connections, (all, after the pool was full) per thread: {moves:?}"
    );
}
