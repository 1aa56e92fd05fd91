//! Summaries and output: latency percentiles from HDR histograms, medians of repeated runs, and
//! the Markdown tables `BENCHMARKS.md` is assembled from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds, 1 µs .. 60 s at 3 significant digits. Record with
/// `saturating_record` so an outlier beyond 60 s is clamped rather than lost.
pub fn latency_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a latency histogram")
}

/// Percentiles of one latency distribution.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    /// Percentiles of a list of durations (exact, for small samples such as per-client
    /// convergence times).
    pub fn of_durations(samples: &[Duration]) -> Self {
        let mut us: Vec<u64> = samples.iter().map(|d| d.as_micros() as u64).collect();
        if us.is_empty() {
            return Self::default();
        }
        us.sort_unstable();
        // Nearest-rank percentile.
        let at = |q: f64| us[((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
        Self {
            count: us.len() as u64,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: us[us.len() - 1],
            mean_us: us.iter().sum::<u64>() as f64 / us.len() as f64,
        }
    }
}

/// The median of repeated measurements (the lower middle one for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

/// Formats microseconds for a table: `850 µs`, `12.3 ms`, `1.20 s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// Formats a byte count: `812 B`, `14.2 KiB`, `3.10 MiB`.
pub fn fmt_bytes(b: f64) -> String {
    if b < 1024.0 {
        format!("{b:.0} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    }
}

/// A Markdown table built row by row.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.header.iter().map(|_| "---|").collect::<String>()
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

/// Where a benchmark writes its results: `$WEFT_BENCH_OUT` or `target/bench`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("WEFT_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| weft_tests::target_dir().join("bench"))
}

/// Writes `<out_dir>/<name>.md` (the section for `BENCHMARKS.md`) and `<name>.json` (raw
/// numbers), and prints the Markdown.
pub fn publish<T: Serialize>(name: &str, markdown: &str, raw: &T) -> Result<()> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write(&dir.join(format!("{name}.md")), markdown)?;
    write(
        &dir.join(format!("{name}.json")),
        &serde_json::to_string_pretty(raw)?,
    )?;
    println!("{markdown}");
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        let l = Latency::of_durations(&samples);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_us, 500_000);
        assert_eq!(l.p99_us, 990_000);
        assert_eq!(l.max_us, 1_000_000);
    }

    #[test]
    fn table_renders() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.to_markdown(), "| a | b |\n|---|---|\n| 1 | 2 |\n");
        assert_eq!(fmt_us(850.0), "850 µs");
        assert_eq!(fmt_us(12_345.0), "12.35 ms");
        assert_eq!(fmt_bytes(2048.0), "2.0 KiB");
    }
}
