//! The traffic of the soak, one thread per kind and patroxy, each looping until the deadline:
//! - `churn`: pgbench `-C` (a session opened and closed per transaction), rate-limited;
//! - `long`: pgbench without `-C` (a few sessions held for a whole run);
//! - `bulk`: a generated file copied in (`\copy ... from`) and back out through the proxy in
//!   one session, then compared byte for byte with what was sent;
//! - `flap`: pgbench `-C` on the loopback listener whose server flaps (failures expected).
//!
//! A failed run counts as expected when it met a planned disruption, else as an error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use patroxy_tests::postgres::{DEFAULT_PASSWORD, run_with_timeout};

use super::lab::Target;
use super::tally::{Disruptions, Tally};

/// Seconds per pgbench run: short enough that one switchover spoils little of the count.
const RUN_SECS: u64 = 15;
/// Bytes per bulk transfer, each way.
const BULK_BYTES: usize = 8 << 20;

/// How client tools reach PostgreSQL through a proxy.
#[derive(Clone)]
pub struct Client {
    pub bin_dir: PathBuf,
}

impl Client {
    pub fn cmd(&self, tool: &str, port: u16) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(tool));
        cmd.env("PGPASSWORD", DEFAULT_PASSWORD)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        cmd
    }
}

/// What one thread does, and whether its failures are planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Churn,
    Long,
    Bulk,
    Flap,
}

impl Kind {
    /// The kinds a patroxy gets: flap only where a listener flaps.
    pub fn for_target(t: &Target) -> Vec<Kind> {
        let mut kinds = vec![Kind::Churn, Kind::Long, Kind::Bulk];
        if t.flap_port.is_some() {
            kinds.push(Kind::Flap);
        }
        kinds
    }
}

/// Everything a workload thread needs.
pub struct Run<'a> {
    pub target: &'a Target,
    pub client: &'a Client,
    pub tally: &'a Mutex<Tally>,
    pub disruptions: &'a Disruptions,
    pub deadline: Instant,
    pub work_dir: &'a Path,
}

impl Run<'_> {
    pub fn run(&self, kind: Kind) {
        let mut round = 0u64;
        while Instant::now() + Duration::from_secs(2) < self.deadline {
            round += 1;
            let started = Instant::now();
            let result = match kind {
                Kind::Churn => self.pgbench(
                    self.target.steady_port,
                    &["-C", "-c", "4", "-j", "2", "-R", "40"],
                ),
                Kind::Long => self.pgbench(
                    self.target.steady_port,
                    &["-c", "4", "-j", "2", "-R", "200"],
                ),
                Kind::Flap => self.pgbench(
                    self.target
                        .flap_port
                        .expect("flap runs where a listener flaps"),
                    &["-C", "-c", "2", "-j", "1", "-R", "20"],
                ),
                Kind::Bulk => self.bulk(round),
            };
            let mut tally = self.tally.lock().expect("tally lock");
            let mut failed = false;
            match result {
                Ok(Done::Transactions(n)) => {
                    tally.transactions += n;
                    tally.runs_ok += 1;
                    tally.flap_runs_ok += u64::from(matches!(kind, Kind::Flap));
                }
                Ok(Done::Bytes(n)) => {
                    tally.bytes_checked += n;
                    tally.runs_ok += 1;
                }
                Err(Failure::Mismatch(msg)) => {
                    failed = true;
                    tally.mismatches += 1;
                    Tally::note(
                        &mut tally.unexpected,
                        format!("{}: {msg}", self.target.name),
                    );
                }
                Err(Failure::Failed(msg)) => {
                    failed = true;
                    if matches!(kind, Kind::Flap) {
                        tally.flap_failures += 1;
                    } else if self.target.switched_over
                        && self.disruptions.overlaps(started, Instant::now())
                    {
                        tally.switchover_failures += 1;
                    } else {
                        Tally::note(
                            &mut tally.unexpected,
                            format!("{} {kind:?}: {msg}", self.target.name),
                        );
                    }
                }
            }
            drop(tally);
            // A refused run ends at once: pause rather than spin while the server is down.
            if failed || matches!(kind, Kind::Bulk) {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }

    /// pgbench's select-only script for [`RUN_SECS`] (or until the deadline).
    fn pgbench(&self, port: u16, args: &[&str]) -> Result<Done, Failure> {
        let secs = RUN_SECS
            .min(
                self.deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs(),
            )
            .max(1);
        let mut cmd = self.client.cmd("pgbench", port);
        cmd.args(["-n", "-S", "-T", &secs.to_string()]).args(args);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(secs + 60))
            .map_err(|e| Failure::Failed(format!("pgbench: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let field = |prefix: &str| -> Option<u64> {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.split('/').next()?.parse().ok())
        };
        let done = field("number of transactions actually processed:");
        let failed = field("number of failed transactions:").unwrap_or(0);
        match done {
            Some(n) if out.status.success() && failed == 0 => Ok(Done::Transactions(n)),
            _ => Err(Failure::Failed(format!(
                "pgbench {args:?} on port {port}: {} ({failed} failed transactions): {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            ))),
        }
    }

    /// Copies a generated file in and back out in one session; compares the bytes.
    fn bulk(&self, round: u64) -> Result<Done, Failure> {
        let stem = self.work_dir.join(format!("{}-bulk", self.target.name));
        let sent_path = stem.with_extension("in.tsv");
        let back_path = stem.with_extension("out.tsv");
        let script = stem.with_extension("sql");
        let sent = generate(BULK_BYTES, round ^ u64::from(self.target.steady_port) << 32);
        let io = |e: std::io::Error| Failure::Failed(format!("bulk files: {e}"));
        std::fs::write(&sent_path, &sent).map_err(io)?;
        let _ = std::fs::remove_file(&back_path);
        std::fs::write(
            &script,
            format!(
                "CREATE TEMP TABLE soak_bulk (id int, payload text);\n\
                 \\copy soak_bulk from '{}'\n\
                 \\copy (SELECT id, payload FROM soak_bulk ORDER BY id) to '{}'\n",
                sent_path.display(),
                back_path.display()
            ),
        )
        .map_err(io)?;
        let mut cmd = self.client.cmd("psql", self.target.steady_port);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&script);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(120))
            .map_err(|e| Failure::Failed(format!("psql: {e}")))?;
        if !out.status.success() {
            return Err(Failure::Failed(format!(
                "bulk copy through port {}: {}: {}",
                self.target.steady_port,
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            )));
        }
        let back = std::fs::read(&back_path).map_err(io)?;
        if back != sent {
            let at = back.iter().zip(&sent).position(|(a, b)| a != b);
            return Err(Failure::Mismatch(format!(
                "bulk round {round}: {} bytes sent, {} read back, first difference at {at:?}",
                sent.len(),
                back.len()
            )));
        }
        Ok(Done::Bytes(2 * sent.len() as u64))
    }
}

enum Done {
    Transactions(u64),
    Bytes(u64),
}

enum Failure {
    /// The run failed (connection reset, refused, timed out): planned or not.
    Failed(String),
    /// Bytes came back different: never planned.
    Mismatch(String),
}

/// COPY text rows `id<TAB>hex` of pseudo-random bytes (hex needs no COPY escaping, so the
/// file read back must equal the file sent).
pub fn generate(bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(bytes + 300);
    let mut id = 0u64;
    while out.len() < bytes {
        id += 1;
        out.extend_from_slice(format!("{id}\t").as_bytes());
        for _ in 0..16 {
            out.extend_from_slice(format!("{:016x}", next()).as_bytes());
        }
        out.push(b'\n');
    }
    out
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::generate;

    #[test]
    fn generated_rows_are_copy_text_without_escapes() {
        let data = generate(10_000, 7);
        assert!(data.len() >= 10_000);
        assert_eq!(
            data,
            generate(10_000, 7),
            "the same seed gives the same bytes"
        );
        assert_ne!(data, generate(10_000, 8));
        for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = std::str::from_utf8(line).expect("ASCII");
            let (id, payload) = text.split_once('\t').expect("two columns");
            assert!(id.parse::<u64>().is_ok());
            assert_eq!(payload.len(), 256);
            assert!(payload.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
}
