//! The async facade (`crates/dployr-data/src/async_layer.rs`) is a table of
//! the stores' methods, written by hand: this test keeps it complete, so a
//! store operation added to a trait without its async row fails here rather
//! than going missing for tokio servers. The same holds for the methods of
//! `DataLayer` and `KvStore` that do I/O: each has its `async fn`, and only
//! those listed here as answering from memory go without.

#![cfg(test)]

use std::collections::BTreeSet;
use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The names of the `fn`s in the block that opens on the line containing
/// `opening` and closes on the first later line that is `closing`.
fn methods_in_block(source: &str, opening: &str, closing: &str) -> BTreeSet<String> {
    fns_in_block(source, opening, closing, &["fn "])
}

/// The names of the public `fn`s, async or not, in the block as
/// [`methods_in_block`] finds it: the methods of an `impl` block.
fn public_methods_in_block(source: &str, opening: &str, closing: &str) -> BTreeSet<String> {
    fns_in_block(source, opening, closing, &["pub fn ", "pub async fn "])
}

/// The names after any of `prefixes` at the start of a line of the block.
fn fns_in_block(source: &str, opening: &str, closing: &str, prefixes: &[&str]) -> BTreeSet<String> {
    let mut lines = source.lines().skip_while(|line| !line.contains(opening));
    assert!(lines.next().is_some(), "no {opening:?}");
    lines
        .take_while(|line| *line != closing)
        .filter_map(|line| prefixes.iter().find_map(|prefix| line.trim_start().strip_prefix(prefix)))
        .filter_map(|rest| rest.split(['(', '<']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_store_trait_method_has_its_async_method() {
    let facade = read("crates/dployr-data/src/async_layer.rs");
    for (file, store) in [
        ("crates/dployr-domain/src/user.rs", "UserStore"),
        ("crates/dployr-domain/src/cluster.rs", "ClusterStore"),
        ("crates/dployr-domain/src/instance.rs", "InstanceStore"),
        ("crates/dployr-domain/src/instance.rs", "BootstrapTokenStore"),
    ] {
        let traits = methods_in_block(&read(file), &format!("pub trait {store}:"), "}");
        let asyncs = methods_in_block(&facade, &format!("Async{store} =>"), "    }");
        assert!(!traits.is_empty(), "no methods found in {store}");
        assert_eq!(traits, asyncs, "{store}'s methods against Async{store}'s table in async_layer.rs");
    }
}

/// The public methods of `DataLayer` that answer from memory, without I/O:
/// the facade reaches them through `blocking()` and needs no `async fn`.
/// A method that does I/O (a query, a key-value call, a probe) does not
/// belong here: its call blocks, and a tokio server needs its `async fn`.
const DATA_LAYER_WITHOUT_IO: [&str; 4] = ["applied_on_open", "kv_backend", "one_time_kv_backend", "pool"];

#[test]
fn every_data_layer_method_that_does_io_has_its_async_method() {
    let layer = public_methods_in_block(&read("crates/dployr-data/src/layer.rs"), "impl DataLayer {", "}");
    let facade = public_methods_in_block(&read("crates/dployr-data/src/async_layer.rs"), "impl AsyncDataLayer {", "}");
    assert!(layer.contains("open") && layer.contains("delete_user"), "DataLayer's methods not found: {layer:?}");
    let without_io = BTreeSet::from(DATA_LAYER_WITHOUT_IO.map(str::to_owned));
    let missing: Vec<&String> = layer.difference(&facade).filter(|name| !without_io.contains(*name)).collect();
    assert!(missing.is_empty(), "DataLayer's methods {missing:?} have no async method in AsyncDataLayer");
    let listed_but_async: Vec<&String> = without_io.intersection(&facade).collect();
    assert!(listed_but_async.is_empty(), "{listed_but_async:?} are async now: remove them from DATA_LAYER_WITHOUT_IO");
}

/// The public methods of `KvStore` that make or show a store, without
/// I/O: constructors, and the backends it holds.
const KV_STORE_WITHOUT_IO: [&str; 6] =
    ["backend", "new", "one_time_backend", "with_backends", "with_clock", "with_config"];

#[test]
fn every_kv_store_method_that_does_io_has_its_async_method() {
    let store = public_methods_in_block(&read("crates/dployr-kv/src/store.rs"), "impl KvStore {", "}");
    let asyncs = methods_in_block(&read("crates/dployr-data/src/async_layer.rs"), "AsyncKvStore =>", "    }");
    assert!(store.contains("create_session"), "KvStore's methods not found: {store:?}");
    let without_io = BTreeSet::from(KV_STORE_WITHOUT_IO.map(str::to_owned));
    let with_io: BTreeSet<String> = store.difference(&without_io).cloned().collect();
    assert_eq!(with_io, asyncs, "KvStore's methods that do I/O against AsyncKvStore's table in async_layer.rs");
}
