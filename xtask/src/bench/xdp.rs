//! `cargo xtask bench --xdp`: what the XDP allowlist costs the traffic it lets through, and
//! what it saves against denied traffic, in one run (issue 12). Writes bench/xdp.md.
//!
//! Five client namespaces joined to this host by veth pairs (`pxd*`, 10.214.11-15.0/24, apart
//! from the XDP test's and the bench topology's), one PostgreSQL and patroxy (sockmap data
//! path) here:
//! - allowed traffic: pgbench -S from `pxd-t`, whose veth carries the tc program (patroxy
//!   attaches it, `mode = "tc"`), from `pxd-x` and `pxd-g`, whose veths carry patroxy's XDP
//!   program in native and in generic mode (the bench attaches it by id, as `ip link` would:
//!   the same program and maps), and from `pxd-n`, whose veth has none, in rounds whose order
//!   rotates, through the same patroxy. Besides the tps, each run's CPU time (all CPUs,
//!   softirq apart) per transaction: what the allowlist on a veth costs, less noisy than the
//!   tps on a loaded machine;
//! - denied traffic: hping3 floods SYNs from `pxd-d` (not allowed) to the protected port,
//!   pinned to CPU 0, for `flood_secs`: first with the XDP program in native mode on `pxd-d`'s
//!   veth (it drops before tc ingress, where the tc program sits too), then with the tc program
//!   alone, then with patroxy restarted without the allowlist and an nftables rule with the
//!   same meaning (drop TCP to the port from any IPv4 source but the allowed ones) on the same
//!   veth, as the seed's UFW does.
//!   A veth delivers what its peer sends on the sending CPU, so the generator, the program or
//!   the rule, and the drop all run on CPU 0: packets per second there is the rate one core
//!   drops at, while it also generates them.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use patroxy_tests::{
    config::{
        AllowConfig, Bpf, Defaults, ListenerConfig, PortRef, ProxyConfig, ServerConfig,
        StatsConfig, XdpConfig,
    },
    netns,
    ports::{free_tcp_port, wait_for_listen},
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    process::ChildGuard,
    stats_client::get_ok,
};

use super::procfs::{self, clk_tck};

struct Host {
    ns: &'static str,
    veth: &'static str,
    client: &'static str,
    host: &'static str,
}

const WITH_XDP: Host = Host {
    ns: "pxd-x",
    veth: "pxdvx",
    client: "10.214.11.2",
    host: "10.214.11.1",
};
const WITH_TC: Host = Host {
    ns: "pxd-t",
    veth: "pxdvt",
    client: "10.214.15.2",
    host: "10.214.15.1",
};
const GENERIC_XDP: Host = Host {
    ns: "pxd-g",
    veth: "pxdvg",
    client: "10.214.14.2",
    host: "10.214.14.1",
};
const WITHOUT_XDP: Host = Host {
    ns: "pxd-n",
    veth: "pxdvn",
    client: "10.214.12.2",
    host: "10.214.12.1",
};
const DENIED: Host = Host {
    ns: "pxd-d",
    veth: "pxdvd",
    client: "10.214.13.2",
    host: "10.214.13.1",
};
const HOSTS: [&Host; 5] = [&WITH_XDP, &WITH_TC, &GENERIC_XDP, &WITHOUT_XDP, &DENIED];
/// The sources the rule allows: every client but `DENIED`.
const ALLOWED: [&str; 4] = [
    "10.214.11.0/24",
    "10.214.12.0/24",
    "10.214.14.0/24",
    "10.214.15.0/24",
];
const NFT_TABLE: &str = "pxdbench";

#[derive(Clone, Copy, Debug)]
pub struct XdpPlan {
    pub rounds: u32,
    pub select_secs: u64,
    pub flood_secs: u64,
    pub clients: u32,
    pub scale: u32,
}

/// The namespaces and veths, and the nftables table; removed on drop.
struct Net;

impl Net {
    fn up() -> Result<Net> {
        down();
        for h in HOSTS {
            netns::add(h.ns)?;
            netns::veth(
                None,
                h.veth,
                &format!("{}/24", h.host),
                h.ns,
                "eth0",
                &format!("{}/24", h.client),
            )?;
        }
        Ok(Net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        down();
    }
}

fn down() {
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", NFT_TABLE])
        .stderr(Stdio::null())
        .status();
    netns::remove(&HOSTS.map(|h| h.ns), &HOSTS.map(|h| h.veth));
}

fn config(pg: &Postgres, pin: &Path, port: u16, stats: u16, xdp: bool) -> ProxyConfig {
    let any = SocketAddr::from(([0, 0, 0, 0], port));
    let mut config = ProxyConfig::new(Defaults::new(
        Duration::from_secs(1800),
        Duration::from_secs(4),
    ))
    .data_path(Bpf::Required, pin)
    .server(ServerConfig::new("pg", pg.addr()))
    .listener(ListenerConfig::new("postgres_write", any, ["pg"]))
    .stats(StatsConfig::new(SocketAddr::from(([127, 0, 0, 1], stats))))
    .allow(AllowConfig::new(
        &ALLOWED,
        vec![PortRef::Name("postgres_write".into())],
    ));
    config.global.maxconn = Some(2000);
    if xdp {
        let mut xdp = XdpConfig::required(&[WITH_TC.veth, DENIED.veth]);
        xdp.mode = Some("tc".into());
        config = config.xdp(xdp);
    }
    config
}

fn start_patroxy(bin: &Path, work: &Path, name: &str, config: &ProxyConfig) -> Result<ChildGuard> {
    let file = work.join(format!("{name}.toml"));
    std::fs::write(&file, config.to_toml())?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--drain-grace", "1s", "--config"])
        .arg(&file)
        .env("PATROXY_LOG", "warn,patroxy::firewall=info");
    let mut child = ChildGuard::spawn(name, &mut cmd)?;
    if !wait_for_listen(config.bind(), Duration::from_secs(15)) {
        let status = child.try_wait().ok().flatten();
        bail!("{name} did not start (exit {status:?}):\n{}", child.log());
    }
    Ok(child)
}

/// One pgbench run: its throughput and the machine's CPU time per transaction.
#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    /// Busy time of every CPU (user, system, softirq...) per transaction, in microseconds:
    /// pgbench, patroxy, PostgreSQL and the kernel's network path together.
    cpu_us: f64,
    /// The softirq part of it, where a veth's receive path and an XDP program run.
    softirq_us: f64,
}

/// pgbench -S from `host` through patroxy.
fn pgbench(pg: &Postgres, host: &Host, port: u16, plan: &XdpPlan) -> Result<Run> {
    let template = pg.client("pgbench", port);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host.ns])
        .arg(template.get_program())
        .args(["-h", host.host, "-p", &port.to_string(), "-U", "postgres"])
        .args(["-S", "-n", "-c", &plan.clients.to_string(), "-j", "2"])
        .args(["-T", &plan.select_secs.to_string(), "postgres"]);
    for (k, v) in template.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let before = procfs::Counters::take(None);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(plan.select_secs + 60))
        .map_err(|e| anyhow::anyhow!("pgbench from {}: {e}", host.ns))?;
    let cpu = procfs::delta(&before, &procfs::Counters::take(None));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench from {} failed: {stdout}{}",
            host.ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tps = patroxy_tests::postgres::parse_pgbench_tps(&stdout)
        .with_context(|| format!("no tps in pgbench's output: {stdout}"))?;
    let transactions = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed: ")
        })
        .and_then(|v| v.split('/').next()?.trim().parse::<f64>().ok())
        .filter(|&n| n > 0.0)
        .with_context(|| format!("no transaction count in pgbench's output: {stdout}"))?;
    Ok(Run {
        tps,
        cpu_us: cpu.busy_ms * 1000.0 / transactions,
        softirq_us: cpu.softirq_ms * 1000.0 / transactions,
    })
}

/// Pins patroxy's XDP program at `prog_pin` for `ip link` (removed by the caller): patroxy
/// loads it beside the tc program it attached to `WITH_TC`'s veth, on the same maps, which is
/// how it is found.
fn pin_xdp_program(pin: &Path, prog_pin: &Path) -> Result<()> {
    let link = firewall_pin(pin).join(format!("tc_{}", WITH_TC.veth));
    let link: serde_json::Value = bpftool(&["link", "show", "pinned", &link.to_string_lossy()])?;
    let tc_id = link["prog_id"]
        .as_u64()
        .context("no prog_id in bpftool's link")?;
    let programs = bpftool(&["prog", "show"])?;
    let programs = programs
        .as_array()
        .context("bpftool prog show: not a list")?;
    let maps_of = |id: u64| {
        programs
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| p["map_ids"].clone())
    };
    let maps = maps_of(tc_id).context("the tc program is not listed")?;
    let xdp = programs
        .iter()
        .find(|p| p["name"] == "patroxy_xdp" && p["map_ids"] == maps)
        .and_then(|p| p["id"].as_u64())
        .context("no patroxy_xdp program on the tc program's maps")?;
    let status = Command::new("bpftool")
        .args(["prog", "pin", "id", &xdp.to_string()])
        .arg(prog_pin)
        .status()?;
    if !status.success() {
        bail!("bpftool prog pin id {xdp} failed");
    }
    Ok(())
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("bpftool (apt-get install bpftool)")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Attaches the pinned XDP program to `veth` in `mode` (`xdpdrv`, `xdpgeneric`) or, with
/// `None`, detaches what is there in `mode`; deleting the namespace's veth detaches it too.
fn xdp_link(veth: &str, mode: &str, prog_pin: Option<&Path>) -> Result<()> {
    match prog_pin {
        Some(prog) => netns::ip(&[
            "link",
            "set",
            "dev",
            veth,
            mode,
            "pinned",
            &prog.to_string_lossy(),
        ])?,
        None => netns::ip(&["link", "set", "dev", veth, mode, "off"])?,
    }
    Ok(())
}

/// patroxy's XDP pin directory under its pin path (`firewall::pin_dir`).
fn firewall_pin(pin: &Path) -> PathBuf {
    pin.join("xdp")
}

/// CPU 0's ticks in /proc/stat: (user + nice, system, softirq, all).
fn cpu0() -> [u64; 4] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu0 "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    [get(0) + get(1), get(2), get(6), f.iter().sum()]
}

/// A flood's outcome: packets dropped per second, and CPU 0's time by kind (share of the run).
struct Flood {
    dropped_pps: f64,
    /// CPU 0's system and softirq time per dropped packet: the kernel's side, the veth's
    /// transmit and receive with the filter, without the generator's user time.
    kernel_ns_per_packet: f64,
    user: f64,
    system: f64,
    softirq: f64,
}

/// Floods SYNs from the denied host at `port` for `secs`, pinned to CPU 0; `dropped` reads the
/// drop counter of whichever filter is in place.
fn flood(port: u16, secs: u64, dropped: impl Fn() -> Result<u64>) -> Result<Flood> {
    let before = dropped()?;
    let cpu_before = cpu0();
    let started = Instant::now();
    let out = Command::new("ip")
        .args([
            "netns", "exec", DENIED.ns, "taskset", "-c", "0", "timeout", "-s", "INT",
        ])
        .arg(secs.to_string())
        .args([
            "hping3",
            "--flood",
            "-q",
            "-S",
            "-p",
            &port.to_string(),
            DENIED.host,
        ])
        .output()
        .context("hping3 (apt-get install hping3; cargo xtask setup installs it)")?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cpu0();
    let n = dropped()? - before;
    if n == 0 {
        bail!(
            "the flood dropped nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let total = (cpu_after[3] - cpu_before[3]).max(1) as f64;
    let share = |i: usize| (cpu_after[i] - cpu_before[i]) as f64 / total;
    let kernel_secs =
        (cpu_after[1] + cpu_after[2] - cpu_before[1] - cpu_before[2]) as f64 / clk_tck();
    Ok(Flood {
        dropped_pps: n as f64 / elapsed,
        kernel_ns_per_packet: kernel_secs * 1e9 / n as f64,
        user: share(0),
        system: share(1),
        softirq: share(2),
    })
}

fn xdp_denied(stats: u16, port: u16) -> Result<u64> {
    let json: serde_json::Value =
        serde_json::from_str(&get_ok(SocketAddr::from(([127, 0, 0, 1], stats)), "/;json"))?;
    json["xdp"]["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["port"] == port))
        .and_then(|p| p["denied"].as_u64())
        .context("no XDP counters for the port in the stats JSON")
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("nft (apt-get install nftables; cargo xtask setup installs it)")?;
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())?;
    if !child.wait()?.success() {
        bail!("nft -f failed on:\n{script}");
    }
    Ok(())
}

/// The rule's counter of dropped packets.
fn nft_dropped() -> Result<u64> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", NFT_TABLE])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|o| {
            o["rule"]["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
        })
        .context("no counter in the nftables rule")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The clients compared on allowed traffic, the reference (no program) first.
const COMPARED: [(&Host, &str); 4] = [
    (&WITHOUT_XDP, "without a program"),
    (&WITH_TC, "tc (tcx)"),
    (&GENERIC_XDP, "XDP generic mode"),
    (&WITH_XDP, "XDP native mode"),
];

/// Each client's runs, in `COMPARED`'s order.
struct Rounds([Vec<Run>; 4]);

impl Rounds {
    fn median(&self, i: usize, field: impl Fn(&Run) -> f64) -> f64 {
        median(self.0[i].iter().map(&field).collect())
    }

    /// The median over rounds of client `i`'s tps over the reference's in the same round.
    fn tps_ratio(&self, i: usize) -> f64 {
        median(
            self.0[i]
                .iter()
                .zip(&self.0[0])
                .map(|(x, reference)| x.tps / reference.tps)
                .collect(),
        )
    }
}

pub fn run(bin: &Path, out_dir: &Path, plan: &XdpPlan) -> Result<PathBuf> {
    let _net = Net::up()?;
    let work = std::env::temp_dir().join(format!("patroxy-bench-xdp-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!(
        "bench --xdp: starting PostgreSQL; pgbench -i -s {}",
        plan.scale
    );
    let pg = Postgres::try_start(PostgresOptions::default().trust().max_connections(300))
        .map_err(|e| anyhow::anyhow!("starting PostgreSQL: {e}"))?;
    pg.pgbench_init(pg.port(), plan.scale);
    let (port, stats) = (free_tcp_port(), free_tcp_port());
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/patroxy-bench-xdp-{}",
        std::process::id()
    ));

    let proxy = start_patroxy(
        bin,
        &work,
        "patroxy-xdp",
        &config(&pg, &pin, port, stats, true),
    )?;
    let prog_pin = PathBuf::from(format!(
        "/sys/fs/bpf/patroxy-bench-xdp-prog-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&prog_pin);
    pin_xdp_program(&pin, &prog_pin)?;
    xdp_link(WITH_XDP.veth, "xdpdrv", Some(&prog_pin))?;
    xdp_link(GENERIC_XDP.veth, "xdpgeneric", Some(&prog_pin))?;
    let warm_up = XdpPlan {
        select_secs: 2,
        ..*plan
    };
    for (host, _) in COMPARED {
        pgbench(&pg, host, port, &warm_up)?;
    }
    // Rounds rotate the order, so no client always runs first after another's load.
    let mut rounds = Rounds(Default::default());
    for round in 0..plan.rounds as usize {
        for k in 0..COMPARED.len() {
            let i = (round + k) % COMPARED.len();
            rounds.0[i].push(pgbench(&pg, COMPARED[i].0, port, plan)?);
        }
        let line: Vec<String> = COMPARED
            .iter()
            .enumerate()
            .map(|(i, (_, name))| {
                let r = rounds.0[i].last().unwrap();
                format!("{name} {:.0} tps, {:.1} us CPU/tx", r.tps, r.cpu_us)
            })
            .collect();
        println!("bench --xdp: round {}: {}", round + 1, line.join("; "));
    }
    xdp_link(GENERIC_XDP.veth, "xdpgeneric", None)?;
    xdp_link(WITH_XDP.veth, "xdpdrv", None)?;
    // XDP in front of the tc program: it drops first, so the tc program never sees the flood.
    xdp_link(DENIED.veth, "xdpdrv", Some(&prog_pin))?;
    let _ = std::fs::remove_file(&prog_pin);
    println!(
        "bench --xdp: SYN flood at the XDP program (native) for {} s",
        plan.flood_secs
    );
    let xdp = flood(port, plan.flood_secs, || xdp_denied(stats, port))?;
    xdp_link(DENIED.veth, "xdpdrv", None)?;
    println!(
        "bench --xdp: SYN flood at the tc program for {} s",
        plan.flood_secs
    );
    let tc = flood(port, plan.flood_secs, || xdp_denied(stats, port))?;
    drop(proxy);

    let plain = config(&pg, &pin, port, stats, false);
    let proxy = start_patroxy(bin, &work, "patroxy-plain", &plain)?;
    nft(&format!(
        "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname \"{}\" meta nfproto ipv4 tcp dport {port} ip saddr != {{ {} }} counter drop\n  }}\n}}\n",
        DENIED.veth,
        ALLOWED.join(", "),
    ))?;
    println!(
        "bench --xdp: SYN flood at the nftables rule for {} s",
        plan.flood_secs
    );
    let nft_flood = flood(port, plan.flood_secs, nft_dropped)?;
    drop(proxy);
    let _ = std::fs::remove_dir_all(&work);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# XDP allowlist: cost and drop rate (`cargo xtask bench --xdp`)\n"
    );
    let _ = writeln!(
        md,
        "Linux {}, {} CPUs, CLK_TCK {}, load average {} at the end. patroxy with the sockmap \
         data path; clients in network namespaces over veth pairs; medians of {} rounds, their \
         order rotating.\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        clk_tck(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?"),
        plan.rounds,
    );
    let _ = writeln!(
        md,
        "## Allowed traffic: pgbench -S, {} clients, {} s a round\n\n\
         | client veth | tps | ratio to without (per round) | CPU us per transaction (all CPUs) | of which softirq |\n\
         |---|---:|---:|---:|---:|",
        plan.clients, plan.select_secs,
    );
    for (i, (_, name)) in COMPARED.iter().enumerate() {
        let per_round: Vec<String> = rounds.0[i]
            .iter()
            .zip(&rounds.0[0])
            .map(|(x, reference)| format!("{:.2}", x.tps / reference.tps))
            .collect();
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.3} ({}) | {:.1} | {:.1} |",
            rounds.median(i, |r| r.tps),
            rounds.tps_ratio(i),
            per_round.join(", "),
            rounds.median(i, |r| r.cpu_us),
            rounds.median(i, |r| r.softirq_us),
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "## Denied traffic: SYN flood from a denied source, {} s, generator and filter on CPU 0\n\n\
         | filter | dropped packets/s | CPU 0 user | system | softirq | kernel ns per packet |\n\
         |---|---:|---:|---:|---:|---:|",
        plan.flood_secs
    );
    for (name, f) in [
        ("XDP native (patroxy's program)", &xdp),
        ("tc ingress (patroxy)", &tc),
        ("nftables input rule", &nft_flood),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.0} % | {:.0} % | {:.0} % | {:.0} |",
            f.dropped_pps,
            f.user * 100.0,
            f.system * 100.0,
            f.softirq * 100.0,
            f.kernel_ns_per_packet
        );
    }
    let _ = writeln!(
        md,
        "\nratio XDP / nftables: {:.2}x the packets per second, {:.2}x the kernel time per packet; \
         tc / nftables: {:.2}x, {:.2}x. \
         hping3 generates as fast as CPU 0 lets it (its user time is part of the core's), so the \
         packets per second include the generator's cost; the kernel time per packet is the \
         transmit, receive and filter side alone.",
        xdp.dropped_pps / nft_flood.dropped_pps,
        xdp.kernel_ns_per_packet / nft_flood.kernel_ns_per_packet,
        tc.dropped_pps / nft_flood.dropped_pps,
        tc.kernel_ns_per_packet / nft_flood.kernel_ns_per_packet,
    );
    let path = out_dir.join("xdp.md");
    std::fs::write(&path, &md)?;
    println!("\n{md}\nbench --xdp: wrote {}", path.display());
    Ok(path)
}
