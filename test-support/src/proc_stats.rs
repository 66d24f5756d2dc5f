//! Figures about processes from `/proc`, for the benchmarks: CPU time, peak memory, load.
//! Each returns `None` where `/proc` does not have it (another system, a process gone).

/// User + system CPU-seconds of every thread of process `pid` so far, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, counted from 1 with the name as field 2.
    let ticks = [11, 12]
        .iter()
        .map(|&index| fields.get(index)?.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / clock_ticks_per_second() as f64)
}

/// User + system CPU-seconds so far of all the processes `pids` together (a broker's several
/// processes, a bench's workers); `None` when there are none or one cannot be read.
pub fn total_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

/// `VmHWM` of process `pid` (`std::process::id()` for this one), in KiB: the most resident
/// memory it has held so far.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The one-minute load average, as `uptime` shows it.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// The processes whose command name (`/proc/PID/comm`) is `name`, e.g. `beam.smp` for
/// RabbitMQ.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// The kernel's USER_HZ, in which `/proc` counts CPU time (100 on every Linux in practice).
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}
