//! Choosing an upstream instance: round robin over the healthy set, with
//! passive ejection of instances that keep failing.
//!
//! The instance list is an immutable snapshot (`Arc<[Arc<Instance>]>`) that
//! discovery replaces wholesale; a connection takes the current snapshot and
//! never holds the lock across an await. Round robin is one atomic counter
//! (as in pingora's `RoundRobin`), taken modulo the number of instances that
//! are not ejected right now, so traffic stays even while one is out.
//!
//! Ejection: after `after_failures` consecutive connect or handshake failures
//! an instance is skipped for `duration`. When that expires it is tried again;
//! one more failure ejects it at once (the failure count only resets on a
//! success). Ejected instances are still returned, last, as candidates of
//! last resort: if every instance is ejected we would rather try one than
//! refuse the connection outright.
//!
//! Failover tiers (xDS: endpoint priorities, then an aggregate cluster's
//! legs): the lowest tier with an instance that is not ejected serves, and
//! retries stay in it, as Envoy's priority load does with Consul's
//! settings. So a datacenter whose instances all keep failing hands over to
//! the next before its health checks say so, and takes the traffic back
//! once an ejection expires and a connection succeeds. Agent-mode
//! instances are all tier 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::time::Instant;

/// When to eject an instance, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Consecutive failures before ejection. 0 disables ejection.
    pub after_failures: u32,
    /// How long an ejected instance is skipped.
    pub duration: Duration,
}

/// Where to dial one instance and whom to expect there, as a control
/// plane that pushes endpoints (xDS) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The TLS server name to send (Consul's SNI).
    pub server_name: ServerName<'static>,
    /// The failover tier: 0 first (see the module's doc).
    pub tier: u32,
    /// The SPIFFE URIs this instance may present (any one of them), when
    /// they are its own (an aggregate cluster's leg); `None`: its
    /// upstream's.
    pub identity: Option<Arc<[String]>>,
}

/// One instance of an upstream service, with its passive health.
#[derive(Debug)]
pub struct Instance {
    /// Where to dial.
    pub addr: SocketAddr,
    /// The TLS server name to send (Consul's SNI), or the IP when the SNI is
    /// not a valid DNS name (then no SNI is sent).
    pub server_name: ServerName<'static>,
    /// The failover tier.
    pub tier: u32,
    /// The identities this instance may present, if not its upstream's.
    pub identity: Option<Arc<[String]>>,
    failures: AtomicU32,
    /// Milliseconds since the balancer's epoch until which the instance is
    /// skipped; 0 when not ejected.
    ejected_until: AtomicU64,
}

/// What a status page or a test sees of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    pub addr: SocketAddr,
    pub consecutive_failures: u32,
    pub ejected: bool,
}

/// Round robin over one upstream's instances.
#[derive(Debug)]
pub struct Balancer {
    policy: EjectionPolicy,
    /// Replaced wholesale by discovery; read per connection, never held
    /// across an await (std lock on purpose: critical sections are a clone).
    instances: RwLock<Arc<[Arc<Instance>]>>,
    cursor: AtomicUsize,
    epoch: Instant,
    /// False until the first instance set arrives (even an empty one), so a
    /// connection that comes before discovery has answered can wait for it
    /// instead of failing as if the upstream had no instances.
    known: tokio::sync::watch::Sender<bool>,
    /// The instance count, exported as a metric.
    count: Option<crate::ops::metrics::GaugeTally>,
}

/// The result of reporting a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; the instance stays in rotation.
    Counted(u32),
    /// This failure ejected the instance.
    Ejected(u32),
}

impl Balancer {
    /// An empty balancer.
    pub fn new(policy: EjectionPolicy) -> Balancer {
        Balancer {
            policy,
            instances: RwLock::new(Arc::from(Vec::new())),
            cursor: AtomicUsize::new(0),
            epoch: Instant::now(),
            known: tokio::sync::watch::Sender::new(false),
            count: None,
        }
    }

    /// Reports the number of instances on `gauge` whenever the set changes.
    pub fn with_gauge(mut self, gauge: crate::ops::metrics::GaugeTally) -> Balancer {
        self.count = Some(gauge);
        self
    }

    /// True once an instance set has been delivered.
    pub fn is_known(&self) -> bool {
        *self.known.borrow()
    }

    /// Completes once an instance set has been delivered.
    pub async fn known(&self) {
        let mut rx = self.known.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }

    /// Replaces the instance set, all in tier 0 with their upstream's
    /// identity (agent mode). Instances that stay (same address and server
    /// name) keep their failure count and ejection.
    pub fn set_instances(&self, targets: Vec<(SocketAddr, ServerName<'static>)>) {
        self.set_targets(
            targets
                .into_iter()
                .map(|(addr, server_name)| Target {
                    addr,
                    server_name,
                    tier: 0,
                    identity: None,
                })
                .collect(),
        );
    }

    /// Replaces the instance set with `targets`. Instances that stay (the
    /// same target) keep their failure count and ejection; the lock is held
    /// only for the swap.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let old = self.snapshot();
        let next: Vec<Arc<Instance>> = targets
            .into_iter()
            .map(|t| {
                old.iter()
                    .find(|i| {
                        i.addr == t.addr
                            && i.server_name == t.server_name
                            && i.tier == t.tier
                            && i.identity == t.identity
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Instance {
                            addr: t.addr,
                            server_name: t.server_name,
                            tier: t.tier,
                            identity: t.identity,
                            failures: AtomicU32::new(0),
                            ejected_until: AtomicU64::new(0),
                        })
                    })
            })
            .collect();
        if let Some(g) = &self.count {
            g.set(next.len() as i64);
        }
        *self.instances.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(next);
        self.known.send_if_modified(|k| !std::mem::replace(k, true));
    }

    fn snapshot(&self) -> Arc<[Arc<Instance>]> {
        self.instances
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn now_ms(&self) -> u64 {
        // +1 so that "until 0" always means "not ejected".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Up to `max` instances to try, in order: the healthy ones of the
    /// serving tier starting at the round-robin cursor, then that tier's
    /// ejected ones as a last resort. With every instance ejected, all of
    /// them, lowest tier first.
    pub fn candidates(&self, max: usize) -> Vec<Arc<Instance>> {
        let all = self.snapshot();
        let now = self.now_ms();
        let out_now = |i: &Instance| i.ejected_until.load(Ordering::Relaxed) > now;
        let serving = all.iter().filter(|i| !out_now(i)).map(|i| i.tier).min();
        let (healthy, mut ejected): (Vec<_>, Vec<_>) = all
            .iter()
            .filter(|i| serving.is_none_or(|t| i.tier == t))
            .cloned()
            .partition(|i| !out_now(i));
        let mut out = Vec::with_capacity(max.min(all.len()));
        if !healthy.is_empty() {
            let start = self.cursor.fetch_add(1, Ordering::Relaxed) % healthy.len();
            out.extend(
                healthy
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(healthy.len())
                    .cloned(),
            );
        }
        ejected.sort_by_key(|i| i.tier);
        out.extend(ejected);
        out.truncate(max);
        out
    }

    /// A successful connect and handshake: the instance is healthy again.
    pub fn report_success(&self, inst: &Instance) {
        if inst.failures.load(Ordering::Relaxed) != 0 {
            inst.failures.store(0, Ordering::Relaxed);
            inst.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// A failed connect or handshake.
    pub fn report_failure(&self, inst: &Instance) -> Failure {
        let n = inst.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let p = self.policy;
        if p.after_failures == 0 || n < p.after_failures {
            return Failure::Counted(n);
        }
        let until = self.now_ms() + p.duration.as_millis() as u64;
        inst.ejected_until.store(until, Ordering::Relaxed);
        Failure::Ejected(n)
    }

    /// The instances and their health, in discovery order.
    pub fn states(&self) -> Vec<InstanceState> {
        let now = self.now_ms();
        self.snapshot()
            .iter()
            .map(|i| InstanceState {
                addr: i.addr,
                consecutive_failures: i.failures.load(Ordering::Relaxed),
                ejected: i.ejected_until.load(Ordering::Relaxed) > now,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
    fn balancer(ports: &[u16], policy: EjectionPolicy) -> Balancer {
        let b = Balancer::new(policy);
        b.set_instances(
            ports
                .iter()
                .map(|p| (addr(*p), ServerName::IpAddress(addr(*p).ip().into())))
                .collect(),
        );
        b
    }
    const POLICY: EjectionPolicy = EjectionPolicy {
        after_failures: 2,
        duration: Duration::from_secs(10),
    };

    #[test]
    fn round_robin_visits_each_instance_in_turn() {
        let b = balancer(&[1, 2, 3], POLICY);
        let firsts: Vec<u16> = (0..6).map(|_| b.candidates(3)[0].addr.port()).collect();
        assert_eq!(firsts, [1, 2, 3, 1, 2, 3]);
        let order: Vec<u16> = b.candidates(3).iter().map(|i| i.addr.port()).collect();
        assert_eq!(order, [1, 2, 3], "the rest follow as fallbacks");
        assert_eq!(b.candidates(2).len(), 2, "bounded by max");
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_repeated_failures_then_retries() {
        let b = balancer(&[1, 2, 3], POLICY);
        let two = b
            .candidates(3)
            .into_iter()
            .find(|i| i.addr.port() == 2)
            .unwrap();
        assert_eq!(b.report_failure(&two), Failure::Counted(1));
        assert_eq!(b.report_failure(&two), Failure::Ejected(2));
        for _ in 0..6 {
            let c = b.candidates(3);
            assert_ne!(c[0].addr.port(), 2, "ejected instance is never first");
            assert_eq!(
                c.last().unwrap().addr.port(),
                2,
                "but remains a last resort"
            );
        }
        // Traffic stays even across the two that remain.
        let firsts: Vec<u16> = (0..4).map(|_| b.candidates(1)[0].addr.port()).collect();
        assert_eq!(firsts.iter().filter(|p| **p == 1).count(), 2);

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.states().iter().all(|s| !s.ejected), "ejection expires");
        assert_eq!(
            b.report_failure(&two),
            Failure::Ejected(3),
            "one more failure ejects at once"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        b.report_success(&two);
        assert_eq!(
            b.report_failure(&two),
            Failure::Counted(1),
            "success resets the count"
        );
    }

    #[test]
    fn replacing_the_set_keeps_health_of_instances_that_stay() {
        let b = balancer(&[1, 2], POLICY);
        let one = b
            .candidates(2)
            .into_iter()
            .find(|i| i.addr.port() == 1)
            .unwrap();
        b.report_failure(&one);
        b.set_instances(vec![
            (addr(1), ServerName::IpAddress(addr(1).ip().into())),
            (addr(4), ServerName::IpAddress(addr(4).ip().into())),
        ]);
        let states = b.states();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].consecutive_failures, 1);
        assert_eq!(states[1].consecutive_failures, 0);
    }

    /// `(port, tier)` targets, each leg's identity its own.
    fn tiered(hosts: &[(u16, u32)], policy: EjectionPolicy) -> Balancer {
        let b = Balancer::new(policy);
        b.set_targets(
            hosts
                .iter()
                .map(|(p, tier)| Target {
                    addr: addr(*p),
                    server_name: ServerName::try_from(format!("leg{tier}.example")).unwrap(),
                    tier: *tier,
                    identity: Some(vec![format!("spiffe://td/leg{tier}")].into()),
                })
                .collect(),
        );
        b
    }

    fn ports(c: &[Arc<Instance>]) -> Vec<u16> {
        c.iter().map(|i| i.addr.port()).collect()
    }

    fn eject(b: &Balancer, port: u16) {
        let all = b.snapshot();
        let i = all.iter().find(|i| i.addr.port() == port).unwrap();
        while !matches!(b.report_failure(i), Failure::Ejected(_)) {}
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_tier_with_an_instance_not_ejected_serves_alone() {
        let b = tiered(&[(1, 0), (2, 0), (3, 1), (4, 2)], POLICY);
        let mut firsts: Vec<u16> = (0..4).map(|_| b.candidates(9)[0].addr.port()).collect();
        firsts.sort();
        assert_eq!(firsts, [1, 1, 2, 2], "round robin inside tier 0");
        assert_eq!(b.candidates(9).len(), 2, "retries stay in the tier");

        eject(&b, 1);
        assert_eq!(ports(&b.candidates(9)), [2, 1], "a failing instance last");
        eject(&b, 2);
        assert_eq!(ports(&b.candidates(9)), [3], "tier 0 out: tier 1 serves");
        let three = &b.candidates(1)[0];
        assert_eq!(
            three.server_name,
            ServerName::try_from("leg1.example").unwrap()
        );
        assert_eq!(
            three.identity.as_deref(),
            Some(&["spiffe://td/leg1".to_string()][..])
        );
        eject(&b, 3);
        assert_eq!(ports(&b.candidates(9)), [4]);
        eject(&b, 4);
        assert_eq!(
            ports(&b.candidates(9)),
            [1, 2, 3, 4],
            "all out: every instance as a last resort, lowest tier first"
        );

        tokio::time::advance(Duration::from_secs(11)).await;
        let mut back = ports(&b.candidates(9));
        back.sort();
        assert_eq!(back, [1, 2], "ejections over: tier 0 serves again");
    }

    #[test]
    fn a_target_that_changes_tier_or_identity_starts_afresh() {
        let b = tiered(&[(1, 0)], POLICY);
        b.report_failure(&b.candidates(1)[0]);
        b.set_targets(vec![Target {
            addr: addr(1),
            server_name: ServerName::try_from("leg0.example").unwrap(),
            tier: 0,
            identity: Some(vec!["spiffe://td/other".to_string()].into()),
        }]);
        assert_eq!(
            b.states()[0].consecutive_failures,
            0,
            "another instance now"
        );
    }

    #[tokio::test]
    async fn an_empty_answer_still_counts_as_known() {
        let b = Balancer::new(POLICY);
        assert!(!b.is_known());
        assert!(b.candidates(3).is_empty());
        b.set_instances(Vec::new());
        assert!(b.is_known(), "discovery answered: there are no instances");
        tokio::time::timeout(Duration::from_secs(1), b.known())
            .await
            .expect("known() completes");
    }
}
