//! Plain-text tables for a terminal: the stats as `patroxy status` prints them, and the column
//! layout the operator's other commands share.
use super::{
    html::{bytes, duration},
    model::{StateClass, StatsSnapshot},
};

/// The `status` output; `color` adds ANSI colours to the status column.
pub fn status_table(snap: &StatsSnapshot, color: bool) -> String {
    let mut out = format!(
        "patroxy {} pid {} up {} data path {}{}\n",
        snap.version,
        snap.pid,
        duration(snap.uptime_secs),
        snap.data_path,
        if snap.live_bytes {
            ""
        } else {
            " (bytes of closed sessions only)"
        }
    );
    for l in &snap.listeners {
        out.push_str(&format!(
            "\n{}  bind {}  balance {}  check {}  leader {}  leader changes {}  clients {} (waiting {})\n",
            l.name,
            l.bind,
            l.balance,
            l.check.as_deref().unwrap_or("none"),
            l.leader().map_or("none", |s| s.name.as_str()),
            l.primary_changes,
            l.frontend.scur,
            l.frontend.waiting,
        ));
        let mut rows = vec![
            [
                "SERVER", "STATUS", "ROLE", "TL", "CHECK", "CUR", "MAX", "LIMIT", "TOTAL", "RATE",
                "QUEUE", "IN", "OUT", "CHKFAIL", "CHKDOWN", "LASTCHG", "DOWNTIME",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let mut classes = vec![None];
        for s in &l.servers {
            let check = s.last_check.as_ref().map_or(String::new(), |c| {
                let code = c.code.map_or(String::new(), |c| format!("/{c}"));
                format!(
                    "{}{code} {}ms {} ago",
                    c.status,
                    c.duration_ms,
                    duration(c.age_secs)
                )
            });
            rows.push(vec![
                s.name.clone(),
                s.status.clone(),
                s.role.clone().unwrap_or_else(|| "?".into()),
                s.timeline.map_or(String::new(), |t| t.to_string()),
                check,
                s.traffic.scur.to_string(),
                s.smax.to_string(),
                s.slim.map_or("-".into(), |l| l.to_string()),
                s.traffic.stot.to_string(),
                s.traffic.rate.to_string(),
                format!("{}/{}", s.traffic.qcur, s.traffic.qmax),
                bytes(s.traffic.bin),
                bytes(s.traffic.bout),
                s.chkfail.to_string(),
                s.chkdown.to_string(),
                duration(s.lastchg_secs),
                duration(s.downtime_secs),
            ]);
            classes.push(Some(s.class));
        }
        out.push_str(&columns(&rows, &classes, color));
    }
    out
}

/// Left-aligned columns two spaces apart; column 1 coloured by state when asked.
pub fn columns(rows: &[Vec<String>], classes: &[Option<StateClass>], color: bool) -> String {
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (row, class) in rows.iter().zip(classes) {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let padded = format!("{cell:<w$}", w = widths[c]);
            match (c, class, color) {
                (1, Some(class), true) => {
                    let code = match class {
                        StateClass::Up => "32",
                        StateClass::GoingDown => "33",
                        StateClass::GoingUp => "33;1",
                        StateClass::Down => "31;1",
                        StateClass::Standby => "36",
                        StateClass::NoCheck => "90",
                        // HAProxy's colours: brown (256-colour 130) and blue.
                        StateClass::Maint => "38;5;130",
                        StateClass::Drain => "34",
                    };
                    line.push_str(&format!("\x1b[{code}m{padded}\x1b[0m"));
                }
                _ => line.push_str(&padded),
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::sample;
    use super::*;

    #[test]
    fn status_table_lists_every_server() {
        let text = status_table(&sample::snapshot(), false);
        assert!(text.starts_with("patroxy 0.1.0 pid 4242 up 1d01h data path sockmap\n"));
        let pg2 = text.lines().find(|l| l.starts_with("pg2 ")).unwrap();
        assert!(
            pg2.contains("DOWN") && pg2.contains("L7STS/503 2ms 0s ago"),
            "{pg2}"
        );
        assert!(text.contains("leader pg1"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("pg3 ") && l.contains("UP 2/3"))
        );
        let colored = status_table(&sample::snapshot(), true);
        assert!(colored.contains("\x1b[31;1mDOWN"));
    }
}
