//! The verdict program's debug log (aya-log): which globals the loader sets, and the task that
//! prints its lines.
//!
//! Off by default (`bpf_log = false`): the program's `PATROXY_LOG` global stays 0, the verifier
//! removes the logging code, and no userspace logger runs. On, each decision becomes one line
//! at target `patroxy::ebpf`, at most `bpf_log_rate` per second per CPU; the kernel counts the
//! lines over that rate in LOG_LIMIT and this task reports the count.
use std::{io, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
};
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use super::maps::{MAP_LOG_LIMIT, MAP_LOG_RING};
use crate::config::Global;
use patroxy_common::LogLimit;

/// Turns `bpf_log` on or off for one run without editing the config file.
pub const ENV: &str = "PATROXY_BPF_LOG";
/// How often the count of lines over the rate is reported (when it grew).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Kernel logging is on, at this many lines per second per CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLog {
    pub rate: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{ENV}={0:?}: expected 1, true or on (log) or 0, false or off (do not)")]
pub struct BadEnv(String);

impl KernelLog {
    /// `bpf_log`/`bpf_log_rate` from the config, with `PATROXY_BPF_LOG` taking precedence.
    pub fn from_config(global: &Global) -> Result<Option<Self>, BadEnv> {
        Self::resolve(global, std::env::var(ENV).ok().as_deref())
    }

    fn resolve(global: &Global, env: Option<&str>) -> Result<Option<Self>, BadEnv> {
        let on = match env.map(str::trim) {
            None | Some("") => global.bpf_log,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "on" => true,
                "0" | "false" | "off" => false,
                _ => return Err(BadEnv(v.to_owned())),
            },
        };
        Ok(on.then_some(Self {
            rate: global.bpf_log_rate,
        }))
    }

    /// Loads `object` with the program's log globals set. Off also shrinks the unused ring
    /// buffer to one page (aya-log-ebpf declares 128 KiB). The maps in `unused` (another
    /// feature's, turned off) are created with one entry.
    pub(super) fn load_object(
        log: Option<Self>,
        object: &[u8],
        unused: &[&str],
    ) -> Result<Ebpf, aya::EbpfError> {
        let on = u8::from(log.is_some());
        let rate = u64::from(log.map_or(1, |l| l.rate));
        let mut loader = EbpfLoader::new();
        loader
            .override_global("PATROXY_LOG", &on, true)
            .override_global("PATROXY_LOG_RATE", &rate, true);
        for name in unused {
            loader.map_max_entries(name, 1);
        }
        if log.is_none() {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if let Ok(page) = u32::try_from(page) {
                loader.map_max_entries(MAP_LOG_RING, page);
            }
        }
        loader.load(object)
    }

    /// Takes the ring buffer and the buckets out of `ebpf` and prints the lines on a task of
    /// the current runtime for as long as it runs.
    pub(super) fn start(self, ebpf: &mut Ebpf) -> io::Result<()> {
        // Without a runtime AsyncFd and spawn would panic.
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let logger = EbpfLogger::init(ebpf).map_err(io::Error::other)?;
        let limits = ebpf
            .take_map(MAP_LOG_LIMIT)
            .ok_or_else(|| io::Error::other("the eBPF object has no LOG_LIMIT"))
            .and_then(|m| PerCpuArray::try_from(m).map_err(io::Error::other))?;
        // SAFETY: the logger owns the ring buffer's fd and always reports that one.
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        info!(
            lines_per_sec_per_cpu = self.rate,
            "eBPF debug log on: verdict decisions are logged at target patroxy::ebpf"
        );
        // The logger's type names the `log` crate's trait; an async block keeps it unnamed here.
        tokio::spawn(async move {
            let mut report = tokio::time::interval(REPORT_EVERY);
            let mut reported = 0;
            loop {
                tokio::select! {
                    ready = logger.readable_mut() => {
                        let Ok(mut guard) = ready else {
                            warn!("eBPF log ring buffer unreadable; no more eBPF lines");
                            return;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    _ = report.tick() => reported = report_suppressed(&limits, reported),
                }
            }
        });
        Ok(())
    }
}

/// Logs how many lines the kernel counted instead of printing since `reported`; returns the new
/// total.
fn report_suppressed(limits: &PerCpuArray<MapData, LogLimit>, reported: u64) -> u64 {
    let total = suppressed(limits);
    if total > reported {
        info!(
            suppressed = total - reported,
            "eBPF log lines over bpf_log_rate were counted, not printed, in the last {}s",
            REPORT_EVERY.as_secs()
        );
    }
    total
}

/// Lines over the rate so far, all CPUs.
fn suppressed(limits: &PerCpuArray<MapData, LogLimit>) -> u64 {
    limits
        .get(&0, 0)
        .map(|per_cpu| per_cpu.iter().map(|l| l.suppressed).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(bpf_log: bool) -> Global {
        crate::config::parse(
            &format!(
                "[global]\nbpf_log = {bpf_log}\nbpf_log_rate = 7\n[defaults]\ntimeout_client = \"1s\"\n\
                 timeout_server = \"1s\"\ntimeout_connect = \"1s\"\n[[server]]\nname = \"a\"\n\
                 address = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:2\"\n\
                 servers = [\"a\"]\n"
            ),
            "t.toml",
        )
        .unwrap()
        .global
    }

    #[test]
    fn env_overrides_the_file_both_ways() {
        let on = Some(KernelLog { rate: 7 });
        assert_eq!(KernelLog::resolve(&global(false), None).unwrap(), None);
        assert_eq!(KernelLog::resolve(&global(true), None).unwrap(), on);
        assert_eq!(KernelLog::resolve(&global(true), Some("")).unwrap(), on);
        for v in ["1", "true", "ON", " on "] {
            assert_eq!(
                KernelLog::resolve(&global(false), Some(v)).unwrap(),
                on,
                "{v}"
            );
        }
        for v in ["0", "false", "Off"] {
            assert_eq!(
                KernelLog::resolve(&global(true), Some(v)).unwrap(),
                None,
                "{v}"
            );
        }
        let err = KernelLog::resolve(&global(false), Some("yes")).unwrap_err();
        assert!(
            err.to_string().starts_with("PATROXY_BPF_LOG=\"yes\""),
            "{err}"
        );
    }
}
