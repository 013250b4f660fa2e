//! What the workloads measured (every round's sample, per target) and the medians and ratios
//! the report and the A/B table take of it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One measured quantity of one case: the samples of every round, per target.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: &'static str,
    pub case: String,
    pub metric: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub samples: [Vec<f64>; 4],
}

impl Row {
    pub fn median(&self, target: usize) -> Option<f64> {
        median(&self.samples[target])
    }
}

/// Everything the workloads measured, in the order they measured it.
#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
}

impl Results {
    pub fn new() -> Results {
        Results::default()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        section: &'static str,
        case: &str,
        metric: &'static str,
        unit: &'static str,
        better: Better,
        target: usize,
        value: f64,
    ) {
        let row = match self
            .rows
            .iter_mut()
            .position(|r| r.section == section && r.case == case && r.metric == metric)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    section,
                    case: case.to_owned(),
                    metric,
                    unit,
                    better,
                    samples: Default::default(),
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.samples[target].push(value);
    }

    pub fn find(&self, section: &str, case_prefix: &str, metric: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.section == section && r.case.starts_with(case_prefix) && r.metric == metric)
    }

    pub fn rows_of<'a>(
        &'a self,
        section: &'a str,
        metric: &'a str,
    ) -> impl Iterator<Item = &'a Row> {
        self.rows
            .iter()
            .filter(move |r| r.section == section && r.metric == metric)
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// a ÷ b, or None when either is missing or b is not positive: every base quantity is
/// positive, and a ratio to a noisy "added over direct" value at or below zero means nothing.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 1e-12 => Some(a / b),
        _ => None,
    }
}
