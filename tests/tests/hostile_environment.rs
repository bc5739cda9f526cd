//! The throwaway PostgreSQL of the test kit, and the emulated Cloudflare,
//! under environments a newcomer or a CI runner plausibly has (README: the
//! two commands work "with nothing set up and nothing exported", and the
//! user's own exports must not break them). Each test runs this binary
//! again as a child with a variable set (so that it reaches only the
//! child's test kit), and the child says what it got.

#![cfg(test)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection, RunQueryDsl as _};

/// Set in the child: it then runs `child_asks_for_a_database` for real.
const CHILD: &str = "DPLOYR_PROBE_ENVIRONMENT_CHILD";

/// The child: asks the test kit for a migrated database and uses it (or,
/// told `cloudflare-emulator`, writes and reads a key on an emulator).
#[test]
fn child_asks_for_a_database() {
    let Some(mode) = std::env::var_os(CHILD) else {
        return; // only in a child of the probes below
    };
    if mode == "cloudflare-emulator" {
        use dployr_domain::KvBackend as _;
        let emulator = dployr_testkit::CloudflareEmulator::start();
        let config = dployr_kv::CloudflareConfig {
            base_url: emulator.base_url().to_owned(),
            ..dployr_kv::CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
        };
        let kv = dployr_kv::CloudflareKv::new(config).unwrap();
        match kv.put("k", b"v", None).and_then(|()| kv.get("k")) {
            Ok(value) => println!("CHILD-OK read {value:?}"),
            Err(error) => println!("CHILD-ERR {error}"),
        }
        return;
    }
    match dployr_testkit::try_database() {
        Ok(db) => {
            use diesel::RunQueryDsl as _;
            let mut conn = db.connect();
            let encoding: String =
                diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('server_encoding')"))
                    .get_result(&mut conn)
                    .unwrap();
            println!("CHILD-OK encoding={encoding}");
        }
        Err(error) => println!("CHILD-ERR {error}"),
    }
}

/// What a child run with `vars` set said, and how long it took; a child
/// still running after `limit` is killed (its guardian cleans up).
fn child_with(vars: &[(&str, &str)], limit: Duration) -> (Option<String>, Duration) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["child_asks_for_a_database", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, vars.iter().find(|(k, _)| *k == CHILD).map_or("1", |(_, v)| *v))
        .env_remove("DATABASE_URL")
        .env_remove("DPLOYR_TEST_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in vars {
        command.env(key, value);
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            // libtest prints "test <name> ... " on the line the child's
            // output starts; the error may span lines (a server log).
            let said = out.find("CHILD-").map(|at| {
                out[at..]
                    .lines()
                    .take_while(|l| *l != "ok" && !l.starts_with("test result"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            let said = said.map(|s| s.trim_end().to_owned());
            return (said, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, started.elapsed())
}

/// libpq settings exported for the user's own servers (a managed
/// PostgreSQL's `PGSSLMODE=require`, a standby's `PGTARGETSESSIONATTRS`, a
/// `PGHOSTADDR`, ...) reached every connection of the kit to its own server,
/// which has no TLS: each refusal was taken for a server still starting,
/// four ports times 60 s, four minutes per test binary, then "no
/// PostgreSQL for the tests". The kit's URLs now pin them.
#[test]
fn libpq_settings_exported_for_other_servers_do_not_reach_the_kits_own() {
    let exported = [
        ("PGSSLMODE", "require"),
        ("PGGSSENCMODE", "require"),
        ("PGCHANNELBINDING", "require"),
        ("PGTARGETSESSIONATTRS", "standby"),
        ("PGHOSTADDR", "10.255.255.1"),
    ];
    let (said, took) = child_with(&exported, Duration::from_secs(60));
    assert_eq!(said.as_deref(), Some("CHILD-OK encoding=UTF8"), "after {took:?}");
}

/// A `PGSERVICE` naming no service this machine defines: libpq refuses
/// every connection itself, which the kit took for a server still
/// starting (four minutes, then "no PostgreSQL"). It now gives up within
/// seconds, quoting libpq and naming the variable.
#[test]
fn a_pgservice_libpq_cannot_find_fails_at_once_naming_it() {
    let (said, took) = child_with(&[("PGSERVICE", "mydb")], Duration::from_secs(45));
    let said = said.unwrap_or_else(|| panic!("no answer within {took:?}: the kit waits under PGSERVICE"));
    assert!(said.contains("definition of service") && said.contains("PGSERVICE"), "{said}");
}

/// `PGOPTIONS` of the user's reached the kit's admin, template and
/// migration connections: "canceling statement due to statement timeout",
/// "no schema has been selected to create in", "cannot execute DROP
/// DATABASE in a read-only transaction". The kit's URLs set `options`.
#[test]
fn session_options_exported_do_not_reach_the_kits_server() {
    for options in ["-c statement_timeout=1", "-c search_path=app", "-c default_transaction_read_only=on"] {
        let (said, took) = child_with(&[("PGOPTIONS", options)], Duration::from_secs(60));
        assert_eq!(said.as_deref(), Some("CHILD-OK encoding=UTF8"), "PGOPTIONS={options}, after {took:?}");
    }
}

/// A cluster under a long temp dir (a CI workspace's, where `/dev/shm` is
/// small and the cluster goes to `TMPDIR`): its Unix socket's path passed
/// the 107 bytes a socket's path may hold, and postgres exited ("could not
/// create any Unix-domain sockets"), though the kit only connects over TCP.
/// `DPLOYR_TEST_PG_DIR` stands in for such a `TMPDIR`.
#[test]
fn a_cluster_under_a_long_temp_dir_starts() {
    let base = tempfile::tempdir().unwrap();
    let long = base.path().join("var-lib-jenkins-workspace").join("dployr-data-layer_PR-1234").join("tmp");
    std::fs::create_dir_all(&long).unwrap();
    for dir in long.ancestors().filter(|d| d.starts_with(base.path())) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (said, took) = child_with(&[("DPLOYR_TEST_PG_DIR", long.to_str().unwrap())], Duration::from_secs(60));
    assert_eq!(said.as_deref(), Some("CHILD-OK encoding=UTF8"), "under {} after {took:?}", long.display());
}

/// Locale variables (C, one not installed) leave the throwaway database
/// UTF8, and a non-ASCII address round-trips through it.
#[test]
fn locales_leave_the_database_utf8() {
    for vars in [vec![("LC_ALL", "C")], vec![("LC_ALL", "xx_YY.UTF-8"), ("PGCLIENTENCODING", "LATIN1")]] {
        let (said, took) = child_with(&vars, Duration::from_secs(60));
        assert_eq!(said.as_deref(), Some("CHILD-OK encoding=UTF8"), "{vars:?} after {took:?}");
    }
}

/// `HTTP_PROXY` (exported on many CI runners) sent the Cloudflare client's
/// requests for the emulator on 127.0.0.1 to the proxy, which cannot reach
/// this machine's loopback ("gave up after 5 attempts ... Connection
/// refused"), with the API token in clear. A base URL on this machine is
/// now reached directly.
#[test]
fn a_proxy_exported_is_not_used_for_an_emulator_on_this_machine() {
    for proxy in ["HTTP_PROXY", "ALL_PROXY"] {
        let vars = [(CHILD, "cloudflare-emulator"), (proxy, "http://127.0.0.1:9")];
        let (said, took) = child_with(&vars, Duration::from_secs(60));
        assert_eq!(said.as_deref(), Some("CHILD-OK read Some([118])"), "{proxy}, after {took:?}");
    }
}

/// The address the server sees this connection arrive on (NULL over a
/// Unix-domain socket).
fn server_addr(conn: &mut PgConnection) -> Option<String> {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::Text>>("host(inet_server_addr())"))
        .get_result(conn)
        .unwrap()
}

/// The kit's URLs keep `PGHOSTADDR` out with an empty `hostaddr`, so that
/// `TestServer::url_with`'s `host` still decides where to go ("a `host`
/// and `port` to reach it through"): the cluster's socket directory as
/// `host` connects over its Unix-domain socket. (A first version pinned
/// `hostaddr=127.0.0.1`, which libpq prefers to `host`: such a test
/// silently went over TCP.)
#[test]
fn url_with_a_socket_directory_as_host_connects_through_the_socket() {
    let db = dployr_testkit::database();
    let server = dployr_testkit::server().unwrap();
    let Some(root) = server.local_root() else {
        eprintln!("skipped: needs the test kit's own server");
        return;
    };
    let sockets = root.join("sockets");
    let port = server.local_port().unwrap();
    if sockets.as_os_str().len() + "/.s.PGSQL.65535".len() > 107 {
        eprintln!("skipped: the cluster's temp dir is too long for a Unix socket");
        return;
    }
    assert!(sockets.join(format!(".s.PGSQL.{port}")).exists(), "the cluster has no Unix socket");
    let url = server.url_with(db.name(), &[("host", sockets.to_str().unwrap())]);
    let mut conn = PgConnection::establish(&url).unwrap();
    let addr = server_addr(&mut conn);
    assert_eq!(addr, None, "url_with(host = socket dir) reached the server over TCP at {addr:?}; url: {url}");
}

/// The same, other face: a `host` naming no machine (a test of a DNS
/// failure) does not connect.
#[test]
fn url_with_a_host_that_does_not_resolve_does_not_connect() {
    let db = dployr_testkit::database();
    let server = dployr_testkit::server().unwrap();
    if server.local_root().is_none() {
        eprintln!("skipped: needs the test kit's own server");
        return;
    }
    let url = server.url_with(db.name(), &[("host", "no-such-host.invalid")]);
    let connected = PgConnection::establish(&url);
    assert!(connected.is_err(), "a URL whose host is no-such-host.invalid connected to the test server: {url}");
}

/// `cargo xtask db up` in a checkout under a long path (a CI workspace):
/// the development cluster's socket path passed 107 bytes and postgres
/// exited ("could not create any Unix-domain sockets"); it listens on TCP
/// only there, as the test clusters do.
#[test]
fn a_dev_cluster_under_a_long_path_starts() {
    let Ok(bindir) = dployr_testkit::local::locate_bindir() else {
        eprintln!("skipped: no local server binaries");
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let long = base.path().join("var-lib-jenkins-workspace").join("dployr-data-layer_PR-1234").join("checkout");
    std::fs::create_dir_all(&long).unwrap();
    for dir in long.ancestors().filter(|d| d.starts_with(base.path())) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dev = dployr_testkit::local::DevCluster::new(long.join(".dployr").join("dev"), bindir);
    let up = dev.up();
    let _ = dev.down();
    assert!(up.is_ok(), "under {} ({} bytes): {:?}", long.display(), long.as_os_str().len(), up.err());
}
