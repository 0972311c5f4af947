//! `-register`: the proxy registers itself with the local agent, as
//! `consul connect proxy -register` does (spec §4.7), keeps a TTL check
//! passing, registers again if the agent lost the registration (agent
//! restart without persistence, a manual deregister), and deregisters on
//! shutdown — first, before draining, so no new traffic is sent its way.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::api::{CheckBody, CheckStatus, ProxyBody, RegisterBody};
use super::{AgentClient, AgentError};
use crate::identity::tls::Credentials;
use crate::snapshot::Receiver;

/// The check's TTL, as Consul's proxy registers it.
pub const TTL: Duration = Duration::from_secs(30);
/// Heartbeat interval: TTL/3, so two heartbeats can be lost before the check
/// turns critical.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// What is registered.
#[derive(Debug, Clone)]
pub struct Registration {
    /// `<service>-proxy[-<register-id>]`.
    pub id: String,
    /// `<service>-proxy`.
    pub name: String,
    /// The service this proxy fronts.
    pub destination: String,
    /// The public listener as bound. An any-address is registered as empty
    /// (the agent rejects 0.0.0.0 and ::), meaning "the node's address".
    pub listen: SocketAddr,
}

impl Registration {
    /// Consul's ID and name scheme for `service` with an optional suffix.
    pub fn new(service: &str, register_id: Option<&str>, listen: SocketAddr) -> Registration {
        let name = format!("{service}-proxy");
        let id = match register_id.filter(|s| !s.is_empty()) {
            Some(suffix) => format!("{name}-{suffix}"),
            None => name.clone(),
        };
        Registration {
            id,
            name,
            destination: service.to_string(),
            listen,
        }
    }

    /// The TTL check's ID.
    pub fn check_id(&self) -> String {
        format!("{}-ttl", self.id)
    }

    fn body(&self) -> RegisterBody<'_> {
        let ip = self.listen.ip();
        RegisterBody {
            kind: "connect-proxy",
            id: &self.id,
            name: &self.name,
            address: if ip.is_unspecified() {
                None
            } else {
                Some(ip.to_string())
            },
            port: self.listen.port(),
            proxy: ProxyBody {
                destination_service_name: &self.destination,
            },
            check: CheckBody {
                check_id: self.check_id(),
                name: "proxy heartbeat",
                ttl: format!("{}s", TTL.as_secs()),
                notes: "ferry will heartbeat this check.",
                status: "passing",
            },
        }
    }
}

/// Registers once (replacing existing checks, so a restart is idempotent).
pub async fn register(client: &AgentClient, reg: &Registration) -> Result<(), AgentError> {
    client.register_service(&reg.body()).await
}

/// Heartbeats until `cancel`, registering again whenever the agent does not
/// know the check any more. Logs once per change of state.
pub async fn keep(
    client: AgentClient,
    reg: Registration,
    every: Duration,
    credentials: Receiver<Credentials>,
    cancel: CancellationToken,
) {
    let check = reg.check_id();
    let mut failing: Option<String> = None;
    let mut last_health = CheckStatus::Passing;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (status, note) = match credentials.latest() {
            Some(c) => leaf_health(c.leaf_not_before, c.leaf_not_after, unix_now()),
            None => (CheckStatus::Critical, "no certificates yet".to_string()),
        };
        if status != last_health {
            match status {
                CheckStatus::Passing => tracing::info!(id = %reg.id, "{note}"),
                _ => tracing::warn!(id = %reg.id, "{note}"),
            }
            last_health = status;
        }
        let beat = client.check_ttl(&check, status, &note).await;
        let result = match beat {
            Err(e) if e.status() == Some(404) => {
                tracing::warn!(id = %reg.id, "the agent lost our registration; registering again");
                register(&client, &reg).await
            }
            other => other,
        };
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(id = %reg.id, "heartbeat succeeding again");
                }
            }
            Err(e) => {
                if failing.as_deref() != Some(e.kind().as_str()) {
                    tracing::warn!(id = %reg.id, error = %e, "heartbeat failing; will keep trying");
                    failing = Some(e.kind());
                }
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the TTL check should say about the leaf. The agent renews a leaf
/// between 60 % and 90 % of its lifetime; one past 90 % that has not been
/// replaced means renewal is failing (usually: the agent is unreachable), so
/// the check turns warning, and critical once the leaf has expired — new
/// connections would then fail their handshakes anyway.
pub fn leaf_health(not_before: i64, not_after: i64, now: i64) -> (CheckStatus, String) {
    let left = not_after - now;
    if left <= 0 {
        return (
            CheckStatus::Critical,
            format!("leaf certificate expired {}s ago and has not been renewed (is the agent reachable?)", -left),
        );
    }
    let lifetime = (not_after - not_before).max(1);
    if left * 10 < lifetime {
        return (
            CheckStatus::Warning,
            format!("leaf certificate expires in {left}s and has not been renewed (is the agent reachable?)"),
        );
    }
    (CheckStatus::Passing, "ferry is serving".to_string())
}

/// Deregisters: up to three attempts, 500 ms apart, as Consul's proxy does.
pub async fn deregister(client: &AgentClient, reg: &Registration) -> Result<(), AgentError> {
    let mut last = None;
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match client.deregister_service(&reg.id).await {
            Ok(()) => return Ok(()),
            // Already gone is what we wanted.
            Err(e) if e.status() == Some(404) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| AgentError::Setup("deregister: no attempt made".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_turns_warning_past_ninety_percent_and_critical_at_expiry() {
        // A 100 s leaf from t=1000 to t=1100.
        let cases = [
            (1000, CheckStatus::Passing),
            (1089, CheckStatus::Passing),
            (1091, CheckStatus::Warning),
            (1099, CheckStatus::Warning),
            (1100, CheckStatus::Critical),
            (5000, CheckStatus::Critical),
        ];
        for (now, want) in cases {
            let (status, note) = leaf_health(1000, 1100, now);
            assert_eq!(status, want, "at {now}: {note}");
        }
        assert!(leaf_health(1000, 1100, 1095).1.contains("not been renewed"));
    }

    #[test]
    fn registration_follows_consuls_scheme() {
        let r = Registration::new("web", Some("a1"), "0.0.0.0:21000".parse().unwrap());
        assert_eq!(
            (r.id.as_str(), r.name.as_str()),
            ("web-proxy-a1", "web-proxy")
        );
        let body = serde_json::to_value(r.body()).unwrap();
        assert_eq!(body["Kind"], "connect-proxy");
        assert!(
            body.get("Address").is_none(),
            "never register an any-address"
        );
        assert_eq!(body["Port"], 21000);
        assert_eq!(body["Proxy"]["DestinationServiceName"], "web");
        assert_eq!(body["Check"]["CheckID"], "web-proxy-a1-ttl");
        assert_eq!(body["Check"]["TTL"], "30s");

        let r = Registration::new("web", None, "10.1.2.3:21000".parse().unwrap());
        assert_eq!(r.id, "web-proxy");
        assert_eq!(
            serde_json::to_value(r.body()).unwrap()["Address"],
            "10.1.2.3"
        );
    }
}
