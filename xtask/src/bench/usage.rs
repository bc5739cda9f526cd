//! The CPU time and context switches of this process (the store's client
//! side: its threads, the facade's, the pool's) and of the children it has
//! waited for (pgbench), from `getrusage`: what a call costs the client,
//! next to what pgbench's client pays for the same statement. The server's
//! processes are not children of this one and are not counted.

use std::ops::Sub;
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeVal;

use crate::Failure;

/// CPU time (user and system) and context switches (voluntary and not).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub switches: u64,
}

impl Usage {
    /// This process's, all its threads (ended ones included) so far.
    pub fn of_this_process() -> Result<Self, Failure> {
        Self::of(UsageWho::RUSAGE_SELF)
    }

    /// The children's this process has waited for, so far.
    pub fn of_children() -> Result<Self, Failure> {
        Self::of(UsageWho::RUSAGE_CHILDREN)
    }

    fn of(who: UsageWho) -> Result<Self, Failure> {
        let usage = getrusage(who)?;
        let duration = |time: TimeVal| {
            Duration::from_secs(u64::try_from(time.tv_sec()).unwrap_or(0))
                + Duration::from_micros(u64::try_from(time.tv_usec()).unwrap_or(0))
        };
        let count = |n: std::ffi::c_long| u64::try_from(n).unwrap_or(0);
        Ok(Self {
            cpu: duration(usage.user_time()) + duration(usage.system_time()),
            switches: count(usage.voluntary_context_switches()) + count(usage.involuntary_context_switches()),
        })
    }

    /// CPU time per operation, for `ops` operations.
    pub fn cpu_per(self, ops: u64) -> Duration {
        if ops == 0 { Duration::ZERO } else { self.cpu / u32::try_from(ops).unwrap_or(u32::MAX) }
    }

    /// Context switches per operation, for `ops` operations.
    pub fn switches_per(self, ops: u64) -> f64 {
        if ops == 0 { 0.0 } else { self.switches as f64 / ops as f64 }
    }
}

impl Sub for Usage {
    type Output = Usage;

    fn sub(self, before: Usage) -> Usage {
        Usage { cpu: self.cpu.saturating_sub(before.cpu), switches: self.switches.saturating_sub(before.switches) }
    }
}
