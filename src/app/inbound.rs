//! Wiring the public listener: its policy (static intentions, or the agent
//! with live re-checks), what every connection shares, and `-register`,
//! which advertises it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{timers, Shutdown, StartError};
use crate::authz::{Authorizer, RbacChain};
use crate::config::{AuthzSource, Config, InboundConfig};
use crate::control::agent::authorize::AgentAuthorizer;
use crate::control::agent::register::{self, Registration};
use crate::control::agent::revoke::{self, Revoker};
use crate::control::agent::{AgentClient, WatchPolicy};
use crate::control::Receiver;
use crate::identity::tls::Credentials;
use crate::ops::metrics::Metrics;
use crate::proxy::admission::Admission;
use crate::proxy::inbound;
use crate::proxy::limits::Limit;
use crate::proxy::live::LiveConns;

/// How long one authorize call may take before the connection is refused.
/// The agent answers from a local cache in well under a millisecond; two
/// seconds means it is in trouble.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(2);

/// What start hands the public listener's wiring.
pub(super) struct Wiring<'a> {
    pub config: &'a Config,
    pub client: &'a Option<AgentClient>,
    pub metrics: &'a Arc<Metrics>,
    pub policy: WatchPolicy,
    pub shutdown: &'a Shutdown,
    /// RBAC a control plane pushes (xDS), for `AuthzSource::ControlPlane`.
    pub rbac: Option<Receiver<RbacChain>>,
}

impl Wiring<'_> {
    /// Serves the public listener on the bound `listener`; returns its
    /// address.
    pub fn serve_inbound(
        &self,
        listener: TcpListener,
        i: &InboundConfig,
        credentials: Receiver<Credentials>,
    ) -> Result<SocketAddr, StartError> {
        let addr = listener.local_addr().unwrap_or(i.listen);
        let authz = self.authorizer(i)?;
        let ctx = context(self.config, i, authz, credentials, self.metrics);
        tracing::info!(service = %self.config.service, listen = %addr, service_addr = %i.service_addr, "inbound listener ready");
        self.shutdown.conns.spawn(inbound::serve(
            listener,
            Arc::new(ctx),
            self.shutdown.stop.clone(),
            self.shutdown.kill.clone(),
            self.shutdown.conns.clone(),
        ));
        Ok(addr)
    }

    /// The policy for the public listener, and the live-connection table when
    /// decisions can change under open connections (agent mode).
    fn authorizer(
        &self,
        i: &InboundConfig,
    ) -> Result<(Authorizer, Option<Arc<LiveConns>>), StartError> {
        let service = self.config.service.as_str();
        match (&i.authz, self.client) {
            (AuthzSource::Static(set), _) => Ok((Authorizer::Static(set.clone()), None)),
            (
                AuthzSource::Agent {
                    fallback_window,
                    recheck_every,
                },
                Some(client),
            ) => {
                let live = Arc::new(LiveConns::default());
                self.shutdown.control.spawn(revoke::run(
                    Revoker {
                        client: client.clone(),
                        target: service.to_string(),
                        live: live.clone(),
                        every: *recheck_every,
                        timeout: AUTHORIZE_TIMEOUT,
                        policy: self.policy,
                        metrics: self.metrics.clone(),
                    },
                    self.shutdown.halt.clone(),
                ));
                let authz = AgentAuthorizer::new(
                    client.clone(),
                    service.to_string(),
                    AUTHORIZE_TIMEOUT,
                    *fallback_window,
                );
                Ok((Authorizer::Remote(Arc::new(authz)), Some(live)))
            }
            (AuthzSource::Agent { .. }, None) => Err(StartError::NoAgent),
            (AuthzSource::ControlPlane, _) => {
                let rx = self.rbac.clone().ok_or(StartError::ControlPlane(
                    "no RBAC feed from the control plane".into(),
                ))?;
                let live = Arc::new(LiveConns::default());
                self.shutdown.control.spawn(close_denied(
                    rx.clone(),
                    live.clone(),
                    self.shutdown.halt.clone(),
                ));
                Ok((Authorizer::Rbac(rx), Some(live)))
            }
        }
    }
}

/// On every new RBAC policy, closes the open connections it now denies,
/// and only those.
async fn close_denied(mut rx: Receiver<RbacChain>, live: Arc<LiveConns>, halt: CancellationToken) {
    loop {
        let chain = tokio::select! {
            c = rx.changed() => match c {
                Some(c) => c,
                None => return,
            },
            _ = halt.cancelled() => return,
        };
        let closed = live.close_denied(|p| chain.decide(p));
        if closed > 0 {
            tracing::info!(
                closed,
                "RBAC changed: closed the open connections it now denies"
            );
        }
    }
}

/// What every inbound connection shares.
fn context(
    config: &Config,
    i: &InboundConfig,
    (authz, live): (Authorizer, Option<Arc<LiveConns>>),
    credentials: Receiver<Credentials>,
    metrics: &Arc<Metrics>,
) -> inbound::Inbound {
    inbound::Inbound {
        service: config.service.clone(),
        service_addr: crate::proxy::net::LocalApp::parse(&i.service_addr),
        authz,
        credentials,
        timeouts: config.timeouts,
        timers: timers(config),
        conn_limit: Limit::new(
            config.limits.conns,
            "-max-conns",
            "inbound",
            metrics.refusals("inbound", "max_conns"),
        ),
        admission: Arc::new(Admission::new(
            "inbound",
            config.limits.handshakes,
            config.limits.handshakes_per_source,
            metrics,
        )),
        metrics: metrics.clone(),
        live,
    }
}

/// `-register`'s state while running.
pub(super) struct SelfRegistration {
    pub client: AgentClient,
    pub reg: Registration,
    /// Ends the heartbeat loop, which must stop before we deregister or it
    /// would see the check gone and register again. A child of `halt`.
    pub beat: CancellationToken,
}

/// `-register`: registers once now and keeps the heartbeat going. A failed
/// first attempt is retried by the heartbeat loop.
pub(super) async fn register_self(
    client: &AgentClient,
    reg: Registration,
    every: Duration,
    credentials: Receiver<Credentials>,
    shutdown: &Shutdown,
) -> SelfRegistration {
    match register::register(client, &reg).await {
        Ok(()) => tracing::info!(id = %reg.id, "registered with the agent"),
        Err(e) => tracing::warn!(id = %reg.id, error = %e, "registration failed; will retry"),
    }
    let beat = shutdown.halt.child_token();
    shutdown.control.spawn(register::keep(
        client.clone(),
        reg.clone(),
        every,
        credentials,
        beat.clone(),
    ));
    SelfRegistration {
        client: client.clone(),
        reg,
        beat,
    }
}
