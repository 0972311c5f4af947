//! Counters and gauges at each decision point, exported in the Prometheus
//! text format by the admin listener (`/metrics`).
//!
//! Built on `prometheus-client`. Labelled series (per upstream, per
//! handshake-failure reason, per agent endpoint) are resolved once where
//! possible — each upstream listener takes its handles when it starts — so
//! the per-connection cost is a few relaxed atomic increments, never a map
//! lookup on the data path. Each labelled family also keeps a process-wide
//! total, which `get()` returns (tests and `/status` read those).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::registry::Registry;

/// A monotonic counter.
pub type Counter = PromCounter<u64, AtomicU64>;
/// A value that goes up and down.
pub type Gauge = PromGauge<i64, std::sync::atomic::AtomicI64>;

/// Labels for per-upstream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// Labels for a handshake failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Labels for an authorization decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: &'static str,
}

/// Labels for a closed connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabel {
    /// `inbound` or `upstream`.
    pub direction: &'static str,
    /// Our service (inbound) or the upstream's name.
    pub service: String,
    /// `done`, `denied` or `failed`.
    pub outcome: &'static str,
}

/// Labels for a request on an exposed path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExposeLabel {
    /// The exposed path, or `other` for requests that matched none.
    pub path: String,
    /// The HTTP status answered.
    pub code: u16,
}

/// Labels for a connection refused by a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `inbound` or the upstream's name.
    pub listener: String,
    /// The flag of the limit: `max_conns`, `max_upstream_conns`, `max_handshakes`.
    pub limit: &'static str,
}

/// Labels for per-listener series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `inbound` or the upstream's name.
    pub listener: String,
}

/// Labels for a pending handshake closed to make room.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabel {
    pub listener: String,
    /// `budget` (the pending budget was full), `source` (its address held
    /// its share), `slow` (older than the deadline under pressure).
    pub reason: &'static str,
}

/// Labels for a completed TLS handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    /// `server` (inbound) or `client` (upstream).
    pub side: &'static str,
    /// `full` or `resumed` (a TLS session ticket was accepted).
    pub kind: &'static str,
}

fn side_index(side: &str) -> usize {
    usize::from(side != "server")
}

/// Labels for an xDS response ferry answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsLabel {
    /// `cluster`, `endpoints`, `listener`, `secret` or `unknown`.
    pub resource: &'static str,
    /// `ack` (applied) or `nack` (refused whole).
    pub result: &'static str,
}

/// Labels for agent request errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

/// A counter family with one label, plus its total.
#[derive(Debug)]
pub struct Labeled<L: Clone + std::hash::Hash + Eq> {
    family: Family<L, Counter>,
    total: Counter,
}

impl<L: Clone + std::hash::Hash + Eq> Default for Labeled<L> {
    fn default() -> Self {
        Labeled {
            family: Family::default(),
            total: Counter::default(),
        }
    }
}

impl<L: Clone + std::hash::Hash + Eq> Labeled<L> {
    /// Adds one to the series for `label`.
    pub fn inc(&self, label: &L) {
        self.family.get_or_create(label).inc();
        self.total.inc();
    }
    /// The total over every label.
    pub fn get(&self) -> u64 {
        self.total.get()
    }
    /// A handle on one series that also adds to the total.
    pub fn handle(&self, label: &L) -> Tally {
        Tally {
            one: self.family.get_or_create_owned(label),
            total: self.total.clone(),
        }
    }
}

/// One labelled series and the family's total, incremented together.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    one: Counter,
    total: Counter,
}

impl Tally {
    /// Adds one.
    pub fn inc(&self) {
        self.one.inc();
        self.total.inc();
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.one.inc_by(n);
        self.total.inc_by(n);
    }
}

/// A gauge family with one label, plus its total.
#[derive(Debug)]
pub struct LabeledGauge<L: Clone + std::hash::Hash + Eq> {
    family: Family<L, Gauge>,
    total: Gauge,
}

impl<L: Clone + std::hash::Hash + Eq> Default for LabeledGauge<L> {
    fn default() -> Self {
        LabeledGauge {
            family: Family::default(),
            total: Gauge::default(),
        }
    }
}

impl<L: Clone + std::hash::Hash + Eq> LabeledGauge<L> {
    /// The total over every label.
    pub fn get(&self) -> i64 {
        self.total.get()
    }
    /// A handle on one series that also moves the total.
    pub fn handle(&self, label: &L) -> GaugeTally {
        GaugeTally {
            one: self.family.get_or_create_owned(label),
            total: self.total.clone(),
        }
    }
}

/// One labelled gauge and the family's total.
#[derive(Debug, Clone, Default)]
pub struct GaugeTally {
    one: Gauge,
    total: Gauge,
}

impl GaugeTally {
    pub fn inc(&self) {
        self.one.inc();
        self.total.inc();
    }
    pub fn dec(&self) {
        self.one.dec();
        self.total.dec();
    }
    /// Sets this series (and moves the total by the difference).
    pub fn set(&self, v: i64) {
        let old = self.one.set(v);
        self.total.inc_by(v - old);
    }
}

/// Every metric ferry keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Inbound connections accepted.
    pub inbound_accepted: Counter,
    /// Inbound connections open now.
    pub inbound_active: Gauge,
    /// Inbound handshakes that failed or timed out, by reason.
    pub inbound_handshake_failed: Labeled<ReasonLabel>,
    /// Inbound connections allowed by intentions.
    pub authz_allowed: Counter,
    /// Inbound connections denied by intentions.
    pub authz_denied: Counter,
    /// Inbound connections refused because no decision could be made.
    pub authz_error: Counter,
    /// Live inbound connections closed because an intention now denies them.
    pub revoked: Counter,
    /// Inbound connections whose local application could not be reached.
    pub local_connect_failed: Counter,
    /// Bytes from mesh peers to the local application.
    pub inbound_bytes_in: Counter,
    /// Bytes from the local application to mesh peers.
    pub inbound_bytes_out: Counter,
    /// Connections closed, by direction, service and outcome.
    pub closed: Family<ClosedLabel, Counter>,
    /// Connections refused by a limit, by listener and limit.
    pub refused: Family<RefusedLabel, Counter>,
    /// Requests on exposed paths, by path and status.
    pub expose_requests: Family<ExposeLabel, Counter>,
    /// Handshakes in progress, by listener.
    pub pending: Family<ListenerLabel, Gauge>,
    /// Pending handshakes closed to make room, by listener and reason.
    pub evictions: Family<EvictionLabel, Counter>,
    /// Upstream connections accepted from the local app.
    pub upstream_accepted: Labeled<UpstreamLabel>,
    /// Upstream connections open now.
    pub upstream_active: LabeledGauge<UpstreamLabel>,
    /// Failed attempts to connect to or handshake with an instance.
    pub upstream_attempt_failed: Labeled<UpstreamLabel>,
    /// Attempts beyond the first for one connection.
    pub upstream_retries: Labeled<UpstreamLabel>,
    /// Instances ejected.
    pub upstream_ejections: Labeled<UpstreamLabel>,
    /// Upstream connections that found no instance to use.
    pub upstream_unavailable: Labeled<UpstreamLabel>,
    /// Bytes from the local app to upstream instances.
    pub upstream_bytes_out: Labeled<UpstreamLabel>,
    /// Bytes from upstream instances to the local app.
    pub upstream_bytes_in: Labeled<UpstreamLabel>,
    /// Instances known per upstream.
    pub upstream_instances: LabeledGauge<UpstreamLabel>,
    /// Failed agent requests, by endpoint.
    pub agent_errors: Labeled<EndpointLabel>,
    /// xDS mode: 1 while the stream to the agent delivers, else 0.
    pub xds_connected: Gauge,
    /// xDS mode: streams that ended or could not be opened.
    pub xds_stream_failures: Counter,
    /// xDS mode: responses ACKed and NACKed, by resource type.
    pub xds_updates: Family<XdsLabel, Counter>,
    /// End of the current leaf's validity, Unix seconds.
    pub leaf_expiry: Gauge,
    /// Certificate sets put in use after the first.
    pub rotations: Counter,
    /// Completed TLS handshakes, `[server, client][full, resumed]`: the
    /// family's series, taken once so counting is a plain increment.
    handshakes: [[Counter; 2]; 2],
}

/// The handles one upstream listener uses.
#[derive(Debug, Clone, Default)]
pub struct UpstreamMetrics {
    pub accepted: Tally,
    pub active: GaugeTally,
    pub attempt_failed: Tally,
    pub retries: Tally,
    pub ejections: Tally,
    pub unavailable: Tally,
    pub bytes_out: Tally,
    pub bytes_in: Tally,
    pub instances: GaugeTally,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Counts one completed handshake; resumption saves the signatures and
    /// certificate checks, so its share explains handshake CPU.
    /// `side` is `server` (inbound) or `client` (upstream).
    pub fn handshake(&self, side: &'static str, kind: Option<rustls::HandshakeKind>) {
        let resumed = matches!(kind, Some(rustls::HandshakeKind::Resumed));
        self.handshakes[side_index(side)][usize::from(resumed)].inc();
    }

    /// Completed handshakes of one side (`server`, `client`) and kind
    /// (`full`, `resumed`).
    pub fn handshakes(&self, side: &'static str, kind: &'static str) -> u64 {
        self.handshakes[side_index(side)][usize::from(kind == "resumed")].get()
    }

    /// Creates every metric and registers it under the `ferry_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        let authz: Family<DecisionLabel, Counter> = Family::default();
        let decision = |d| authz.get_or_create_owned(&DecisionLabel { decision: d });
        let handshakes: Family<HandshakeLabel, Counter> = Family::default();
        let handshake = |side, kind| handshakes.get_or_create_owned(&HandshakeLabel { side, kind });
        let m = Metrics {
            inbound_accepted: Counter::default(),
            inbound_active: Gauge::default(),
            inbound_handshake_failed: Labeled::default(),
            authz_allowed: decision("allow"),
            authz_denied: decision("deny"),
            authz_error: decision("error"),
            revoked: Counter::default(),
            local_connect_failed: Counter::default(),
            inbound_bytes_in: Counter::default(),
            inbound_bytes_out: Counter::default(),
            closed: Family::default(),
            refused: Family::default(),
            expose_requests: Family::default(),
            pending: Family::default(),
            evictions: Family::default(),
            upstream_accepted: Labeled::default(),
            upstream_active: LabeledGauge::default(),
            upstream_attempt_failed: Labeled::default(),
            upstream_retries: Labeled::default(),
            upstream_ejections: Labeled::default(),
            upstream_unavailable: Labeled::default(),
            upstream_bytes_out: Labeled::default(),
            upstream_bytes_in: Labeled::default(),
            upstream_instances: LabeledGauge::default(),
            agent_errors: Labeled::default(),
            xds_connected: Gauge::default(),
            xds_stream_failures: Counter::default(),
            xds_updates: Family::default(),
            leaf_expiry: Gauge::default(),
            rotations: Counter::default(),
            handshakes: [
                [handshake("server", "full"), handshake("server", "resumed")],
                [handshake("client", "full"), handshake("client", "resumed")],
            ],
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "inbound_connections_accepted",
            "Inbound mTLS connections accepted",
            m.inbound_accepted.clone(),
        );
        r.register(
            "inbound_connections_active",
            "Inbound connections open now",
            m.inbound_active.clone(),
        );
        r.register(
            "inbound_handshake_failures",
            "Inbound TLS handshakes that failed, by reason",
            m.inbound_handshake_failed.family.clone(),
        );
        r.register("authz_decisions", "Inbound authorization decisions", authz);
        r.register(
            "tls_handshakes",
            "Completed TLS handshakes, by side (server, client) and kind (full, resumed)",
            handshakes,
        );
        r.register(
            "connections_revoked",
            "Live connections closed because an intention now denies them",
            m.revoked.clone(),
        );
        r.register(
            "local_connect_failures",
            "Failed connects to the local application",
            m.local_connect_failed.clone(),
        );
        r.register(
            "inbound_received_bytes",
            "Bytes from mesh peers to the local application",
            m.inbound_bytes_in.clone(),
        );
        r.register(
            "inbound_sent_bytes",
            "Bytes from the local application to mesh peers",
            m.inbound_bytes_out.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed, by direction, service and outcome",
            m.closed.clone(),
        );
        r.register(
            "expose_requests",
            "Requests on exposed paths (Proxy.Expose), by path and status",
            m.expose_requests.clone(),
        );
        r.register(
            "handshakes_pending",
            "TLS handshakes in progress (connections not yet established)",
            m.pending.clone(),
        );
        r.register(
            "handshake_evictions",
            "Pending handshakes closed to make room for newer ones, by reason",
            m.evictions.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused by a limit (-max-conns, -max-upstream-conns, -max-handshakes)",
            m.refused.clone(),
        );
        r.register(
            "upstream_connections_accepted",
            "Local connections accepted by upstream listeners",
            m.upstream_accepted.family.clone(),
        );
        r.register(
            "upstream_connections_active",
            "Upstream connections open now",
            m.upstream_active.family.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Failed connects or handshakes to upstream instances",
            m.upstream_attempt_failed.family.clone(),
        );
        r.register(
            "upstream_retries",
            "Attempts beyond the first for one connection",
            m.upstream_retries.family.clone(),
        );
        r.register(
            "upstream_ejections",
            "Upstream instances ejected after repeated failures",
            m.upstream_ejections.family.clone(),
        );
        r.register(
            "upstream_unavailable",
            "Upstream connections that found no usable instance",
            m.upstream_unavailable.family.clone(),
        );
        r.register(
            "upstream_sent_bytes",
            "Bytes from the local application to upstream instances",
            m.upstream_bytes_out.family.clone(),
        );
        r.register(
            "upstream_received_bytes",
            "Bytes from upstream instances to the local application",
            m.upstream_bytes_in.family.clone(),
        );
        r.register(
            "upstream_instances",
            "Instances known per upstream",
            m.upstream_instances.family.clone(),
        );
        r.register(
            "agent_request_errors",
            "Failed requests to the Consul agent, by endpoint",
            m.agent_errors.family.clone(),
        );
        r.register(
            "xds_connected",
            "xDS mode: 1 while the stream to the agent's xDS server delivers, else 0",
            m.xds_connected.clone(),
        );
        r.register(
            "xds_stream_failures",
            "xDS mode: streams to the agent that ended or could not be opened",
            m.xds_stream_failures.clone(),
        );
        r.register(
            "xds_updates",
            "xDS mode: responses applied (ack) or refused whole (nack), by resource type",
            m.xds_updates.clone(),
        );
        r.register(
            "leaf_expiry_timestamp_seconds",
            "When the current leaf certificate expires (Unix time)",
            m.leaf_expiry.clone(),
        );
        r.register(
            "certificate_rotations",
            "Certificate sets put in use after the first",
            m.rotations.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The handles for upstream `name`.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let l = UpstreamLabel {
            upstream: name.to_string(),
        };
        UpstreamMetrics {
            accepted: self.upstream_accepted.handle(&l),
            active: self.upstream_active.handle(&l),
            attempt_failed: self.upstream_attempt_failed.handle(&l),
            retries: self.upstream_retries.handle(&l),
            ejections: self.upstream_ejections.handle(&l),
            unavailable: self.upstream_unavailable.handle(&l),
            bytes_out: self.upstream_bytes_out.handle(&l),
            bytes_in: self.upstream_bytes_in.handle(&l),
            instances: self.upstream_instances.handle(&l),
        }
    }

    /// The gauge of handshakes pending on `listener`.
    pub fn pending(&self, listener: &str) -> Gauge {
        self.pending.get_or_create_owned(&ListenerLabel {
            listener: listener.to_string(),
        })
    }

    /// The eviction counter of `listener` for `reason`.
    pub fn evictions(&self, listener: &str, reason: &'static str) -> Counter {
        self.evictions.get_or_create_owned(&EvictionLabel {
            listener: listener.to_string(),
            reason,
        })
    }

    /// The refusal counter for `limit` on `listener`.
    pub fn refusals(&self, listener: &str, limit: &'static str) -> Counter {
        self.refused.get_or_create_owned(&RefusedLabel {
            listener: listener.to_string(),
            limit,
        })
    }

    /// Counts one request on an exposed path.
    pub fn exposed(&self, path: &str, code: u16) {
        self.expose_requests
            .get_or_create(&ExposeLabel {
                path: path.to_string(),
                code,
            })
            .inc();
    }

    /// Counts one xDS response answered with `result` (`ack`, `nack`).
    pub fn xds_update(&self, resource: &'static str, result: &'static str) {
        self.xds_updates
            .get_or_create(&XdsLabel { resource, result })
            .inc();
    }

    /// Counts one closed connection.
    pub fn closed(&self, direction: &'static str, service: &str, outcome: &'static str) {
        self.closed
            .get_or_create(&ClosedLabel {
                direction,
                service: service.to_string(),
                outcome,
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_and_totals_move_together() {
        let m = Metrics::new();
        let api = m.upstream("api");
        let db = m.upstream("db");
        api.attempt_failed.inc();
        db.attempt_failed.inc();
        db.bytes_out.add(10);
        api.instances.set(3);
        db.instances.set(2);
        api.instances.set(1);
        m.inbound_handshake_failed
            .inc(&ReasonLabel { reason: "timeout" });
        m.authz_denied.inc();
        assert_eq!(m.upstream_attempt_failed.get(), 2);
        assert_eq!(m.upstream_instances.get(), 3);
        let text = m.render();
        for want in [
            "ferry_upstream_connect_failures_total{upstream=\"api\"} 1",
            "ferry_upstream_sent_bytes_total{upstream=\"db\"} 10",
            "ferry_upstream_instances{upstream=\"api\"} 1",
            "ferry_inbound_handshake_failures_total{reason=\"timeout\"} 1",
            "ferry_authz_decisions_total{decision=\"deny\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
