//! TLS to PostgreSQL (issue 22, item 14): libpq's `sslmode` and `sslrootcert`, with rustls, against a
//! cluster of this test's own listening on 127.0.0.1, with a server certificate for `db.keel.test`
//! signed by a CA made here with `openssl`. Pools, migrations and the queue's `LISTEN` connection
//! all follow the connection string's mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::db::{self, Databases, Db};
use keel_outbox::{KindOptions, Runner};
use keel_pg::{Cluster, ClusterSpec, OsUser};

use crate::helpers::{connect, scratch_root, stop_at_exit};

/// A cluster on 127.0.0.1, stopped when dropped.
struct TcpCluster {
    cluster: Option<Cluster>,
    port: u16,
    dir: PathBuf,
}

impl TcpCluster {
    async fn start(dir: &Path) -> TcpCluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut spec = ClusterSpec::new(dir.join("data"), keel_pg::socket_dir_for(&dir.join("run"), port))
            .setting("listen_addresses", "127.0.0.1")
            .setting("fsync", "off");
        spec.port = port;
        spec.fast_initdb = true;
        spec.log_file = dir.join("postgres.log");
        let cluster = tokio::task::spawn_blocking(move || Cluster::start(spec)).await.unwrap().unwrap();
        stop_at_exit(cluster.pid());
        TcpCluster { cluster: Some(cluster), port, dir: dir.to_owned() }
    }

    /// Over the Unix socket: for setting the server up.
    fn socket_url(&self, database: &str) -> String {
        self.cluster.as_ref().unwrap().connection_string(database)
    }

    /// Over TCP to 127.0.0.1, naming the server `host` (the name its certificate is checked against).
    fn tcp_url(&self, host: &str, database: &str, tls: &str) -> String {
        format!("host={host} hostaddr=127.0.0.1 port={} user=keel dbname={database} {tls}", self.port)
    }

    /// Turns TLS on with the server certificate and key in `certs` (PostgreSQL reloads them).
    async fn enable_tls(&self, certs: &Path) {
        let data = self.dir.join("data");
        for file in ["server.crt", "server.key"] {
            std::fs::copy(certs.join(file), data.join(file)).unwrap();
        }
        // The server runs as an unprivileged user when we are root: the key must be that user's, and
        // private to it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(user) = OsUser::unprivileged().unwrap() {
            for file in ["server.crt", "server.key"] {
                std::os::unix::fs::chown(data.join(file), Some(user.uid), Some(user.gid)).unwrap();
            }
        }
        let admin = connect(&self.socket_url("postgres")).await;
        admin.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        let started = Instant::now();
        loop {
            let fresh = connect(&self.socket_url("postgres")).await;
            let on: String = fresh.query_one("SHOW ssl", &[]).await.unwrap().get(0);
            if on == "on" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "PostgreSQL did not turn TLS on");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TcpCluster {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let _ = cluster.stop(Duration::from_secs(10));
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (the TLS test makes its certificates with it)");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A CA (`ca.crt`), a server certificate for `db.keel.test` signed by it (`server.crt`, `server.key`),
/// and a CA that signed nothing here (`other-ca.crt`).
fn make_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for (name, cn) in [("ca", "Keel test CA"), ("other-ca", "Keel unrelated CA")] {
        let (key, crt, subject) = (format!("{name}.key"), format!("{name}.crt"), format!("/CN={cn}"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject, "-keyout", &key, "-out", &crt];
        args.extend(ec);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
    }
    let mut args = vec!["req", "-subj", "/CN=db.keel.test", "-keyout", "server.key", "-out", "server.csr"];
    args.extend(ec);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:db.keel.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// Whether the connection a pooled client of `db` gets is encrypted, in the server's view.
async fn encrypted(db: &Db) -> bool {
    let client = db.client().await.unwrap();
    client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0)
}

async fn open_error(catalog: &str, shard: &str) -> String {
    match Databases::open(catalog, &[shard.to_owned()], 1).await {
        Ok(_) => panic!("connected with {catalog}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn connections_follow_sslmode_with_rustls() {
    let dir = scratch_root().join(format!("tls-{}", std::process::id()));
    let certs = dir.join("certs");
    make_certificates(&certs);
    let server = TcpCluster::start(&dir).await;
    for database in ["catalog", "shard"] {
        db::create_database(&server.socket_url("postgres"), database, None).await.unwrap();
    }
    let ca = certs.join("ca.crt").display().to_string();
    let other_ca = certs.join("other-ca.crt").display().to_string();
    let url = |host: &str, database: &str, tls: &str| server.tcp_url(host, database, tls);

    // Before TLS is on: `require` refuses a server that does not offer it, naming the setting and mode.
    let error = open_error(
        &url("db.keel.test", "catalog", "sslmode=require"),
        &url("db.keel.test", "shard", "sslmode=require"),
    )
    .await;
    assert!(error.contains("KEEL_CATALOG_URL, sslmode=require"), "{error}");
    assert!(error.contains("server does not support TLS"), "{error}");

    server.enable_tls(&certs).await;

    // require: encrypted, the certificate unchecked (it names db.keel.test, not 127.0.0.1). Migrations
    // run over the same policy.
    let require = |database: &str| format!("postgresql://keel@127.0.0.1:{}/{database}?sslmode=require", server.port);
    db::migrate_all(&require("catalog"), &[require("shard")]).await.unwrap();
    let databases = Databases::open(&require("catalog"), &[require("shard")], 2).await.unwrap();
    assert!(encrypted(&databases.catalog).await, "sslmode=require encrypts");
    assert!(encrypted(&databases.shard(0).unwrap()).await);

    // verify-full with the CA that signed the certificate and the host it names: encrypted.
    let full = format!("sslmode=verify-full sslrootcert='{ca}'");
    let databases = Databases::open(&url("db.keel.test", "catalog", &full), &[url("db.keel.test", "shard", &full)], 2)
        .await
        .unwrap();
    assert!(encrypted(&databases.catalog).await, "sslmode=verify-full encrypts");

    // The queue's LISTEN connection takes the same policy: it is encrypted too.
    let shard = &*databases.shard(0).unwrap().clone();
    let stop = keel::shutdown::Stop::new();
    let runner = Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), Arc::new(()))
        .register("tls-probe", KindOptions::default(), |_, _| async { Ok::<(), String>(()) })
        .run(stop.stopped());
    let runner = tokio::spawn(runner);
    let admin = connect(&server.socket_url("postgres")).await;
    let started = Instant::now();
    loop {
        let listening = admin
            .query_opt(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = 'shard' AND a.query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = listening {
            assert!(row.get::<_, bool>(0), "the LISTEN connection is encrypted");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no LISTEN connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.trigger();
    runner.await.unwrap();

    // verify-full with a host name the certificate does not carry: refused, saying why.
    let error = open_error(&url("other.keel.test", "catalog", &full), &url("other.keel.test", "shard", &full)).await;
    assert!(error.contains("KEEL_CATALOG_URL, sslmode=verify-full"), "{error}");
    assert!(error.contains("does not name the host connected to"), "{error}");

    // verify-full with a CA that did not sign it: refused, saying why.
    let unknown = format!("sslmode=verify-full sslrootcert='{other_ca}'");
    let error = open_error(&url("db.keel.test", "catalog", &unknown), &url("db.keel.test", "shard", &unknown)).await;
    assert!(error.contains("KEEL_CATALOG_URL, sslmode=verify-full"), "{error}");
    assert!(error.contains("not signed by a root in sslrootcert"), "{error}");

    // As libpq: verify-ca checks the chain but not the name; require with a root certificate given
    // checks the chain.
    let ca_only = format!("sslmode=verify-ca sslrootcert='{ca}'");
    let databases =
        Databases::open(&url("other.keel.test", "catalog", &ca_only), &[url("other.keel.test", "shard", &ca_only)], 1)
            .await
            .unwrap();
    assert!(encrypted(&databases.catalog).await, "sslmode=verify-ca ignores the name");
    let rooted = format!("sslmode=require sslrootcert='{other_ca}'");
    let error = open_error(&url("db.keel.test", "catalog", &rooted), &url("db.keel.test", "shard", &rooted)).await;
    assert!(error.contains("not signed by a root in sslrootcert"), "{error}");

    // A setting Keel cannot use is refused before connecting, naming it.
    let error = match Db::new("catalog", "KEEL_CATALOG_URL", &url("db.keel.test", "catalog", "sslmode=allow"), 1) {
        Ok(_) => panic!("sslmode=allow accepted"),
        Err(e) => e.to_string(),
    };
    assert!(error.starts_with("KEEL_CATALOG_URL: "), "{error}");
    assert!(error.contains("sslmode: \"allow\" is not supported"), "{error}");

    // Unix sockets stay plain whatever the mode (PostgreSQL offers no TLS there), as with libpq.
    let socket = format!("{} sslmode=verify-full", server.socket_url("catalog"));
    let db = Db::new("catalog", "KEEL_CATALOG_URL", &socket, 1).unwrap();
    assert!(!encrypted(&db).await, "a Unix socket is not encrypted");
}
