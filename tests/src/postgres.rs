//! A throwaway PostgreSQL server for tests and the demo: initdb into a fresh directory, listen
//! on 127.0.0.1 only, stop and delete everything when dropped.
//!
//! PostgreSQL refuses to run as root, so when the harness runs as root (CI) the server and its
//! tools run as the `postgres` OS user that Debian's package creates; otherwise they run as the
//! current user. Client tools (psql, pgbench) run as the caller and connect over TCP with the
//! superuser password, as a patroxy client would.

use std::ffi::CString;
use std::fmt;
use std::io::{self, Read as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::ports::free_tcp_port;
use crate::process::is_root;

/// The superuser password used when the options do not name one (also the demo's).
pub const DEFAULT_PASSWORD: &str = "ChangeMe_Postgres";

/// How long psql may take before the harness kills it: a hung proxy must fail a test, not
/// hang the suite.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

static DIR_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How clients on 127.0.0.1 authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Password required, SCRAM-SHA-256 (the production setting).
    Scram,
    /// Anyone on loopback is let in (for tests that do not care about auth).
    Trust,
}

/// How to start a [`Postgres`]. `PostgresOptions::default()` gives a free port, a fresh
/// temporary directory, 300 connections, SCRAM auth with [`DEFAULT_PASSWORD`] and fsync off.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// TCP port on 127.0.0.1; `None` picks a free one (retrying if it is taken meanwhile).
    pub port: Option<u16>,
    /// Base directory (data dir, socket, log); emptied first. `None` makes a fresh one in
    /// `$TMPDIR`. Removed when the server is dropped either way.
    pub dir: Option<PathBuf>,
    /// `max_connections`: high enough for the 200-session tests by default.
    pub max_connections: u32,
    /// The `postgres` superuser's password.
    pub password: String,
    /// Authentication for TCP clients on 127.0.0.1.
    pub auth: Auth,
    /// Durability costs time and nothing in a test; the demo may turn it back on.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines (e.g. `log_connections = on`).
    pub extra_conf: Vec<String>,
    /// Run the server inside a network namespace instead of this host's.
    pub netns: Option<InNamespace>,
}

/// A server inside a network namespace (the bench's server host): it listens on its
/// namespace's 127.0.0.1 and on `listen`, and lets clients from `clients` in as it lets
/// loopback ones in.
#[derive(Clone, Debug)]
pub struct InNamespace {
    pub ns: String,
    pub listen: Ipv4Addr,
    /// A CIDR, e.g. `10.215.0.0/16`.
    pub clients: String,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            port: None,
            dir: None,
            max_connections: 300,
            password: DEFAULT_PASSWORD.to_owned(),
            auth: Auth::Scram,
            fsync: false,
            extra_conf: Vec::new(),
            netns: None,
        }
    }
}

impl PostgresOptions {
    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Use (and empty) this base directory instead of a fresh temporary one.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Sets `max_connections`.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the superuser password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = password.into();
        self
    }

    /// Lets loopback clients in without a password.
    pub fn trust(mut self) -> Self {
        self.auth = Auth::Trust;
        self
    }

    /// Turns fsync on or off.
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Appends a line to `postgresql.conf`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// Runs the server inside network namespace `ns`, also listening on `listen` there and
    /// letting clients from `clients` (a CIDR) in.
    pub fn in_netns(mut self, ns: &str, listen: Ipv4Addr, clients: &str) -> Self {
        self.netns = Some(InNamespace {
            ns: ns.to_owned(),
            listen,
            clients: clients.to_owned(),
        });
        self
    }
}

/// What went wrong in the harness, with the command and its output when there was one.
#[derive(Debug)]
pub struct PgError(String);

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

impl From<io::Error> for PgError {
    fn from(e: io::Error) -> Self {
        PgError(e.to_string())
    }
}

fn err(msg: impl Into<String>) -> PgError {
    PgError(msg.into())
}

/// A running PostgreSQL server on 127.0.0.1. Dropping it stops the server (immediate mode)
/// and removes its directory.
#[derive(Debug)]
pub struct Postgres {
    /// Holds the data dir, the unix socket and the server log; removed on drop.
    dir: PathBuf,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// `/usr/lib/postgresql/<newest>/bin`.
    bin_dir: PathBuf,
    /// Superuser password, for psql/pgbench via PGPASSWORD.
    password: String,
    /// uid/gid of the `postgres` OS user when running as root.
    run_as: Option<(u32, u32)>,
    /// Set once the server was stopped, so Drop does not stop it again.
    stopped: bool,
    /// The network namespace the server and [`Postgres::client`] commands run in, if not
    /// this host's.
    netns: Option<String>,
}

impl Postgres {
    /// Starts a server, panicking with the server log on failure (for tests).
    pub fn start(opts: PostgresOptions) -> Postgres {
        Postgres::try_start(opts).unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
    }

    /// Starts a server: initdb, configure, `pg_ctl start -w`, then wait for TCP readiness.
    pub fn try_start(opts: PostgresOptions) -> Result<Postgres, PgError> {
        let bin_dir = pg_bin_dir()?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = match &opts.dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!(
                "patroxy-pg-{}-{}",
                std::process::id(),
                DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
            )),
        };
        prepare_dir(&bin_dir, &dir, run_as)?;

        let mut pg = Postgres {
            dir,
            port: opts.port.unwrap_or_else(free_tcp_port),
            bin_dir,
            password: opts.password.clone(),
            run_as,
            stopped: true,
            netns: opts.netns.as_ref().map(|n| n.ns.clone()),
        };
        pg.initdb(&opts)?;

        // A port picked as free can be taken before the server binds it: retry with another.
        let attempts = if opts.port.is_some() { 1 } else { 5 };
        for attempt in 1..=attempts {
            pg.append_conf(&[format!("port = {}", pg.port)])?;
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.stopped = false;
                    pg.wait_ready(Duration::from_secs(30))?;
                    return Ok(pg);
                }
                Err(e) if attempt < attempts && pg.log().contains("could not bind") => {
                    let _ = e;
                    pg.port = free_tcp_port();
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The base directory (data dir is `data/` inside it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The superuser password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The directory holding psql, pgbench, pg_ctl, ...
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join("postgres.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// A client command (`psql`, `pgbench`, ...) from the server's bin dir with the password,
    /// host 127.0.0.1, `port` and user `postgres` set in its environment; inside the server's
    /// namespace if it has one (so 127.0.0.1 is the server's loopback).
    pub fn client(&self, tool: &str, port: u16) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(tool));
        if let Some(ns) = &self.netns {
            crate::netns::enter(&mut cmd, ns);
        }
        cmd.env("PGPASSWORD", &self.password)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `sql` with psql against 127.0.0.1:`port` (the server's own port, or a proxy in
    /// front of it) and returns the unaligned, tuples-only output without the final newline.
    /// Panics with psql's stderr on failure.
    pub fn psql(&self, port: u16, sql: &str) -> String {
        self.try_psql(port, sql)
            .unwrap_or_else(|e| panic!("psql on port {port}: {e}"))
    }

    /// [`Postgres::psql`] that returns the error instead of panicking.
    pub fn try_psql(&self, port: u16, sql: &str) -> Result<String, PgError> {
        let mut cmd = self.client("psql", port);
        cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-At", "-c", sql]);
        let out = run_checked(&mut cmd, PSQL_TIMEOUT)?;
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        if s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }

    /// `pgbench -i -s <scale>` against 127.0.0.1:`port`. Panics on failure.
    pub fn pgbench_init(&self, port: u16, scale: u32) {
        let mut cmd = self.client("pgbench", port);
        cmd.args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .args(["-U", "postgres", "postgres"]);
        if let Err(e) = run_checked(&mut cmd, Duration::from_secs(600)) {
            panic!("pgbench -i on port {port}: {e}");
        }
    }

    /// Runs pgbench with `args` (e.g. `["-S", "-c", "8", "-j", "2", "-T", "10"]`) against
    /// 127.0.0.1:`port` and returns the TPS it reports (excluding connection time).
    /// Panics on failure.
    pub fn pgbench(&self, port: u16, args: &[&str]) -> f64 {
        self.try_pgbench(port, args)
            .unwrap_or_else(|e| panic!("pgbench on port {port}: {e}"))
    }

    /// [`Postgres::pgbench`] that returns the error instead of panicking.
    pub fn try_pgbench(&self, port: u16, args: &[&str]) -> Result<f64, PgError> {
        let mut cmd = self.client("pgbench", port);
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg("postgres");
        let out = run_checked(&mut cmd, Duration::from_secs(900))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_pgbench_tps(&stdout)
            .ok_or_else(|| err(format!("no \"tps = \" line in pgbench output:\n{stdout}")))
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`) and removes its directory.
    pub fn stop(mut self) -> Result<(), PgError> {
        // Drop then removes the directory; it does not stop again once `stopped` is set.
        self.pg_ctl_stop("fast")
    }

    fn initdb(&self, opts: &PostgresOptions) -> Result<(), PgError> {
        let pwfile = self.dir.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", opts.password))?;
        self.chown(&pwfile)?;
        let mut cmd = self.as_server_user(self.bin_dir.join("initdb"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let result = run_checked(&mut cmd, Duration::from_secs(120));
        let _ = std::fs::remove_file(&pwfile);
        result?;

        let mut conf = vec![
            "# Written by the patroxy test harness.".to_owned(),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", self.dir.display()),
            format!("max_connections = {}", opts.max_connections),
            "password_encryption = 'scram-sha-256'".to_owned(),
        ];
        if !opts.fsync {
            conf.extend(
                [
                    "fsync = off",
                    "synchronous_commit = off",
                    "full_page_writes = off",
                ]
                .map(String::from),
            );
        }
        if let Some(n) = &opts.netns {
            conf.push(format!("listen_addresses = '127.0.0.1,{}'", n.listen));
        }
        conf.extend(opts.extra_conf.iter().cloned());
        self.append_conf(&conf)?;

        let method = match opts.auth {
            Auth::Scram => "scram-sha-256",
            Auth::Trust => "trust",
        };
        let mut hba = format!(
            "# Written by the patroxy test harness: loopback only.\n\
             local all all trust\n\
             host all all 127.0.0.1/32 {method}\n"
        );
        if let Some(n) = &opts.netns {
            hba.push_str(&format!("host all all {} {method}\n", n.clients));
        }
        std::fs::write(self.data_dir().join("pg_hba.conf"), hba)?;
        Ok(())
    }

    fn append_conf(&self, lines: &[String]) -> Result<(), PgError> {
        use std::io::Write as _;
        let path = self.data_dir().join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
        for line in lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), PgError> {
        let mut cmd = self.as_server_user(self.bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-s", "start"]);
        run_checked(&mut cmd, Duration::from_secs(90)).map_err(|e| {
            err(format!(
                "{e}\nserver log ({}):\n{}",
                self.dir.display(),
                self.log()
            ))
        })?;
        Ok(())
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), PgError> {
        if self.stopped {
            return Ok(());
        }
        let mut cmd = self.as_server_user(self.bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "-t", "30", "-s", "stop"]);
        let result = run_checked(&mut cmd, Duration::from_secs(45)).map(|_| ());
        if result.is_err() {
            kill_postmaster(&self.data_dir());
        }
        self.stopped = true;
        result
    }

    /// Polls pg_isready over TCP: pg_ctl's own wait only proves the unix socket is up.
    fn wait_ready(&self, timeout: Duration) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut cmd = self.client("pg_isready", self.port);
            cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "2"]);
            let out = run_with_timeout(&mut cmd, Duration::from_secs(5))?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "PostgreSQL on 127.0.0.1:{} not ready after {timeout:?}; server log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs as the `postgres` OS user when we are root, from a directory it
    /// can read (root's cwd usually is not).
    fn as_server_user(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        match (&self.netns, self.run_as) {
            (Some(ns), Some((uid, gid))) => {
                crate::netns::enter(&mut cmd, ns);
                // std switches the user before pre_exec hooks run, and setns needs root: the
                // switch comes after entering the namespace instead.
                // SAFETY: setgroups, setgid and setuid are async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setgroups(0, std::ptr::null()) != 0
                            || libc::setgid(gid) != 0
                            || libc::setuid(uid) != 0
                        {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            (Some(ns), None) => {
                crate::netns::enter(&mut cmd, ns);
            }
            (None, Some((uid, gid))) => {
                cmd.uid(uid).gid(gid);
            }
            (None, None) => {}
        }
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), PgError> {
        chown(path, self.run_as)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(e) = self.pg_ctl_stop("immediate") {
            eprintln!("stopping PostgreSQL in {}: {e}", self.dir.display());
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- PostgreSQL log tail ({}) -----", self.dir.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/usr/lib/postgresql/<newest version>/bin`, or `$PATROXY_PG_BIN` when set.
pub fn pg_bin_dir() -> Result<PathBuf, PgError> {
    if let Some(dir) = std::env::var_os("PATROXY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .map_err(|e| {
            err(format!(
                "{}: {e} (is postgresql installed? `cargo xtask setup`)",
                root.display()
            ))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        err(format!(
            "no PostgreSQL server in {}/<version>/bin (run `cargo xtask setup`)",
            root.display()
        ))
    })
}

/// Parses pgbench's "tps = N (without initial connection time)" line (any "tps = " line
/// if that one is missing).
pub fn parse_pgbench_tps(output: &str) -> Option<f64> {
    let value = |line: &str| -> Option<f64> {
        line.trim()
            .strip_prefix("tps = ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    output
        .lines()
        .filter(|l| l.contains("without initial connection time"))
        .find_map(value)
        .or_else(|| output.lines().find_map(value))
}

/// Empties (or creates) `dir`, owned by the server user, mode 0700. A server left running
/// there by an earlier crash is stopped first.
fn prepare_dir(bin_dir: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), PgError> {
    let data = dir.join("data");
    if data.join("postmaster.pid").exists() {
        let mut cmd = Command::new(bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-s", "stop"]);
        cmd.current_dir("/").stdin(Stdio::null());
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        if run_with_timeout(&mut cmd, Duration::from_secs(30)).is_err() {
            kill_postmaster(&data);
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| err(format!("removing old {}: {e}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    chown(dir, run_as)
}

fn chown(path: &Path, run_as: Option<(u32, u32)>) -> Result<(), PgError> {
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| err(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster named in its pid
/// file (its children exit when it does).
fn kill_postmaster(data_dir: &Path) {
    let pid = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<libc::pid_t>().ok());
    if let Some(pid) = pid.filter(|&p| p > 1) {
        // SAFETY: kill(2) on the pid PostgreSQL recorded for this data dir.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// uid and gid of the `postgres` OS user (created by Debian's postgresql package).
fn postgres_user() -> Result<(u32, u32), PgError> {
    let name = CString::new("postgres").expect("no NUL");
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both valid for the lengths given.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(err(
            "running as root but there is no `postgres` OS user to run PostgreSQL as \
             (install postgresql: `cargo xtask setup`)",
        ));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// Runs `cmd` with stdout/stderr captured, killing it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, PgError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("spawning {cmd:?}: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!(
                "{cmd:?} did not finish within {timeout:?}; killed"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// [`run_with_timeout`] that turns a non-zero exit into an error carrying stderr.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output, PgError> {
    let out = run_with_timeout(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(err(format!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pgbench_tps;

    #[test]
    fn parses_pgbench15_output() {
        let out = "number of failed transactions: 0 (0.000%)\n\
                   latency average = 0.480 ms\n\
                   initial connection time = 12.345 ms\n\
                   tps = 16645.193018 (without initial connection time)\n";
        assert_eq!(parse_pgbench_tps(out), Some(16645.193018));
        assert_eq!(
            parse_pgbench_tps("tps = 12.5 (including connections establishing)\n"),
            Some(12.5)
        );
        assert_eq!(parse_pgbench_tps("nothing"), None);
    }
}
