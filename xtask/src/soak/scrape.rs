//! Reads a patroxy's stats server in each format and checks what came back parses and names
//! every listener: HTML, HAProxy CSV, JSON and Prometheus text.

use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};
use patroxy_tests::stats_client::{get, parse_csv};

use super::lab::Target;

/// The paths scraped, each a page count in the tally.
pub const PAGES: [&str; 4] = ["/", "/;csv", "/;json", "/metrics"];

/// Fetches and parses `path`; the error says what was wrong.
pub fn page(t: &Target, path: &str) -> Result<()> {
    let body = fetch(t.stats, path)?;
    match path {
        "/" => {
            ensure!(
                body.contains("<html") || body.contains("<!DOCTYPE"),
                "no HTML document"
            );
            for l in &t.listeners {
                ensure!(
                    body.contains(l.as_str()),
                    "listener {l} missing from the HTML"
                );
            }
        }
        "/;csv" => {
            let rows = parse_csv(&body);
            for l in &t.listeners {
                let frontend = rows.iter().find(|r| {
                    r.get("pxname") == Some(l)
                        && r.get("svname").map(String::as_str) == Some("FRONTEND")
                });
                let Some(row) = frontend else {
                    bail!("no FRONTEND row for {l} in the CSV")
                };
                ensure!(
                    row.get("scur").is_some_and(|v| v.parse::<u64>().is_ok()),
                    "{l}'s scur is not a number"
                );
            }
        }
        "/;json" => {
            let json: serde_json::Value = serde_json::from_str(&body)?;
            let names: Vec<&str> = json["listeners"]
                .as_array()
                .map(|a| a.iter().filter_map(|l| l["name"].as_str()).collect())
                .unwrap_or_default();
            for l in &t.listeners {
                ensure!(
                    names.contains(&l.as_str()),
                    "listener {l} missing from the JSON"
                );
            }
        }
        "/metrics" => {
            let mut samples = 0;
            for line in body
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let value = line.rsplit(' ').next().unwrap_or("");
                ensure!(
                    value.parse::<f64>().is_ok(),
                    "metrics line {line:?} has no number"
                );
                samples += 1;
            }
            ensure!(samples > 0, "no samples in /metrics");
        }
        other => bail!("no parser for {other}"),
    }
    Ok(())
}

fn fetch(addr: SocketAddr, path: &str) -> Result<String> {
    let (status, _, body) = get(addr, path)?;
    ensure!(status == 200, "status {status}");
    Ok(body)
}

/// A column (`scur`: open sessions, `stot`: sessions so far) summed over every listener's
/// FRONTEND row of the CSV.
pub fn frontend_sum(t: &Target, column: &str) -> Result<u64> {
    let rows = parse_csv(&fetch(t.stats, "/;csv")?);
    Ok(rows
        .iter()
        .filter(|r| r.get("svname").map(String::as_str) == Some("FRONTEND"))
        .filter_map(|r| r.get(column)?.parse::<u64>().ok())
        .sum())
}
