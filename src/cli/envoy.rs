//! `ferry envoy ARGS...`: Envoy's command line, as Nomad's injected sidecar
//! task passes it (`-c ${NOMAD_SECRETS_DIR}/envoy_bootstrap.json -l
//! ${meta.connect.log_level} --concurrency ${meta.connect.proxy_concurrency}
//! --disable-hot-restart`), so ferry can replace the Envoy image.
//!
//! Envoy flags ferry acts on: `-c/--config-path`, `-l/--log-level`,
//! `--concurrency` (worker threads). Envoy flags it accepts and ignores,
//! with one warning each: see [`EnvoyArgs::ignored`]. Any other flag is a
//! usage error naming it. ferry's own operational flags (`-admin-addr`,
//! `-max-conns`, `-log-json`, timeouts, ...) go after `--`, in ferry's
//! usual syntax: `ferry envoy -c boot.json -- -max-conns 512 -log-json`.

use std::path::PathBuf;

use clap::Parser;

/// Run in Envoy's place: configured by the Consul agent over xDS, from the
/// bootstrap file `consul connect envoy -bootstrap` writes.
#[derive(Debug, Clone, Parser, PartialEq, Eq)]
#[command(
    name = "ferry envoy",
    no_binary_name = true,
    disable_version_flag = true
)]
pub struct EnvoyArgs {
    /// The bootstrap file (JSON).
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<PathBuf>,
    /// trace, debug, info, warn (warning), error, critical or off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Worker threads (0: one per CPU).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Ignored (ferry has no hot restart).
    #[arg(long)]
    pub disable_hot_restart: bool,
    /// Ignored (hot restart).
    #[arg(long)]
    pub base_id: Option<String>,
    /// Ignored (hot restart).
    #[arg(long)]
    pub use_dynamic_base_id: bool,
    /// Ignored (hot restart).
    #[arg(long)]
    pub restart_epoch: Option<String>,
    /// Ignored: ferry drains for its own `-drain-timeout` (after `--`).
    #[arg(long)]
    pub drain_time_s: Option<String>,
    /// Ignored (see --drain-time-s).
    #[arg(long)]
    pub parent_shutdown_time_s: Option<String>,
    /// Ignored (see --drain-time-s).
    #[arg(long)]
    pub drain_strategy: Option<String>,
    /// Ignored: the bootstrap's node.cluster is used.
    #[arg(long)]
    pub service_cluster: Option<String>,
    /// Ignored: the bootstrap's node.id is used.
    #[arg(long)]
    pub service_node: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub service_zone: Option<String>,
    /// Ignored: ferry's log format (`-log-json` after `--`).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Ignored: ferry logs to stderr.
    #[arg(long)]
    pub log_path: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub component_log_level: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub file_flush_interval_msec: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub allow_unknown_static_fields: bool,
    /// Ignored.
    #[arg(long)]
    pub reject_unknown_dynamic_fields: bool,
    /// Ignored.
    #[arg(long)]
    pub ignore_unknown_dynamic_fields: bool,
    /// Ignored.
    #[arg(long)]
    pub local_address_ip_version: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub cpuset_threads: bool,
    /// ferry's own flags, after `--`.
    #[arg(last = true, allow_hyphen_values = true)]
    pub ferry_args: Vec<String>,
}

impl EnvoyArgs {
    /// Parses Envoy's arguments (without `ferry envoy`).
    pub fn parse_from_args<I, T>(args: I) -> Result<EnvoyArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        EnvoyArgs::try_parse_from(args)
    }

    /// One warning per Envoy flag given that ferry does not act on.
    pub fn ignored(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut flag = |set: bool, name: &str, why: &str| {
            if set {
                out.push(format!("envoy flag {name} is ignored: {why}"));
            }
        };
        flag(
            self.disable_hot_restart,
            "--disable-hot-restart",
            "ferry has no hot restart",
        );
        flag(
            self.base_id.is_some(),
            "--base-id",
            "ferry has no hot restart",
        );
        flag(
            self.use_dynamic_base_id,
            "--use-dynamic-base-id",
            "ferry has no hot restart",
        );
        flag(
            self.restart_epoch.is_some(),
            "--restart-epoch",
            "ferry has no hot restart",
        );
        for (set, name) in [
            (self.drain_time_s.is_some(), "--drain-time-s"),
            (
                self.parent_shutdown_time_s.is_some(),
                "--parent-shutdown-time-s",
            ),
            (self.drain_strategy.is_some(), "--drain-strategy"),
        ] {
            flag(
                set,
                name,
                "ferry drains for -drain-timeout (give it after --)",
            );
        }
        flag(
            self.service_cluster.is_some(),
            "--service-cluster",
            "the bootstrap's node.cluster is used",
        );
        flag(
            self.service_node.is_some(),
            "--service-node",
            "the bootstrap's node.id is used",
        );
        for (set, name) in [
            (self.service_zone.is_some(), "--service-zone"),
            (self.log_format.is_some(), "--log-format"),
            (self.log_path.is_some(), "--log-path"),
            (self.component_log_level.is_some(), "--component-log-level"),
            (
                self.file_flush_interval_msec.is_some(),
                "--file-flush-interval-msec",
            ),
            (
                self.allow_unknown_static_fields,
                "--allow-unknown-static-fields",
            ),
            (
                self.reject_unknown_dynamic_fields,
                "--reject-unknown-dynamic-fields",
            ),
            (
                self.ignore_unknown_dynamic_fields,
                "--ignore-unknown-dynamic-fields",
            ),
            (
                self.local_address_ip_version.is_some(),
                "--local-address-ip-version",
            ),
            (self.cpuset_threads, "--cpuset-threads"),
        ] {
            flag(set, name, "not applicable to ferry");
        }
        out
    }

    /// Envoy's log level as a `tracing` filter.
    pub fn level(&self) -> Option<tracing::level_filters::LevelFilter> {
        use tracing::level_filters::LevelFilter;
        Some(match self.log_level.to_ascii_lowercase().as_str() {
            "trace" => LevelFilter::TRACE,
            "debug" => LevelFilter::DEBUG,
            "info" => LevelFilter::INFO,
            "warn" | "warning" => LevelFilter::WARN,
            "error" | "critical" => LevelFilter::ERROR,
            "off" => LevelFilter::OFF,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nomads_sidecar_arguments() {
        let a = EnvoyArgs::parse_from_args([
            "-c",
            "/secrets/envoy_bootstrap.json",
            "-l",
            "info",
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ])
        .unwrap();
        assert_eq!(a.config_path, Some("/secrets/envoy_bootstrap.json".into()));
        assert_eq!(a.concurrency, Some(1));
        assert_eq!(a.ignored().len(), 1, "{:?}", a.ignored());
        assert!(a.level().is_some());
    }

    #[test]
    fn ferry_flags_go_after_a_double_dash_and_unknown_flags_are_named() {
        let a = EnvoyArgs::parse_from_args(["-c", "b.json", "--", "-max-conns", "5", "-log-json"])
            .unwrap();
        assert_eq!(a.ferry_args, ["-max-conns", "5", "-log-json"]);
        let e = EnvoyArgs::parse_from_args(["-c", "b.json", "--hot-sauce"]).unwrap_err();
        assert!(e.to_string().contains("--hot-sauce"), "{e}");
        let w = EnvoyArgs::parse_from_args(["-c", "b.json", "-l", "warning"]).unwrap();
        assert_eq!(w.level(), Some(tracing::level_filters::LevelFilter::WARN));
    }
}
