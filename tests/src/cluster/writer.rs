//! A continuous writer: one INSERT every ~20 ms through a proxy's write port, reconnecting
//! after any error, recording every success (with the server that took it) and every error
//! by kind. [`Report`] computes the write outage (the longest gap between two successful
//! writes) and the errors after a given moment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, SimpleQueryMessage};

use crate::postgres::DEFAULT_PASSWORD;

/// Why a write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No session could be established (connection refused or closed during startup,
    /// "the database system is starting up/shutting down").
    Refused,
    /// An established session was broken (reset, EOF, terminated by the server).
    Reset,
    /// `cannot execute INSERT in a read-only transaction`: the write reached a replica.
    ReadOnly,
    /// A connect or query that did not finish in time.
    Timeout,
    Other,
}

#[derive(Clone, Debug)]
pub struct Success {
    /// When the INSERT was sent: what routed it is the proxy's state then, not at `at`.
    pub sent_at: SystemTime,
    /// When its answer arrived.
    pub at: SystemTime,
    /// When the session that wrote was established.
    pub connected_at: SystemTime,
    /// How long establishing it took (TCP, the proxy's queue, startup and SCRAM).
    pub connect_took: Duration,
    /// `inet_server_addr()` of the node that took the write.
    pub server: String,
    /// The row's `id` in `ptx_writes`: a committed write must still be there afterwards.
    pub id: i64,
}

#[derive(Clone, Debug)]
pub struct WriteError {
    pub at: SystemTime,
    /// When the session was established (None: the connect itself failed).
    pub connected_at: Option<SystemTime>,
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Default, Debug)]
struct Log {
    successes: Vec<Success>,
    errors: Vec<WriteError>,
}

/// The running writer; [`Writer::stop`] returns its [`Report`].
pub struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    handle: Option<JoinHandle<()>>,
    pub started: SystemTime,
}

fn config(host: &str, port: u16, app: &str) -> Config {
    let mut c = Config::new();
    c.host(host)
        .port(port)
        .user("postgres")
        .password(DEFAULT_PASSWORD)
        .dbname("postgres")
        .application_name(app)
        .connect_timeout(Duration::from_secs(3))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(2));
    c
}

/// Connects to 127.0.0.1:`port` as the superuser.
pub fn connect(port: u16, app: &str) -> Result<Client, postgres::Error> {
    config("127.0.0.1", port, app).connect(NoTls)
}

/// Connects to a node directly (host in the harness's /24), never through a proxy: only that
/// host (a second `Config::host` would be tried after the first, which may be a proxy).
pub fn connect_host(host: &str, port: u16) -> Result<Client, postgres::Error> {
    config(host, port, "ptx-harness").connect(NoTls)
}

/// The first row of `sql` as text columns (NULL as "").
pub fn query_row(client: &mut Client, sql: &str) -> Result<Vec<String>, postgres::Error> {
    for m in client.simple_query(sql)? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok((0..r.len())
                .map(|i| r.get(i).unwrap_or_default().to_owned())
                .collect());
        }
    }
    Ok(Vec::new())
}

/// Classifies an error; `established` says whether the session was up before it.
pub fn classify(e: &postgres::Error, established: bool) -> ErrorKind {
    if let Some(code) = e.code() {
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return ErrorKind::ReadOnly;
        }
        if *code == SqlState::CANNOT_CONNECT_NOW {
            return ErrorKind::Refused;
        }
        if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
            return if established {
                ErrorKind::Reset
            } else {
                ErrorKind::Refused
            };
        }
        return ErrorKind::Other;
    }
    let text = format!("{e:?}").to_lowercase();
    if text.contains("timed out") || text.contains("timeout") {
        return ErrorKind::Timeout;
    }
    if !established {
        return ErrorKind::Refused;
    }
    if text.contains("reset")
        || text.contains("closed")
        || text.contains("unexpected eof")
        || text.contains("broken pipe")
        || e.is_closed()
    {
        return ErrorKind::Reset;
    }
    ErrorKind::Other
}

/// Creates the table the writer inserts into (through the write port).
pub fn prepare(port: u16) -> Result<(), postgres::Error> {
    let mut c = connect(port, "ptx-harness")?;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS ptx_writes (id bigserial PRIMARY KEY, \
         at timestamptz NOT NULL DEFAULT clock_timestamp(), node text)",
    )
}

impl Writer {
    /// Starts writing through 127.0.0.1:`port` every `interval`.
    pub fn start(port: u16, interval: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let (s, l) = (stop.clone(), log.clone());
        let handle = std::thread::spawn(move || run(port, interval, &s, &l));
        Writer {
            stop,
            log,
            handle: Some(handle),
            started: SystemTime::now(),
        }
    }

    /// Successful writes so far.
    pub fn successes(&self) -> usize {
        self.log.lock().unwrap().successes.len()
    }

    /// The last success, if any.
    pub fn last_success(&self) -> Option<Success> {
        self.log.lock().unwrap().successes.last().cloned()
    }

    /// Waits until `n` more writes succeeded on a server other than `not_on` (or any when
    /// None); false on timeout.
    pub fn wait_successes_on(&self, not_on: Option<&str>, n: usize, timeout: Duration) -> bool {
        self.wait_successes_since(not_on, n, SystemTime::now(), timeout)
    }

    /// Like [`Writer::wait_successes_on`], counting successes since `from`.
    pub fn wait_successes_since(
        &self,
        not_on: Option<&str>,
        n: usize,
        from: SystemTime,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let count = self
                .log
                .lock()
                .unwrap()
                .successes
                .iter()
                .filter(|s| s.at >= from && not_on.is_none_or(|x| s.server != x))
                .count();
            if count >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        Report {
            started: self.started,
            successes: log.successes,
            errors: log.errors,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run(port: u16, interval: Duration, stop: &AtomicBool, log: &Mutex<Log>) {
    let mut session: Option<(Client, SystemTime, Duration)> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = Instant::now() + interval;
        if session.is_none() {
            let connecting = Instant::now();
            match connect(port, "ptx-writer") {
                Ok(c) => session = Some((c, SystemTime::now(), connecting.elapsed())),
                Err(e) => {
                    log.lock().unwrap().errors.push(WriteError {
                        at: SystemTime::now(),
                        connected_at: None,
                        kind: classify(&e, false),
                        message: e.to_string(),
                    });
                    continue;
                }
            }
        }
        let (client, connected_at, connect_took) = session.as_mut().expect("connected above");
        let (connected_at, connect_took) = (*connected_at, *connect_took);
        let sent_at = SystemTime::now();
        match query_row(
            client,
            "INSERT INTO ptx_writes (node) VALUES (host(inet_server_addr())) RETURNING node, id",
        ) {
            Ok(row) => log.lock().unwrap().successes.push(Success {
                sent_at,
                at: SystemTime::now(),
                connected_at,
                connect_took,
                id: row.get(1).and_then(|id| id.parse().ok()).unwrap_or(-1),
                server: row.into_iter().next().unwrap_or_default(),
            }),
            Err(e) => {
                let kind = classify(&e, true);
                log.lock().unwrap().errors.push(WriteError {
                    at: SystemTime::now(),
                    connected_at: Some(connected_at),
                    kind,
                    message: format!("{e}: {:?}", e.as_db_error().map(|d| d.message())),
                });
                // Reconnect after any error, as an application's pool would.
                session = None;
            }
        }
    }
}

/// What the writer saw.
#[derive(Debug)]
pub struct Report {
    pub started: SystemTime,
    pub successes: Vec<Success>,
    pub errors: Vec<WriteError>,
}

impl Report {
    /// The longest gap between two consecutive successful writes (the write outage), and
    /// when it started.
    pub fn outage(&self) -> (Duration, Option<SystemTime>) {
        self.successes
            .windows(2)
            .map(|w| {
                (
                    w[1].at.duration_since(w[0].at).unwrap_or_default(),
                    Some(w[0].at),
                )
            })
            .max_by_key(|(d, _)| *d)
            .unwrap_or_default()
    }

    pub fn count(&self, kind: ErrorKind) -> usize {
        self.errors.iter().filter(|e| e.kind == kind).count()
    }

    /// Errors of `kind` that happened after `t`.
    pub fn count_after(&self, kind: ErrorKind, t: SystemTime) -> usize {
        self.errors
            .iter()
            .filter(|e| e.kind == kind && e.at > t)
            .count()
    }

    /// Errors of `kind` on sessions established after `t` (a new connection routed to a
    /// server after `t`).
    pub fn count_connected_after(&self, kind: ErrorKind, t: SystemTime) -> usize {
        self.errors
            .iter()
            .filter(|e| e.kind == kind && e.connected_at.is_some_and(|c| c > t))
            .count()
    }

    /// Successful writes taken by `server` that were sent after `t` (one sent before `t` may
    /// be answered after it).
    pub fn successes_on_after(&self, server: &str, t: SystemTime) -> usize {
        self.successes
            .iter()
            .filter(|s| s.server == server && s.sent_at > t)
            .count()
    }

    /// When the first write after `t` succeeded on a server other than `not_on` (the new
    /// primary).
    pub fn first_success_elsewhere(&self, not_on: &str, t: SystemTime) -> Option<SystemTime> {
        self.successes
            .iter()
            .find(|s| s.server != not_on && s.at > t)
            .map(|s| s.at)
    }

    /// One line: outage and error counts.
    /// The ids of the successful writes that are no longer in `ptx_writes`, read through
    /// 127.0.0.1:`port` (the current primary).
    pub fn lost_writes(&self, port: u16) -> Result<Vec<i64>, postgres::Error> {
        let mut c = connect(port, "ptx-harness")?;
        let ids: Vec<String> = self.successes.iter().map(|s| s.id.to_string()).collect();
        let found = c.simple_query(&format!(
            "SELECT id FROM ptx_writes WHERE id IN ({})",
            if ids.is_empty() {
                "NULL".to_owned()
            } else {
                ids.join(",")
            }
        ))?;
        let found: std::collections::HashSet<i64> = found
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .collect();
        Ok(self
            .successes
            .iter()
            .map(|s| s.id)
            .filter(|id| !found.contains(id))
            .collect())
    }

    pub fn summary(&self) -> String {
        let (outage, _) = self.outage();
        format!(
            "writes ok {}, outage {:.2}s, refused {}, reset {}, read-only {}, timeout {}, other {}",
            self.successes.len(),
            outage.as_secs_f64(),
            self.count(ErrorKind::Refused),
            self.count(ErrorKind::Reset),
            self.count(ErrorKind::ReadOnly),
            self.count(ErrorKind::Timeout),
            self.count(ErrorKind::Other),
        )
    }

    /// A few distinct error messages, for diagnosis.
    pub fn sample_errors(&self) -> String {
        let mut seen = Vec::<String>::new();
        for e in &self.errors {
            let m = format!("{:?}: {}", e.kind, e.message);
            if !seen.contains(&m) && seen.len() < 8 {
                seen.push(m);
            }
        }
        seen.join("\n")
    }
}
