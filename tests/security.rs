//! Secure connections, proven on this machine: Kafka over TLS (stunnel in front of a tansu of
//! the test's own, advertising the TLS port) with the CA, the host name and a client
//! certificate checked; SASL SCRAM logins accepted and refused; PostgreSQL over TLS (a cluster of the
//! test's own: `ssl = on`, `hostssl`-only, scram-sha-256) with `verify-full` and a password
//! file; batches in every codec from an independent producer; and no secret in any output.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;
use costwatch::loadgen::{self, LoadSpec, Message};

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The test's own certificate authorities and certificates, made with the `openssl` command.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a second unrelated CA, a server certificate for `localhost` only (no IP address,
    /// so connecting to 127.0.0.1 fails host name verification), and a client certificate
    /// (CN `costwatch`) whose key is encrypted with [`Pki::CLIENT_KEY_PASSWORD`].
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=costwatch test {ca}"),
            ]);
        }
        pki.issue(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
            false,
        );
        pki.issue("client", "/CN=costwatch", "extendedKeyUsage=clientAuth\n", true);
        // For PostgreSQL's `cert` authentication the certificate's CN is the role.
        pki.issue("pgclient", "/CN=costwatch_cert", "extendedKeyUsage=clientAuth\n", false);
        pki
    }

    const CLIENT_KEY_PASSWORD: &'static str = "client-key-passphrase-7f3a91";

    fn issue(&self, name: &str, subject: &str, extensions: &str, encrypt_key: bool) {
        std::fs::write(
            self.path(&format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{extensions}"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
        if encrypt_key {
            self.openssl(&[
                "pkey",
                "-in",
                &format!("{name}.key"),
                "-aes256",
                "-passout",
                &format!("pass:{}", Self::CLIENT_KEY_PASSWORD),
                "-out",
                &format!("{name}.enc.key"),
            ]);
        }
    }

    fn openssl(&self, args: &[&str]) {
        run(Command::new("openssl").args(args).current_dir(self.dir.path()));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A child process killed on drop, its log printed if the test failed.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({e}); scripts/test.sh installs it"));
        Proc { child, name, log }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- {} log ---\n{log}", self.name);
        }
    }
}

/// A Kafka broker reachable only over TLS: a tansu of its own on a plaintext port, advertising
/// `localhost:<tls port>`, where stunnel terminates TLS with the test CA's server certificate.
/// With `client_certificates`, stunnel also demands a client certificate from the test CA.
struct TlsBroker {
    // Declared first so that it is dropped (killed) first.
    tansu: Option<Proc>,
    _stunnel: Proc,
    dir: PathBuf,
    plain_port: u16,
    tls_port: u16,
    /// tansu and its storage engine: in memory, or SQLite (the durable build), whose SCRAM
    /// users survive a restart.
    binary: PathBuf,
    storage: &'static str,
}

impl TlsBroker {
    fn start(pki: &Pki, dir: &Path, client_certificates: bool, tansu_args: &[&str]) -> TlsBroker {
        Self::start_with(
            pki,
            dir,
            client_certificates,
            PathBuf::from("tansu"),
            "memory://tansu/",
            tansu_args,
        )
    }

    /// With the SQLite build of `scripts/durable-broker.sh`, whose storage keeps SCRAM users.
    fn start_durable(pki: &Pki, dir: &Path) -> TlsBroker {
        let binary = std::env::var_os("COSTWATCH_TEST_DURABLE_TANSU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".local/tansu-libsql/bin/tansu"));
        assert!(
            binary.exists(),
            "{} is missing: scripts/durable-broker.sh (run by scripts/test.sh) installs it",
            binary.display()
        );
        Self::start_with(pki, dir, false, binary, "sqlite://tansu.db", &[])
    }

    fn start_with(
        pki: &Pki,
        dir: &Path,
        client_certificates: bool,
        binary: PathBuf,
        storage: &'static str,
        tansu_args: &[&str],
    ) -> TlsBroker {
        let (plain_port, tls_port) = (free_port(), free_port());
        let stunnel = stunnel(
            pki,
            dir,
            tls_port,
            &format!("127.0.0.1:{plain_port}"),
            client_certificates,
        );
        let mut broker = TlsBroker {
            tansu: None,
            _stunnel: stunnel,
            dir: dir.to_path_buf(),
            plain_port,
            tls_port,
            binary,
            storage,
        };
        broker.restart(tansu_args);
        broker
    }

    /// Starts tansu (again, after stopping it) on the same port and storage with `args`.
    fn restart(&mut self, args: &[&str]) {
        self.tansu = None;
        let log = self.dir.join(format!("tansu-{}.log", free_port()));
        // The SQLite file is resolved against the working directory.
        self.tansu = Some(Proc::spawn(
            "tansu",
            Command::new(&self.binary)
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{}", self.plain_port),
                ])
                .args([
                    "--advertised-listener-url",
                    &format!("tcp://localhost:{}", self.tls_port),
                ])
                .args(["--storage-engine", self.storage])
                .args(args)
                .current_dir(&self.dir),
            log.clone(),
        ));
        wait_listening(self.plain_port, "tansu", &log);
    }

    /// The bootstrap address, by the name the certificate carries.
    fn brokers(&self) -> String {
        format!("localhost:{}", self.tls_port)
    }
}

/// stunnel terminating TLS on `accept_port` with the test CA's server certificate and
/// forwarding the plaintext to `connect`; with `client_certificates` it demands one from the
/// test CA. The same configuration as the README's reverse-proxy example.
fn stunnel(pki: &Pki, dir: &Path, accept_port: u16, connect: &str, client_certificates: bool) -> Proc {
    let verify = if client_certificates {
        format!("verifyChain = yes\nCAfile = {}\n", pki.file("ca.pem"))
    } else {
        String::new()
    };
    let conf = dir.join(format!("stunnel-{accept_port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[costwatch]\naccept = 127.0.0.1:{accept_port}\nconnect = {connect}\ncert = {}\nkey = {}\n{verify}",
            pki.file("server.pem"),
            pki.file("server.key"),
        ),
    )
    .unwrap();
    let log = dir.join(format!("stunnel-{accept_port}.log"));
    let proc = Proc::spawn("stunnel", Command::new("stunnel4").arg(&conf), log.clone());
    wait_listening(accept_port, "stunnel", &log);
    proc
}

/// librdkafka properties for the TLS broker, as TOML lines and as pairs for the test's own
/// clients. `localhost` may resolve to ::1 first, where stunnel does not listen.
fn tls_properties(pki: &Pki, ca: &str) -> Vec<(String, String)> {
    [
        ("security.protocol", "SSL".to_owned()),
        ("ssl.ca.location", pki.file(ca)),
        ("broker.address.family", "v4".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn toml_properties(properties: &[(String, String)]) -> String {
    let mut out = String::from("\n[kafka.properties]\n");
    for (k, v) in properties {
        out.push_str(&format!("{k:?} = {v:?}\n"));
    }
    out
}

/// A world whose topic lives on `broker`, created over TLS with `properties`.
async fn world_on_tls(broker: &TlsBroker, properties: &[(String, String)], partitions: i32) -> World {
    let mut world = World::new(1).await;
    world.brokers = broker.brokers();
    world.topic = format!("{}-tls", world.topic);
    loadgen::ensure_topic_with(&world.brokers, &world.topic, partitions, properties)
        .await
        .expect("cannot create the topic over TLS");
    world
}

async fn produce_with(world: &World, messages: Vec<Message>, properties: &[(String, String)]) {
    let (brokers, topic, properties) = (world.brokers.clone(), world.topic.clone(), properties.to_vec());
    tokio::task::spawn_blocking(move || loadgen::send_with(&brokers, &topic, &messages, 0, &properties))
        .await
        .unwrap()
        .unwrap();
}

fn spec(count: u64, seed: u64) -> LoadSpec {
    LoadSpec {
        count,
        seed,
        models: 3,
        hardware: 2,
        rate: 0,
        duplicates: 0.02,
        late: 0.01,
        malformed: 0.01,
        hostile: 0.0,
        late_by: Duration::from_secs(600),
        span: Duration::from_secs(600),
        end: chrono::Utc::now(),
    }
}

/// Waits for the daemon to exit by itself and returns its exit code and log.
fn exits(daemon: &mut Daemon, within: Duration) -> (Option<i32>, String) {
    let status = daemon.wait_exit(within);
    (status.code(), daemon.log_text())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_over_tls_verifies_the_broker_and_counts_exactly() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = TlsBroker::start(&pki, dir.path(), false, &[]);
    let properties = tls_properties(&pki, "ca.pem");
    let world = world_on_tls(&broker, &properties, 2).await;
    let (messages, expected) = loadgen::generate(&spec(3_000, 14));
    produce_with(&world, messages, &properties).await;

    let mut daemon = world.start(&world.config(&toml_properties(&properties)));
    world.wait_consumed(expected.messages as i64, WAIT).await;
    world.assert_totals(&expected, "over TLS").await;
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_certificate_that_does_not_verify_is_a_permanent_certificate_error() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = TlsBroker::start(&pki, dir.path(), false, &[]);
    let world = world_on_tls(&broker, &tls_properties(&pki, "ca.pem"), 1).await;

    // Signed by a CA costwatch was not told to trust.
    let wrong_ca = world.config(&toml_properties(&tls_properties(&pki, "other-ca.pem")));
    let mut daemon = world.start(&wrong_ca);
    let (code, log) = exits(&mut daemon, WAIT);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("TLS certificate verification failed"), "{log}");
    assert!(log.contains("certificate verify failed"), "{log}");

    // The right CA, but the broker reached as 127.0.0.1, a name its certificate does not carry.
    let mut by_address = World::new(1).await;
    by_address.brokers = format!("127.0.0.1:{}", broker.tls_port);
    by_address.topic = world.topic.clone();
    let config = by_address.config(&toml_properties(&tls_properties(&pki, "ca.pem")));
    let mut daemon = by_address.start(&config);
    let (code, log) = exits(&mut daemon, WAIT);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("TLS certificate verification failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_with_an_encrypted_key_from_a_file_secret_is_accepted() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = TlsBroker::start(&pki, dir.path(), true, &[]);
    let mut properties = tls_properties(&pki, "ca.pem");
    properties.push(("ssl.certificate.location".into(), pki.file("client.pem")));
    properties.push(("ssl.key.location".into(), pki.file("client.enc.key")));
    let mut with_password = properties.clone();
    with_password.push(("ssl.key.password".into(), Pki::CLIENT_KEY_PASSWORD.into()));
    let world = world_on_tls(&broker, &with_password, 1).await;
    let (messages, expected) = loadgen::generate(&spec(500, 15));
    produce_with(&world, messages, &with_password).await;

    // The key's password comes from a file, as from a secret mount.
    let password_file = world.dir.path().join("kafka-key-password");
    std::fs::write(&password_file, format!("{}\n", Pki::CLIENT_KEY_PASSWORD)).unwrap();
    let config = world.config(&format!(
        "{}\n[kafka.property_files]\n\"ssl.key.password\" = {:?}\n",
        toml_properties(&properties),
        password_file.display().to_string()
    ));
    let mut daemon = world.start(&config);
    world.wait_consumed(expected.messages as i64, WAIT).await;
    world.assert_totals(&expected, "with a client certificate").await;
    assert!(daemon.terminate(WAIT).success());
    assert!(!daemon.log_text().contains(Pki::CLIENT_KEY_PASSWORD));
}

/// A PostgreSQL cluster of the test's own on its own port: `ssl = on` with the test CA's
/// server certificate (for `localhost` only), TCP connections only over TLS (`hostssl`) with
/// scram-sha-256 passwords, and a trusted Unix socket for the test's superuser.
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl TlsPostgres {
    fn start(pki: &Pki) -> TlsPostgres {
        let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL's binaries in /usr/lib/postgresql");
        let mut versions: Vec<u32> = versions
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", versions.last().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let pg = TlsPostgres {
            dir,
            bin,
            port: free_port(),
        };
        // initdb refuses to run as root: the cluster belongs to the postgres user.
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(pg.dir.path()));
        let data = pg.dir.path().join("data");
        run(pg.as_postgres("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]));
        for (from, to) in [
            ("server.pem", "server.crt"),
            ("server.key", "server.key"),
            ("ca.pem", "ca.crt"),
        ] {
            std::fs::copy(pki.path(from), data.join(to)).unwrap();
            run(Command::new("chown").args(["postgres:postgres"]).arg(data.join(to)));
            run(Command::new("chmod").args(["600"]).arg(data.join(to)));
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nport = {}\nlisten_addresses = 'localhost'\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\npassword_encryption = 'scram-sha-256'\n",
            pg.port,
            pg.dir.path().display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        // No `host` line: a connection without TLS finds no entry and is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all postgres trust\nhostssl all costwatch_cert 127.0.0.1/32 cert\nhostssl all costwatch_cert ::1/128 cert\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n",
        )
        .unwrap();
        run(pg
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.path().join("postgres.log"))
            .args(["-w", "start"]));
        pg
    }

    /// `program` from the cluster's binaries, run as the postgres user when we are root.
    fn as_postgres(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc_geteuid() } == 0 {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    /// Runs SQL as the superuser over the Unix socket.
    fn psql(&self, database: &str, sql: &str) -> String {
        let out = run(self
            .as_postgres("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A superuser pool over the Unix socket, for the test's own reads.
    async fn admin_pool(&self, database: &str) -> sqlx::PgPool {
        let options = sqlx::postgres::PgConnectOptions::new()
            .socket(self.dir.path())
            .port(self.port)
            .username("postgres")
            .database(database);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap()
    }

    /// What costwatch is given: TLS verified against `root` for the host `host`.
    fn url(&self, user: &str, host: &str, params: &str) -> String {
        format!("postgres://{user}@{host}:{}/costwatch?{params}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            eprintln!("--- postgres log ---\n{log}");
        }
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs `costwatch <args>` with `env` and returns (exit code, stdout + stderr).
fn costwatch(args: &[&str], config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_tls_verifies_the_server_and_every_connection_uses_it() {
    let pki = Pki::new();
    let pg = TlsPostgres::start(&pki);
    let password = "db-password-5e1f-costwatch";
    // Least privilege: costwatch is no superuser and may not create databases; it owns its own.
    pg.psql(
        "postgres",
        &format!("CREATE ROLE costwatch LOGIN PASSWORD '{password}'"),
    );
    pg.psql("postgres", "CREATE DATABASE costwatch OWNER costwatch");
    let mut world = World::new(2).await;
    world.pool = pg.admin_pool("costwatch").await;
    let password_file = world.dir.path().join("db-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let password_file = password_file.display().to_string();
    let verified = format!("sslmode=verify-full&sslrootcert={}", pki.file("ca.pem"));
    world.db_url = pg.url("costwatch", "localhost", &verified);
    let config = world.config("");
    let env = [("COSTWATCH__DATABASE__PASSWORD_FILE", password_file.as_str())];

    // Every way of getting it wrong fails at once, named, and `migrate` exits non-zero.
    let wrong_root = pg.url(
        "costwatch",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", pki.file("other-ca.pem")),
    );
    let wrong_host = pg.url("costwatch", "127.0.0.1", &verified);
    let plaintext = pg.url("costwatch", "localhost", "sslmode=disable");
    for (url, password_env, expected) in [
        (
            wrong_root.as_str(),
            password_file.as_str(),
            "TLS certificate verification failed",
        ),
        (
            wrong_host.as_str(),
            password_file.as_str(),
            "TLS hostname verification failed",
        ),
        (plaintext.as_str(), password_file.as_str(), "authentication failed"),
    ] {
        let started = Instant::now();
        let (code, out) = costwatch(
            &["migrate"],
            &config,
            &[
                ("COSTWATCH__DATABASE__URL", url),
                ("COSTWATCH__DATABASE__PASSWORD_FILE", password_env),
            ],
        );
        assert_eq!(code, Some(69), "{url}: {out}");
        assert!(out.contains(expected), "{url}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{url}: took {:?}",
            started.elapsed()
        );
        assert!(!out.contains(password), "{out}");
    }
    let wrong_password = world.dir.path().join("wrong-password");
    std::fs::write(&wrong_password, "not-the-password").unwrap();
    let (code, out) = costwatch(
        &["migrate"],
        &config,
        &[("COSTWATCH__DATABASE__PASSWORD_FILE", wrong_password.to_str().unwrap())],
    );
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("authentication failed"), "{out}");
    assert!(!out.contains("not-the-password"), "{out}");

    let (code, out) = costwatch(&["migrate"], &config, &env);
    assert_eq!(code, Some(0), "{out}");
    // The password from the environment works like any other key.
    let (code, out) = costwatch(&["migrate"], &config, &[("COSTWATCH__DATABASE__PASSWORD", password)]);
    assert_eq!(code, Some(0), "{out}");

    // A client certificate instead of a password (as Aiven or Cloud SQL may require); without
    // it the same role is refused.
    pg.psql("postgres", "CREATE ROLE costwatch_cert LOGIN IN ROLE costwatch");
    let with_certificate = format!(
        "{verified}&sslcert={}&sslkey={}",
        pki.file("pgclient.pem"),
        pki.file("pgclient.key")
    );
    for (params, want) in [(with_certificate.as_str(), Some(0)), (verified.as_str(), Some(69))] {
        let url = pg.url("costwatch_cert", "localhost", params);
        let (code, out) = costwatch(&["migrate"], &config, &[("COSTWATCH__DATABASE__URL", &url)]);
        assert_eq!(code, want, "{url}: {out}");
        if want == Some(69) {
            assert!(out.contains("authentication failed"), "{out}");
        }
    }

    let (messages, expected) = loadgen::generate(&spec(2_000, 16));
    world.produce(messages).await;
    let mut daemon = world.start_with(&config, &env);
    world.wait_consumed(expected.messages as i64, WAIT).await;
    world.assert_totals(&expected, "over PostgreSQL TLS").await;

    // Every connection costwatch holds is TLS and says who it is.
    let connections: Vec<(String, bool)> = sqlx::query_as(
        "SELECT coalesce(a.application_name, ''), s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.usename = 'costwatch'",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert!(!connections.is_empty());
    for (application, ssl) in &connections {
        assert_eq!((application.as_str(), *ssl), ("costwatch", true), "{connections:?}");
    }
    assert!(daemon.terminate(WAIT).success());
    assert!(!daemon.log_text().contains(password));
}

/// The venv `scripts/test.sh` makes with kafka-python and its codecs.
fn producer_python() -> PathBuf {
    let python = std::env::var_os("COSTWATCH_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/kafka-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: scripts/test.sh installs kafka-python into .local/kafka-venv",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_in_every_codec_from_an_independent_producer_are_counted_exactly() {
    use std::io::Write;
    let python = producer_python();
    let world = World::new(4).await;
    let (messages, expected) = loadgen::generate(&spec(8_000, 17));
    // A quarter of the load in each codec; copies of an event share its key, and so its
    // partition, whichever quarter they are in.
    for (chunk, codec) in messages.chunks(2_000).zip(["gzip", "snappy", "lz4", "zstd"]) {
        let mut child = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/produce.py"))
            .args([
                "--brokers",
                &world.brokers,
                "--topic",
                &world.topic,
                "--compression",
                codec,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for m in chunk {
            writeln!(stdin, "{}\t{}", hex::encode(&m.key), hex::encode(&m.payload)).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{codec}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut daemon = world.start(&world.config(""));
    world.wait_drained(expected.messages, WAIT_DRAINED).await;
    world
        .assert_totals(&expected, "gzip, snappy, lz4 and zstd batches")
        .await;
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_logs_metrics_api_answers_or_check_config() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    // The broker demands a client certificate, whose key's password is a real secret in use.
    let broker = TlsBroker::start(&pki, dir.path(), true, &[]);
    let mut properties = tls_properties(&pki, "ca.pem");
    properties.push(("ssl.certificate.location".into(), pki.file("client.pem")));
    properties.push(("ssl.key.location".into(), pki.file("client.enc.key")));
    let mut with_password = properties.clone();
    with_password.push(("ssl.key.password".into(), Pki::CLIENT_KEY_PASSWORD.into()));
    let world = world_on_tls(&broker, &with_password, 2).await;
    let (messages, expected) = loadgen::generate(&spec(1_000, 18));
    produce_with(&world, messages, &with_password).await;

    let key_password_file = world.dir.path().join("kafka-key-password");
    std::fs::write(&key_password_file, Pki::CLIENT_KEY_PASSWORD).unwrap();
    let inline_oidc_secret = "oidc-client-secret-inline-9d2b";
    let sasl_password = "sasl-password-from-env-41aa";
    let db_password = "database-password-from-env-77c1";
    let api_token = "api-token-from-env-0123456789abcdef";
    let webhook_secret = "webhook-signing-secret-e3f0a9";
    let secrets = [
        Pki::CLIENT_KEY_PASSWORD,
        inline_oidc_secret,
        sasl_password,
        db_password,
        api_token,
        webhook_secret,
    ];
    let extra = format!(
        "{}\"sasl.oauthbearer.client.secret\" = {inline_oidc_secret:?}\n\n[kafka.property_files]\n\"ssl.key.password\" = {:?}\n\n[[alerting.webhooks]]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = {webhook_secret:?}\n",
        toml_properties(&properties),
        key_password_file.display().to_string()
    );
    let config = world.config(&extra);
    let env = [
        ("COSTWATCH_KAFKA_SASL_PASSWORD", sasl_password),
        ("COSTWATCH__DATABASE__PASSWORD", db_password),
        ("COSTWATCH__HTTP__API_TOKEN", api_token),
    ];
    let leaked = |what: &str, text: &str| {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    };

    let (code, out) = costwatch(&["check-config"], &config, &env);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
    leaked("check-config", &out);

    let mut daemon = world.start_with(&config, &env);
    world.wait_consumed(expected.messages as i64, WAIT).await;
    world
        .assert_totals(&expected, "with every kind of secret configured")
        .await;
    let addr = daemon.http_addr().await;
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/api/v1/costs",
        "/api/v1/rejected",
        "/api/v1/budgets",
        "/api/v1/alerts",
        "/api/v1/recommendations",
        "/api/v1/openapi.json",
    ] {
        let (status, body) = http(&addr, "GET", path, Some(api_token), None).await;
        assert_eq!(status, 200, "{path}: {body}");
        leaked(path, &body);
        let (_, body) = http(&addr, "GET", path, Some("wrong-token-0000000000"), None).await;
        leaked(path, &body);
    }
    assert!(daemon.terminate(WAIT).success());
    leaked("the daemon's log", &daemon.log_text());

    // A misspelt property carrying a secret is refused by name, and its value is never shown.
    let typo = world.config(&format!(
        "{}\"sasl.passwrod\" = {sasl_password:?}\n",
        toml_properties(&properties)
    ));
    for command in ["check-config", "run"] {
        let (code, out) = costwatch(&[command], &typo, &env);
        assert_eq!(code, Some(78), "{command}: {out}");
        assert!(
            out.contains(r#"kafka.properties."sasl.passwrod": No such configuration property"#),
            "{command}: {out}"
        );
        leaked(command, &out);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_lists_every_connection_problem_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "typo-carried-secret-8b1d";
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // 192.0.2.1 is TEST-NET-1: nothing answers there, so a check that connected would hang.
    let head = "[kafka]\nbrokers = \"192.0.2.1:9093\"\ntopic = \"usage\"\ngroup_id = \"costwatch\"\n";
    let tail = "[pricing]\ncurrency = \"USD\"\n";
    let config = write(
        "bad.toml",
        format!(
            "{head}[kafka.properties]\n\"security.protocol\" = \"SASL_SSLX\"\n\"sasl.passwrod\" = {secret:?}\n[kafka.property_files]\n\"sasl.password\" = \"/nonexistent/kafka-password\"\n[database]\nurl = \"postgres://costwatch@192.0.2.1/costwatch?sslmode=verify-full&sslrootcert=/nonexistent/rds-ca.pem\"\npassword_file = \"/nonexistent/db-password\"\n{tail}"
        ),
    );
    let started = Instant::now();
    let (code, out) = costwatch(
        &["check-config"],
        &config,
        &[("COSTWATCH_KAFKA_SASL_USERNAME", "costwatch")],
    );
    assert_eq!(code, Some(78), "{out}");
    for want in [
        r#"kafka.properties."security.protocol": Invalid value "SASL_SSLX""#,
        r#"kafka.properties."sasl.passwrod": No such configuration property"#,
        r#"kafka.property_files."sasl.password": cannot read /nonexistent/kafka-password"#,
        "database.password_file: cannot read /nonexistent/db-password",
        "database.url: sslrootcert=/nonexistent/rds-ca.pem cannot be read",
    ] {
        assert!(out.contains(want), "{want}\n{out}");
    }
    assert!(!out.contains(secret), "{out}");

    // Each property valid alone, but not together in this build: MSK's IAM is no SASL
    // mechanism librdkafka has (see README for MSK with SCRAM or OAUTHBEARER).
    let config = write(
        "mechanism.toml",
        format!(
            "{head}[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"AWS_MSK_IAM\"\n[database]\nurl = \"postgres://costwatch@localhost/costwatch\"\n{tail}"
        ),
    );
    let (code, out) = costwatch(&["check-config"], &config, &[]);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("Unsupported SASL mechanism: AWS_MSK_IAM"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "check-config took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_stopped_before_the_schema_is_up_to_date_exits_non_zero() {
    let world = World::new(1).await;
    let config = world.config("");
    // Nothing listens there: migrate waits for the database, as a starting daemon would.
    let url = format!("postgres://postgres@127.0.0.1:{}/costwatch", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["migrate", "--config"])
        .arg(&config)
        .env("COSTWATCH__DATABASE__URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "migrate should still be waiting for PostgreSQL"
    );
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(69), "{text}");
    assert!(
        text.contains("stopped by a signal before the schema could be migrated"),
        "{text}"
    );
    assert!(!text.contains("database schema is up to date"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_broker_down_and_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut world = World::new(1).await;
    world.brokers = format!("127.0.0.1:{port}");
    let daemon = world.start(&world.config(""));
    let addr = daemon.http_addr().await;
    let ready = |want: u16, broker: bool| {
        let addr = addr.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let (status, body) = http(&addr, "GET", "/readyz", None, None).await;
                if status == want && body.contains(&format!("\"broker\":{broker}")) {
                    return;
                }
                assert!(Instant::now() < deadline, "/readyz stayed {status} {body}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    ready(503, false).await;

    // The broker appears where costwatch was told to look.
    let url = format!("tcp://127.0.0.1:{port}");
    let _tansu = Proc::spawn(
        "tansu",
        Command::new("tansu")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"]),
        dir.path().join("tansu.log"),
    );
    wait_listening(port, "tansu", &dir.path().join("tansu.log"));
    loadgen::ensure_topic(&world.brokers, &world.topic, 1).await.unwrap();
    ready(200, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_endpoints_serve_https_behind_the_documented_tls_proxy() {
    let pki = Pki::new();
    let world = World::new(1).await;
    let token = "api-token-behind-the-proxy-0123";
    let daemon = world.start_with(&world.config(""), &[("COSTWATCH__HTTP__API_TOKEN", token)]);
    let addr = daemon.http_addr().await;
    let port = free_port();
    let _proxy = stunnel(&pki, world.dir.path(), port, &addr, false);
    let curl = |ca: &str, path: &str| {
        Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--cacert",
                &pki.file(ca),
                "-H",
                &format!("Authorization: Bearer {token}"),
            ])
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .expect("curl")
    };
    let metrics = curl("ca.pem", "/metrics");
    assert!(metrics.status.success(), "{}", String::from_utf8_lossy(&metrics.stderr));
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("costwatch_events_total"));
    let costs = curl("ca.pem", "/api/v1/costs");
    assert!(costs.status.success(), "{}", String::from_utf8_lossy(&costs.stderr));
    // A client that does not trust the proxy's CA is refused by its own TLS check.
    let untrusted = curl("other-ca.pem", "/metrics");
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scram_login_over_tls_consumes_and_a_wrong_password_is_a_permanent_error() {
    use std::io::Write;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TlsBroker::start_durable(&pki, dir.path());
    let tls = tls_properties(&pki, "ca.pem");
    let password = "scram-password-right-6d1e";

    // Before authentication is required: the SCRAM user, as an operator would make it, and the
    // topic.
    let world = world_on_tls(&broker, &tls, 2).await;
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let mut child = Command::new(producer_python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/scram_user.py"))
            .args([
                "--brokers",
                &world.brokers,
                "--ca",
                &pki.file("ca.pem"),
                "--user",
                "costwatch",
            ])
            .args(["--mechanism", mechanism])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    broker.restart(&["--authentication"]);

    let sasl = |mechanism: &str| {
        let mut properties = tls.clone();
        properties[0].1 = "SASL_SSL".into();
        properties.push(("sasl.mechanisms".into(), mechanism.into()));
        properties.push(("sasl.username".into(), "costwatch".into()));
        properties
    };
    let mut producing = sasl("SCRAM-SHA-256");
    producing.push(("sasl.password".into(), password.into()));
    let (messages, expected) = loadgen::generate(&spec(1_500, 19));
    produce_with(&world, messages, &producing).await;

    let config = world.config(&toml_properties(&sasl("SCRAM-SHA-512")));
    let mut daemon = world.start_with(&config, &[("COSTWATCH_KAFKA_SASL_PASSWORD", password)]);
    world.wait_consumed(expected.messages as i64, WAIT).await;
    world.assert_totals(&expected, "over SASL_SSL with SCRAM-SHA-512").await;
    assert!(daemon.terminate(WAIT).success());
    assert!(!daemon.log_text().contains(password));

    let wrong = "scram-password-wrong-0b7c";
    let mut daemon = world.start_with(&config, &[("COSTWATCH_KAFKA_SASL_PASSWORD", wrong)]);
    let (code, log) = exits(&mut daemon, WAIT);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains(wrong) && !log.contains(password), "{log}");
}
