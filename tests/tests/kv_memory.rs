//! The key-value conformance suite on `MemoryKv`, plus what only the memory
//! backend promises: TTLs to the millisecond and reclamation of expired
//! entries.

#![cfg(test)]

use std::sync::Arc;
use std::time::Duration;

use dployr_domain::KvBackend;
use dployr_kv::{ManualClock, MemoryKv};
use dployr_tests::kv_contract::{Guarantees, KvFixture};

struct Memory {
    kv: MemoryKv,
    clock: ManualClock,
}

impl KvFixture for Memory {
    fn kv(&self) -> Arc<dyn KvBackend> {
        Arc::new(self.kv.clone())
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    fn guarantees(&self) -> Guarantees {
        Guarantees::ALL
    }
}

fn memory() -> Memory {
    let clock = ManualClock::new();
    Memory { kv: MemoryKv::with_clock(clock.clone()), clock }
}

dployr_tests::kv_contract_tests!(memory());

#[test]
fn ttl_is_honoured_to_the_millisecond() {
    let m = memory();
    m.kv.put("k", b"v", Some(Duration::from_millis(1500))).unwrap();
    m.clock.advance(Duration::from_millis(1499));
    assert_eq!(m.kv.get("k").unwrap(), Some(b"v".to_vec()));
    m.clock.advance(Duration::from_millis(1));
    assert_eq!(m.kv.get("k").unwrap(), None);
}

#[test]
fn expired_entries_are_reclaimed_not_kept() {
    let m = memory();
    for i in 0..1000 {
        m.kv.put(&format!("k{i}"), b"v", Some(Duration::from_secs(1))).unwrap();
    }
    m.kv.put("stays", b"v", None).unwrap();
    assert_eq!(m.kv.stored_entries(), 1001);
    m.clock.advance(Duration::from_secs(1));
    assert_eq!(m.kv.stored_entries(), 1001, "expired, not reclaimed before an operation");
    // Any operation reclaims, even one on another key.
    assert_eq!(m.kv.get("stays").unwrap(), Some(b"v".to_vec()));
    assert_eq!(m.kv.stored_entries(), 1);
}

#[test]
fn clones_share_the_data() {
    let kv = MemoryKv::new();
    kv.clone().put("k", b"v", None).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(b"v".to_vec()));
}
