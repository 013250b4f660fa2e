//! What the workloads measured (every round's sample, per target) and the medians and ratios
//! the report and the A/B table take of it.

/// The columns of a row: the four standard targets, in the order the lab starts them.
pub const DIRECT: usize = 0;
pub const BPF: usize = 1;
pub const FALLBACK: usize = 2;
pub const HAPROXY: usize = 3;

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A measured quantity: the report's section it is listed in, its name there, its unit, and
/// which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub section: &'static str,
    pub name: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

impl Metric {
    /// A quantity of which more is better (a rate).
    pub const fn higher(section: &'static str, name: &'static str, unit: &'static str) -> Metric {
        Metric {
            section,
            name,
            unit,
            better: Better::Higher,
        }
    }

    /// A quantity of which less is better (a cost).
    pub const fn lower(section: &'static str, name: &'static str, unit: &'static str) -> Metric {
        Metric {
            section,
            name,
            unit,
            better: Better::Lower,
        }
    }

    fn is(&self, other: &Metric) -> bool {
        self.section == other.section && self.name == other.name
    }
}

/// One metric of one case: the samples of every round, per target.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: Metric,
    pub case: String,
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

    /// One sample of `metric` for `case`, measured through the `target`th target.
    pub fn add(&mut self, case: &str, metric: Metric, target: usize, value: f64) {
        let row = match self
            .rows
            .iter()
            .position(|r| r.metric.is(&metric) && r.case == case)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    metric,
                    case: case.to_owned(),
                    samples: Default::default(),
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.samples[target].push(value);
    }

    /// The first row of `metric` whose case starts with `case_prefix`.
    pub fn find(&self, metric: Metric, case_prefix: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.metric.is(&metric) && r.case.starts_with(case_prefix))
    }

    /// The rows of `metric`, one per case.
    pub fn rows_of(&self, metric: Metric) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(move |r| r.metric.is(&metric))
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
