//! Prints what the testkit costs on this machine: starting the test server
//! (template included) and cloning one test database, median of 100,
//! one at a time and from 4 threads at once, with both clone strategies.
//!
//! `cargo run -p dployr-testkit --example testkit_cost --release`

#![expect(clippy::print_stdout, reason = "an example whose output is its report")]
#![expect(clippy::expect_used, reason = "a measuring tool: any failure should stop it loudly")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::{Connection as _, PgConnection};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Clones the template `count` times on `threads` threads; returns each clone's time.
fn clone_times(url: &str, template: &str, strategy: &str, threads: usize, count: usize) -> Vec<Duration> {
    let per_thread = count / threads;
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || {
                    let mut conn = PgConnection::establish(url).expect("admin connection");
                    (0..per_thread)
                        .map(|_| {
                            let name = format!("cost_{}", NEXT.fetch_add(1, Ordering::Relaxed));
                            let started = Instant::now();
                            conn.batch_execute(&format!(
                                "CREATE DATABASE {name} TEMPLATE {template} STRATEGY {strategy}"
                            ))
                            .expect("clone");
                            started.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("worker")).collect()
    })
}

fn main() {
    let started = Instant::now();
    let server = dployr_testkit::server().expect("a test server");
    println!("server: {:?}, ready (initdb, start, template migrated) in {:?}", server.kind(), started.elapsed());
    let url = server.url_for("postgres");
    for strategy in ["FILE_COPY", "WAL_LOG"] {
        for threads in [1, 4] {
            let times = clone_times(&url, server.template(), strategy, threads, 100);
            let total: Duration = times.iter().sum();
            println!(
                "clone {strategy:<9} {threads} thread(s): median {:>6.1} ms, max {:>6.1} ms, mean {:>6.1} ms over {}",
                median(times.clone()).as_secs_f64() * 1e3,
                times.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3 / times.len() as f64,
                times.len()
            );
        }
    }
}
