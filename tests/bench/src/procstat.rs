//! CPU time and memory of a process, read from `/proc` (Linux only).

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Clock ticks per second for `/proc/<pid>/stat`. Linux has used 100 on every mainstream
/// architecture for decades (`sysconf(_SC_CLK_TCK)`); reading it would need libc.
const TICKS_PER_SECOND: u64 = 100;

/// User + system CPU time the process has used so far (all its threads).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses: fields after it are
    // counted from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("/proc/{pid}/stat has no ')': {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is index 0, so utime (field 14) is index 11 and stime (15) index 12.
    let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
        bail!("/proc/{pid}/stat has too few fields: {stat:?}");
    };
    let ticks = utime.parse::<u64>()? + stime.parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// Resident set size in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

/// Peak resident set size in bytes (`VmHWM`).
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:").map(|k| k * 1024)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("/proc/{pid}/status has no {key}"))?;
    let kib = line
        .trim_start_matches(key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .with_context(|| format!("parsing {line:?}"))?;
    Ok(kib)
}

/// CPU used by `pid` while `f` runs.
pub async fn cpu_during<F, T>(pid: u32, f: F) -> Result<(T, Duration)>
where
    F: std::future::Future<Output = Result<T>>,
{
    let before = cpu_time(pid)?;
    let out = f.await?;
    let after = cpu_time(pid)?;
    Ok((out, after.saturating_sub(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        let rss = rss_bytes(pid).unwrap();
        assert!(rss > 0);
        assert!(peak_rss_bytes(pid).unwrap() >= rss);
        // Burn a little CPU so the counter can move.
        let start = cpu_time(pid).unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(pid).unwrap() >= start);
    }
}
