//! The config of a proxy a control plane (xDS) configures: only ferry's
//! own operational settings come from flags.

use super::{common, CertSource, Config, ConfigError};
use crate::cli::ProxyArgs;

impl Config {
    /// The config of a proxy a control plane (xDS) configures: ferry's own
    /// operational flags from `args` (timeouts, limits, admin, ejection);
    /// identity, listeners and certificates come from the control plane.
    pub fn for_control_plane(args: &ProxyArgs, service: &str) -> Result<Config, ConfigError> {
        let common = common(args)?;
        Ok(Config {
            service: service.to_string(),
            certs: CertSource::ControlPlane,
            agent: None,
            admin: common.admin,
            register: None,
            sidecar: None,
            authz_fallback_window: common.authz_fallback_window,
            reauthorize_interval: common.reauthorize_interval,
            inbound: None,
            upstreams: Vec::new(),
            timeouts: common.timeouts,
            upstream_attempts: args.upstream_attempts,
            ejection: common.ejection,
            idle_timeout: common.idle_timeout,
            max_lifetime: common.max_lifetime,
            limits: common.limits,
        })
    }
}
