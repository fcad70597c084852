//! Figures, targets and their presentation: the table printed at the end of
//! a run and the JSON summary (`bench-results/summary.json`).

use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// What a target constrains: the figure itself or its ratio to the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum On {
    Value,
    Ratio,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    pub on: On,
    pub goal: Goal,
}

impl Target {
    pub fn at_most(v: f64) -> Target {
        Target {
            on: On::Value,
            goal: Goal::AtMost(v),
        }
    }
    pub fn at_least(v: f64) -> Target {
        Target {
            on: On::Value,
            goal: Goal::AtLeast(v),
        }
    }
    pub fn ratio_at_least(v: f64) -> Target {
        Target {
            on: On::Ratio,
            goal: Goal::AtLeast(v),
        }
    }
    pub fn ratio_at_most(v: f64) -> Target {
        Target {
            on: On::Ratio,
            goal: Goal::AtMost(v),
        }
    }

    fn check(&self, value: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        let x = match self.on {
            On::Value => value?,
            On::Ratio => ratio?,
        };
        Some(match self.goal {
            Goal::AtMost(t) => x <= t,
            Goal::AtLeast(t) => x >= t,
        })
    }

    fn describe(&self, unit: &str) -> String {
        let (op, t) = match self.goal {
            Goal::AtMost(t) => ("≤", t),
            Goal::AtLeast(t) => ("≥", t),
        };
        match self.on {
            On::Value if unit == "count" => format!("{op} {}", fmt_num(t, unit)),
            On::Value => format!("{op} {} {unit}", fmt_num(t, unit)),
            On::Ratio => format!("{op} {t:.2}×"),
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub scenario: String,
    pub figure: String,
    pub unit: String,
    /// The figure for llmq.
    pub value: Option<f64>,
    /// The same figure for the baseline measured in the same run.
    pub baseline: Option<f64>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    pub targets: Vec<Target>,
    /// Whether every target is met (`None` when there is none or no figure).
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Row {
    pub fn new(
        scenario: &str,
        figure: &str,
        unit: &str,
        value: Option<f64>,
        baseline: Option<f64>,
    ) -> Row {
        let ratio = match (value, baseline) {
            (Some(v), Some(b)) if b != 0.0 => Some(v / b),
            _ => None,
        };
        Row {
            scenario: scenario.into(),
            figure: figure.into(),
            unit: unit.into(),
            value,
            baseline,
            ratio,
            targets: vec![],
            met: None,
            note: None,
            error: None,
        }
    }

    pub fn target(mut self, t: Target) -> Row {
        self.targets.push(t);
        self.met = self.evaluate();
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }

    /// A row saying a scenario (or one side of it) could not be measured.
    pub fn error(scenario: &str, figure: &str, error: impl std::fmt::Display) -> Row {
        Row {
            error: Some(error.to_string()),
            ..Row::new(scenario, figure, "", None, None)
        }
    }

    fn evaluate(&self) -> Option<bool> {
        if self.targets.is_empty() {
            return None;
        }
        let mut all = true;
        for t in &self.targets {
            match t.check(self.value, self.ratio) {
                Some(ok) => all &= ok,
                None => return None,
            }
        }
        Some(all)
    }
}

/// A number formatted for its unit.
pub fn fmt_num(v: f64, unit: &str) -> String {
    match unit {
        "jobs/s" | "B" | "count" | "jobs" | "keys" => group_thousands(v.round() as i64),
        "ms" => format!("{v:.3}"),
        "µs" | "MiB" | "s" => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub rustc: String,
    pub redis: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            mem_total_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kib| kib / 1024)
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            rustc: command_line("rustc", &["--version"]),
            redis: command_line("redis-server", &["--version"]),
        }
    }
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub command: String,
    pub machine: Machine,
    pub sizes: crate::Sizes,
    pub started_unix_ms: u64,
    pub elapsed_s: f64,
    /// `/proc/loadavg` before and after: other work on the machine skews every figure.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub rows: Vec<Row>,
}

impl Summary {
    /// Rows that failed to measure.
    pub fn errors(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.error.is_some()).collect()
    }

    /// Rows with a target that was missed.
    pub fn missed(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.met == Some(false)).collect()
    }

    /// The table: scenario | figure | llmq | baseline | ratio | target | met?
    pub fn table(&self) -> String {
        let header = [
            "scenario", "figure", "llmq", "baseline", "ratio", "target", "met?",
        ];
        let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        for r in &self.rows {
            let unit = if r.unit.is_empty() || r.unit == "count" {
                String::new()
            } else {
                format!(" {}", r.unit)
            };
            let num = |v: Option<f64>| match v {
                Some(v) => format!("{}{unit}", fmt_num(v, &r.unit)),
                None => "-".into(),
            };
            let value = if r.error.is_some() {
                "ERROR".into()
            } else {
                num(r.value)
            };
            lines.push([
                r.scenario.clone(),
                r.figure.clone(),
                value,
                num(r.baseline),
                r.ratio.map_or("-".into(), |x| format!("{x:.2}×")),
                if r.targets.is_empty() {
                    "-".into()
                } else {
                    r.targets
                        .iter()
                        .map(|t| t.describe(&r.unit))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]);
        }
        let mut widths = [0usize; 7];
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = format!(
            "llmq-bench {}: {} cores, {}, load average {} → {}\n\n",
            self.command,
            self.machine.nproc,
            self.machine.cpu_model,
            self.loadavg_start,
            self.loadavg_end
        );
        for (i, l) in lines.iter().enumerate() {
            let cells: Vec<String> = l
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
            }
        }
        let notes: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.note.is_some() || r.error.is_some())
            .collect();
        for r in notes {
            if let Some(e) = &r.error {
                let _ = writeln!(out, "\n{} / {}: ERROR: {e}", r.scenario, r.figure);
            }
            if let Some(n) = &r.note {
                let _ = writeln!(out, "\n{} / {}: {n}", r.scenario, r.figure);
            }
        }
        out
    }

    /// Writes `summary.json` (and `summary.txt`, the table) into `dir`.
    pub fn write(&self, dir: &Path) -> crate::Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::BenchError::io("create results dir", dir, e))?;
        let json = dir.join("summary.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .map_err(|e| crate::BenchError::io("write summary", &json, e))?;
        let txt = dir.join("summary.txt");
        std::fs::write(&txt, self.table())
            .map_err(|e| crate::BenchError::io("write table", &txt, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_compute_ratio_and_check_every_target() {
        let r = Row::new(
            "burn-down",
            "throughput",
            "jobs/s",
            Some(12_000.0),
            Some(14_000.0),
        )
        .target(Target::at_least(10_000.0))
        .target(Target::ratio_at_least(0.8));
        assert!((r.ratio.unwrap() - 12.0 / 14.0).abs() < 1e-9);
        assert_eq!(r.met, Some(true));
        let r = Row::new(
            "burn-down",
            "throughput",
            "jobs/s",
            Some(9_000.0),
            Some(10_000.0),
        )
        .target(Target::at_least(10_000.0))
        .target(Target::ratio_at_least(0.8));
        assert_eq!(r.met, Some(false));
        let r = Row::new("x", "y", "ms", None, Some(1.0)).target(Target::at_most(1.0));
        assert_eq!(r.met, None, "no figure, no verdict");
        assert_eq!(Row::new("x", "y", "B", Some(1.0), Some(0.0)).ratio, None);
    }

    #[test]
    fn table_shows_every_row_and_errors() {
        let s = Summary {
            command: "smoke".into(),
            machine: Machine::detect(),
            sizes: crate::Sizes::smoke(),
            started_unix_ms: 0,
            elapsed_s: 1.0,
            loadavg_start: loadavg(),
            loadavg_end: loadavg(),
            rows: vec![
                Row::new(
                    "burn-down",
                    "throughput",
                    "jobs/s",
                    Some(12_345.0),
                    Some(15_000.0),
                )
                .target(Target::at_least(10_000.0)),
                Row::error("memory", "RSS idle", "daemon exited"),
            ],
        };
        let t = s.table();
        assert!(t.contains("12,345 jobs/s"), "{t}");
        assert!(t.contains("≥ 10,000 jobs/s"), "{t}");
        assert!(t.contains("| yes"), "{t}");
        assert!(t.contains("ERROR: daemon exited"), "{t}");
        assert_eq!(s.errors().len(), 1);
        assert!(s.missed().is_empty());
        assert_eq!(fmt_num(-1234567.0, "B"), "-1,234,567");
    }
}
