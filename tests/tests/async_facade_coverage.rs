//! The async facade (`crates/dployr-data/src/async_layer.rs`) is a table of
//! the stores' methods, written by hand: this test keeps it complete, so a
//! store operation added to a trait without its async row fails here rather
//! than going missing for tokio servers.

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
    let mut lines = source.lines().skip_while(|line| !line.contains(opening));
    assert!(lines.next().is_some(), "no {opening:?}");
    lines
        .take_while(|line| *line != closing)
        .filter_map(|line| line.trim_start().strip_prefix("fn "))
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
