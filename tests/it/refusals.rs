//! What ferry refuses, on both sides, and that a refusal never stops it
//! serving.
//!
//! Inbound, a raw mesh client (one that trusts any server) connects straight
//! to the public mTLS port of an `api` ferry and presents a certificate that
//! is wrong in exactly one way. Ferry must refuse it, count the refusal at the
//! decision point that caught it, never dial its local app for it, and then
//! still serve a genuine `web` client through the same listener.
//!
//! Upstream, a `web` ferry dials mTLS servers that are not who they should
//! be. The local client's connection must close with nothing echoed, the
//! failed attempt must be counted, and the same ferry must keep serving a
//! genuine upstream.
//!
//! A note on TLS 1.3: when a server rejects the client's certificate, the
//! handshake has usually completed from the client's side already, and the
//! rejection only shows on the first read, as an alert or an EOF. So here
//! "refused" means the round trip did not bring the bytes back (an error
//! other than our own timeout, or EOF with nothing read), and ferry's
//! counters say why.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ferry::identity::dev_ca::{Leaf, LeafSpec};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const HOUR: Duration = Duration::from_secs(3600);

/// The start of a TLS ClientHello that stops short: the record header
/// promises 512 bytes, the handshake header 508, and only a version and a few
/// random bytes follow.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // TLS 1.2 legacy version
    0x5a, 0x5a, 0x5a, 0x5a, // the first 4 of 32 random bytes
];

/// A Consul-shaped leaf spec for `uri`, valid for an hour from a minute ago.
fn spec(uri: String) -> LeafSpec {
    LeafSpec::consul(uri, HOUR)
}

// ---------------------------------------------------------------------------
// Inbound
// ---------------------------------------------------------------------------

/// An `api` ferry in front of an echo app, and a `web` leaf it accepts.
struct Inbound {
    pki: Pki,
    app: EchoServer,
    ferry: Ferry,
    web: Leaf,
}

/// The inbound decision counters, and how many connections the app saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decisions {
    handshake_failed: u64,
    denied: u64,
    allowed: u64,
    app_accepted: usize,
}

/// Which decision point must refuse a client.
#[derive(Debug, Clone, Copy)]
enum RefusedAt {
    /// The TLS handshake: certificate chain, validity or mesh identity.
    Handshake,
    /// Intentions, after a successful handshake.
    Intentions,
}

impl Inbound {
    /// Starts the `api` ferry with `extra` flags added.
    async fn start(extra: &[&str]) -> Inbound {
        let pki = Pki::new();
        pki.leaf("api");
        let web = pki.leaf("web");
        let app = EchoServer::start().await;
        let dir = pki.dir_arg();
        let app_addr = app.addr_arg();
        let ferry = Ferry::start(&api_args(&dir, &app_addr, extra)).await;
        Inbound {
            pki,
            app,
            ferry,
            web,
        }
    }

    fn decisions(&self) -> Decisions {
        let m = self.ferry.metrics();
        Decisions {
            handshake_failed: m.inbound_handshake_failed.get(),
            denied: m.authz_denied.get(),
            allowed: m.authz_allowed.get(),
            app_accepted: self.app.counts.accepted(),
        }
    }

    /// Waits until every inbound connection ferry holds has ended.
    async fn settle(&self, what: &str) {
        eventually(
            &format!("{what}: ferry to close every inbound connection"),
            || self.ferry.metrics().inbound_active.get() == 0,
        )
        .await;
    }

    /// A genuine `web` client still round-trips, and the app sees exactly
    /// that one connection more.
    async fn assert_still_serves(&self, after: &str) {
        let before = self.app.counts.accepted();
        let got = within(
            &format!("a genuine client after {after}"),
            mesh_echo(self.ferry.inbound(), Some(&self.web)),
        )
        .await
        .unwrap_or_else(|e| panic!("after {after}: a genuine client failed: {e}"));
        assert!(
            got == MSG,
            "after {after}: a genuine client got {} bytes back instead of its echo",
            got.len()
        );
        assert_eq!(
            self.app.counts.accepted(),
            before + 1,
            "after {after}: the app sees the genuine client, once"
        );
    }

    /// For each named case in turn: a client presenting that certificate (or
    /// none) is refused at `at`, the refusal is counted there and nowhere
    /// else, the app is never reached, and a genuine client still gets
    /// through the same listener afterwards.
    async fn assert_refuses(&self, at: RefusedAt, cases: &[(&str, Option<Leaf>)]) {
        for (name, leaf) in cases {
            let before = self.decisions();
            let r = within(name, mesh_echo(self.ferry.inbound(), leaf.as_ref())).await;
            assert!(
                refused(&r),
                "{name}: ferry did not refuse the client: {r:?}"
            );

            let mut want = before;
            let m = self.ferry.metrics();
            let counted: Box<dyn Fn() -> bool + '_> = match at {
                RefusedAt::Handshake => {
                    want.handshake_failed += 1;
                    let target = want.handshake_failed;
                    Box::new(move || m.inbound_handshake_failed.get() >= target)
                }
                RefusedAt::Intentions => {
                    want.denied += 1;
                    let target = want.denied;
                    Box::new(move || m.authz_denied.get() >= target)
                }
            };
            eventually(
                &format!("{name}: ferry to count a refusal at {at:?}"),
                counted,
            )
            .await;
            self.settle(name).await;
            assert_eq!(
                self.decisions(),
                want,
                "{name}: refused at {at:?} only, and the app never reached"
            );
            self.assert_still_serves(name).await;
        }
    }
}

/// A client that presents no certificate at all is refused in the handshake:
/// the public port is mutual TLS only.
#[tokio::test]
async fn inbound_refuses_client_without_certificate() {
    let fx = Inbound::start(&[]).await;
    fx.assert_refuses(RefusedAt::Handshake, &[("no client certificate", None)])
        .await;
}

/// A certificate from another CA that claims the very same trust domain and
/// SPIFFE ID as a genuine `web` leaf is refused: every name in it is right,
/// so only the chain check can catch it.
#[tokio::test]
async fn inbound_refuses_same_identity_from_another_ca() {
    let fx = Inbound::start(&[]).await;
    let rogue = Pki::with_trust_domain(fx.pki.trust_domain());
    assert_eq!(rogue.uri("web"), fx.pki.uri("web"), "same SPIFFE ID");
    let leaf = rogue.issue(&spec(rogue.uri("web")));
    fx.assert_refuses(
        RefusedAt::Handshake,
        &[("web from another CA of the same trust domain", Some(leaf))],
    )
    .await;
}

/// A leaf from the right CA is refused outside its validity period: expired
/// an hour ago, or not valid until an hour from now.
#[tokio::test]
async fn inbound_refuses_client_certificate_outside_validity() {
    let fx = Inbound::start(&[]).await;
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let expired = LeafSpec {
        not_before: now - 2 * hour,
        not_after: now - hour,
        ..spec(fx.pki.uri("web"))
    };
    let not_yet = LeafSpec {
        not_before: now + hour,
        not_after: now + 2 * hour,
        ..spec(fx.pki.uri("web"))
    };
    fx.assert_refuses(
        RefusedAt::Handshake,
        &[
            ("expired client certificate", Some(fx.pki.issue(&expired))),
            (
                "not yet valid client certificate",
                Some(fx.pki.issue(&not_yet)),
            ),
        ],
    )
    .await;
}

/// A leaf from the right CA must name exactly one service by one URI SAN:
/// none, two, or a SPIFFE ID that is not a service (an agent's) are refused.
#[tokio::test]
async fn inbound_refuses_client_certificate_without_exactly_one_service_uri() {
    let fx = Inbound::start(&[]).await;
    let none = LeafSpec {
        uris: vec![],
        ..spec(fx.pki.uri("web"))
    };
    let two = LeafSpec {
        uris: vec![fx.pki.uri("web"), fx.pki.uri("billing")],
        ..spec(fx.pki.uri("web"))
    };
    let agent = spec(format!(
        "spiffe://{}/agent/client/dc/dc1/id/node1",
        fx.pki.trust_domain()
    ));
    fx.assert_refuses(
        RefusedAt::Handshake,
        &[
            ("no URI SAN", Some(fx.pki.issue(&none))),
            ("two URI SANs", Some(fx.pki.issue(&two))),
            ("agent SPIFFE ID, not a service", Some(fx.pki.issue(&agent))),
        ],
    )
    .await;
}

/// A leaf signed by our own CA but naming a service of another trust domain
/// is refused: the chain is valid, so this is the trust-domain pin at work.
#[tokio::test]
async fn inbound_refuses_client_of_another_trust_domain_signed_by_our_ca() {
    let fx = Inbound::start(&[]).await;
    let foreign = spec("spiffe://other.consul/ns/default/dc/dc1/svc/web".to_string());
    fx.assert_refuses(
        RefusedAt::Handshake,
        &[(
            "web of trust domain other.consul, signed by our CA",
            Some(fx.pki.issue(&foreign)),
        )],
    )
    .await;
}

/// A certificate marked as a CA is refused as a client leaf, even though it
/// is signed by our CA and carries a good `web` SPIFFE ID.
#[tokio::test]
async fn inbound_refuses_ca_certificate_as_client_leaf() {
    let fx = Inbound::start(&[]).await;
    let ca_leaf = LeafSpec {
        is_ca: true,
        ..spec(fx.pki.uri("web"))
    };
    fx.assert_refuses(
        RefusedAt::Handshake,
        &[("client leaf marked CA:TRUE", Some(fx.pki.issue(&ca_leaf)))],
    )
    .await;
}

/// With `-allow web -default-deny`, a genuine `billing` leaf gets through the
/// handshake but is refused by intentions: ferry counts a denial (not a
/// failed handshake) and closes without ever dialing the app, while `web`
/// still gets through.
#[tokio::test]
async fn inbound_refuses_service_denied_by_intentions() {
    let fx = Inbound::start(&["-allow", "web", "-default-deny"]).await;
    let billing = fx.pki.leaf("billing");
    fx.assert_refuses(
        RefusedAt::Intentions,
        &[("billing under -allow web -default-deny", Some(billing))],
    )
    .await;
}

/// Plain bytes on the TLS port (an HTTP request) are refused: ferry answers
/// with at most a TLS alert, never with the request, and never dials the app.
#[tokio::test]
async fn inbound_refuses_plaintext_on_the_tls_port() {
    let fx = Inbound::start(&[]).await;
    let before = fx.decisions();
    let request = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n";
    let mut s = TcpStream::connect(fx.ferry.inbound()).await.unwrap();
    let r = within("plaintext request", round_trip(&mut s, request)).await;
    match &r {
        // A TLS alert record: content type 21, then version and a 2-byte length.
        Ok(got) => assert!(
            got.is_empty() || (got[0] == 0x15 && got.len() <= 7),
            "ferry answered plaintext with {got:?}, not at most one TLS alert"
        ),
        Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "ferry left it hanging"),
    }
    eventually("ferry to count the failed handshake", || {
        fx.ferry.metrics().inbound_handshake_failed.get() == before.handshake_failed + 1
    })
    .await;
    fx.settle("plaintext").await;
    assert_eq!(
        fx.decisions(),
        Decisions {
            handshake_failed: before.handshake_failed + 1,
            ..before
        },
        "refused in the handshake only, and the app never reached"
    );
    fx.assert_still_serves("a plaintext request").await;
}

/// With `-handshake-timeout 300ms`, a client that connects and sends nothing,
/// and one that sends only part of a ClientHello, are both closed by ferry
/// (EOF or error on read, no bytes), each counted as a failed handshake.
#[tokio::test]
async fn inbound_closes_clients_that_never_finish_the_handshake() {
    let fx = Inbound::start(&["-handshake-timeout", "300ms"]).await;
    let before = fx.decisions();
    let mut silent = TcpStream::connect(fx.ferry.inbound()).await.unwrap();
    let mut partial = TcpStream::connect(fx.ferry.inbound()).await.unwrap();
    partial.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();

    for (name, s) in [
        ("silent", &mut silent),
        ("partial ClientHello", &mut partial),
    ] {
        let mut buf = [0u8; 64];
        let r = within(
            &format!("ferry to close the {name} client"),
            s.read(&mut buf),
        )
        .await;
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "{name} client: expected EOF or an error, got {r:?}"
        );
    }
    eventually("ferry to count both failed handshakes", || {
        fx.ferry.metrics().inbound_handshake_failed.get() == before.handshake_failed + 2
    })
    .await;
    fx.settle("stalled handshakes").await;
    assert_eq!(
        fx.decisions(),
        Decisions {
            handshake_failed: before.handshake_failed + 2,
            ..before
        },
        "refused in the handshake only, and the app never reached"
    );
    fx.assert_still_serves("two stalled handshakes").await;
}

/// A client stuck mid-handshake holds only its own connection: while it
/// stalls, a genuine client gets through, and the stalled one is still open
/// afterwards (ferry did not wait on it, nor drop it early).
#[tokio::test]
async fn inbound_stalled_handshake_does_not_block_others() {
    let fx = Inbound::start(&["-handshake-timeout", "60s"]).await;
    let mut stalled = TcpStream::connect(fx.ferry.inbound()).await.unwrap();
    stalled.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
    eventually("ferry to take the stalled client", || {
        fx.ferry.metrics().inbound_active.get() == 1
    })
    .await;

    fx.assert_still_serves("a stalled handshake began").await;

    let mut buf = [0u8; 1];
    match stalled.try_read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("the stalled client should still be open and unanswered: {other:?}"),
    }
    assert_eq!(fx.ferry.metrics().inbound_handshake_failed.get(), 0);
}

// ---------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------

/// A `web` ferry with upstream `api` pointing at the given instances, and a
/// control upstream `db` whose one instance is genuine.
struct Outbound {
    db: TlsEchoServer,
    ferry: Ferry,
}

impl Outbound {
    /// `pki` must already hold the `web` leaf.
    async fn start(pki: &Pki, api: &[SocketAddr]) -> Outbound {
        let db = TlsEchoServer::start(pki, &pki.leaf("db")).await;
        let dir = pki.dir_arg();
        let ferry = StandaloneArgs::new("web", &dir)
            .upstream("api", api)
            .upstream("db", &[db.addr])
            .start()
            .await;
        Outbound { db, ferry }
    }

    /// A connection to `api`, whose only instance is `impostor`, is closed
    /// with nothing echoed; ferry did dial the impostor (so its identity is
    /// what was refused) and counts one failed attempt; and the `db`
    /// upstream of the same ferry still round-trips.
    async fn assert_refuses(&self, name: &str, impostor: &TlsEchoServer) {
        let m = self.ferry.metrics();
        let (failed, unavailable) = (
            m.upstream_attempt_failed.get(),
            m.upstream_unavailable.get(),
        );
        let r = within(name, plain_echo(self.ferry.upstream("api"))).await;
        assert!(
            refused(&r),
            "{name}: ferry did not refuse the server: {r:?}"
        );
        eventually(
            &format!("{name}: ferry to give up on the connection"),
            || m.upstream_unavailable.get() == unavailable + 1,
        )
        .await;
        assert_eq!(
            m.upstream_attempt_failed.get(),
            failed + 1,
            "{name}: one failed attempt at the only instance"
        );
        assert!(
            impostor.counts.accepted() >= 1,
            "{name}: ferry never dialed the impostor, so nothing proves its identity was checked"
        );
        eventually(&format!("{name}: the impostor's handshake to end"), || {
            impostor.counts.closed() == impostor.counts.accepted()
        })
        .await;

        let db_before = self.db.counts.accepted();
        within(
            &format!("db after {name}"),
            assert_echo(self.ferry.upstream("db"), MSG),
        )
        .await;
        assert_eq!(
            self.db.counts.accepted(),
            db_before + 1,
            "after {name}: the genuine db instance served the connection"
        );
    }
}

/// An `api` instance that presents a `billing` leaf from our own CA is
/// refused: a valid chain is not enough, the server must be the service we
/// meant to reach.
#[tokio::test]
async fn upstream_refuses_server_of_the_wrong_service() {
    let pki = Pki::new();
    pki.leaf("web");
    let impostor = TlsEchoServer::start(&pki, &pki.leaf("billing")).await;
    let fx = Outbound::start(&pki, &[impostor.addr]).await;
    fx.assert_refuses("billing posing as api", &impostor).await;
}

/// With an impostor (`billing`) listed first and a genuine `api` second,
/// every connection succeeds: ferry retries past the impostor, which is tried
/// and counted as failed, and only the genuine instance ever echoes.
#[tokio::test]
async fn upstream_retries_past_an_impostor_to_a_genuine_instance() {
    let pki = Pki::new();
    pki.leaf("web");
    let impostor = TlsEchoServer::start(&pki, &pki.leaf("billing")).await;
    let genuine = TlsEchoServer::start(&pki, &pki.leaf("api")).await;
    let fx = Outbound::start(&pki, &[impostor.addr, genuine.addr]).await;
    let entry = fx.ferry.upstream("api");

    // Round robin over two instances: the impostor comes first at least once.
    for i in 0..4 {
        let msg = format!("connection {i} to api");
        within(&msg, assert_echo(entry, msg.as_bytes())).await;
    }
    let m = fx.ferry.metrics();
    assert!(
        m.upstream_attempt_failed.get() >= 1,
        "the impostor was tried"
    );
    assert!(m.upstream_retries.get() >= 1, "and retried past");
    assert_eq!(m.upstream_unavailable.get(), 0, "no connection gave up");
    assert_eq!(
        genuine.counts.accepted(),
        4,
        "the genuine api served all four"
    );
    assert!(
        impostor.counts.accepted() >= 1,
        "ferry did dial the impostor"
    );
    let states = &fx.ferry.running.instances("api").expect("api upstream");
    let state = |addr| states.iter().find(|s| s.addr == addr).expect("instance");
    assert!(state(impostor.addr).consecutive_failures >= 1);
    assert_eq!(state(genuine.addr).consecutive_failures, 0);
}

/// An `api` instance whose leaf comes from another CA, with our trust domain
/// and the exact `api` SPIFFE ID, is refused: only the chain check can tell.
#[tokio::test]
async fn upstream_refuses_same_identity_from_another_ca() {
    let pki = Pki::new();
    pki.leaf("web");
    let rogue = Pki::with_trust_domain(pki.trust_domain());
    assert_eq!(rogue.uri("api"), pki.uri("api"), "same SPIFFE ID");
    let impostor = TlsEchoServer::start(&rogue, &rogue.issue(&spec(rogue.uri("api")))).await;
    let fx = Outbound::start(&pki, &[impostor.addr]).await;
    fx.assert_refuses("api from another CA of the same trust domain", &impostor)
        .await;
}

/// An `api` instance whose leaf is signed by our CA but names `api` in
/// another trust domain is refused: the trust domain is pinned.
#[tokio::test]
async fn upstream_refuses_server_of_another_trust_domain_signed_by_our_ca() {
    let pki = Pki::new();
    pki.leaf("web");
    let foreign = spec("spiffe://other.consul/ns/default/dc/dc1/svc/api".to_string());
    let impostor = TlsEchoServer::start(&pki, &pki.issue(&foreign)).await;
    let fx = Outbound::start(&pki, &[impostor.addr]).await;
    fx.assert_refuses("api of trust domain other.consul", &impostor)
        .await;
}

/// An `api` instance presenting an expired leaf from our CA is refused.
#[tokio::test]
async fn upstream_refuses_expired_server_certificate() {
    let pki = Pki::new();
    pki.leaf("web");
    let now = OffsetDateTime::now_utc();
    let expired = LeafSpec {
        not_before: now - time::Duration::hours(2),
        not_after: now - time::Duration::hours(1),
        ..spec(pki.uri("api"))
    };
    let impostor = TlsEchoServer::start(&pki, &pki.issue(&expired)).await;
    let fx = Outbound::start(&pki, &[impostor.addr]).await;
    fx.assert_refuses("expired api certificate", &impostor)
        .await;
}
