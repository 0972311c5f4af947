//! Operations: what an operator sees and sends.
//!
//! - [`metrics`]: counters and gauges, in Prometheus form;
//! - [`admin`]: the admin listener (`/metrics`, `/ready`, `/live`, `/status`);
//! - [`signal`]: which signals stop the proxy;
//! - [`logs`]: where log lines go.
//!
//! Owns: the operator's view. Every part may import [`metrics`]. Must never
//! import the control plane, `app` or `cli`; the admin server shares the
//! data plane's accept loop (`proxy::net`).

pub mod admin;
pub mod logs;
pub mod metrics;
pub mod signal;
