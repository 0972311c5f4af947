//! What an operator reads: counters by label, Prometheus samples, and a
//! process's memory and descriptors.

/// How many connections `m` has counted closed for `direction` (`inbound` or
/// `upstream`), `service` and `outcome` (`done`, `denied`, `failed`).
pub fn closed_count(
    m: &ferry::ops::metrics::Metrics,
    direction: &'static str,
    service: &str,
    outcome: &'static str,
) -> u64 {
    m.closed
        .get_or_create(&ferry::ops::metrics::ClosedLabel {
            direction,
            service: service.to_string(),
            outcome,
        })
        .get()
}

/// Resident memory (KiB) and open descriptors of process `pid`, from /proc.
pub fn proc_usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// The number in a scraped Prometheus sample (counter, gauge or untyped).
pub fn sample_value(metric: &str, value: &prometheus_parse::Value) -> f64 {
    match value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{metric}: unexpected value {other:?}"),
    }
}
