//! Reaching the agent over every transport `-http-addr` accepts: a unix
//! socket (`unix:///path`, Nomad's consul_http.sock), and https with our own
//! CA (`-ca-file`) and a certificate name that differs from the address
//! (`-tls-server-name`). Forwarders in front of the fake agent provide the
//! socket and the TLS, so the agent itself stays the same.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinHandle;

use crate::support::fake_agent::{AgentOpts, FakeAgent};
use crate::support::*;

/// Accepts on a unix socket and forwards each connection to `to`.
fn unix_forwarder(listener: UnixListener, to: std::net::SocketAddr) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut t) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut t).await;
                }
            });
        }
    })
}

/// Terminates TLS with `config` and forwards the plaintext to `to`.
fn tls_forwarder(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    to: std::net::SocketAddr,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let (Ok(mut tls), Ok(mut t)) =
                    (acceptor.accept(s).await, TcpStream::connect(to).await)
                {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut t).await;
                }
            });
        }
    })
}

/// A CA and a server certificate for the DNS name `name` (and nothing
/// else), as an agent with Consul's TLS would have.
fn agent_tls(name: &str) -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.distinguished_name
        .push(DnType::CommonName, "agent test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("server cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(leaf.pem().as_bytes()).expect("cert")],
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key"),
    )
    .expect("server config");
    (ca_cert.pem(), Arc::new(config))
}

/// An inbound ferry for `api` reaching the agent through `http_addr` (plus
/// `extra` flags) gets its certificates and serves: a raw mesh client
/// completes a round trip through it.
async fn serves_through(agent_addr: &str, extra: &[&str], pki: &Pki, app: &EchoServer) {
    let web = pki.leaf("web");
    let app_addr = app.addr_arg();
    let mut args = vec![
        "-service",
        "api",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-http-addr",
        agent_addr,
    ];
    args.extend_from_slice(extra);
    let ferry = within(
        "ferry to get certificates through the agent transport",
        Ferry::start(&args),
    )
    .await;
    let tcp = TcpStream::connect(ferry.inbound()).await.unwrap();
    let mut tls = raw_client(Some(&web))
        .connect(any_name(), tcp)
        .await
        .expect("handshake");
    let got = round_trip(&mut tls, b"over the agent transport")
        .await
        .expect("echo");
    assert_eq!(got, b"over the agent transport");
}

/// `-http-addr unix:///...`: HTTP over a unix socket, as Nomad's
/// `consul_http.sock` provides.
#[tokio::test]
async fn the_agent_can_be_reached_over_a_unix_socket() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consul_http.sock");
    let _fwd = unix_forwarder(UnixListener::bind(&sock).unwrap(), agent.addr());
    let app = EchoServer::start().await;
    serves_through(&format!("unix://{}", sock.display()), &[], &pki, &app).await;
    assert!(
        agent.count("GET", "/v1/agent/connect/ca/leaf/api") >= 1,
        "{}",
        agent.call_log()
    );
}

/// `https://127.0.0.1:PORT` with `-ca-file` and `-tls-server-name
/// agent.test`: the agent's certificate names only `agent.test`, so this
/// works only if ferry verifies against the given name and CA.
#[tokio::test]
async fn the_agent_can_be_reached_over_https_with_our_ca_and_server_name() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let (ca_pem, server) = agent_tls("agent.test");
    let ca_file = pki.path("agent-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = format!("https://{}", listener.local_addr().unwrap());
    let _fwd = tls_forwarder(listener, server, agent.addr());
    let app = EchoServer::start().await;
    let ca = ca_file.display().to_string();
    serves_through(
        &https,
        &["-ca-file", &ca, "-tls-server-name", "agent.test:8501"],
        &pki,
        &app,
    )
    .await;
}

/// The same https agent with the wrong expected name is never trusted:
/// ferry keeps waiting for certificates and binds nothing.
#[tokio::test]
async fn an_agent_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let (ca_pem, server) = agent_tls("agent.test");
    let ca_file = pki.path("agent-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = format!("https://{}", listener.local_addr().unwrap());
    let _fwd = tls_forwarder(listener, server, agent.addr());
    let app = EchoServer::start().await;
    let app_addr = app.addr_arg();
    let ca = ca_file.display().to_string();
    let args = [
        "-service",
        "api",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-http-addr",
        &https,
        "-ca-file",
        &ca,
        "-tls-server-name",
        "other.test",
    ];
    let start = Ferry::start(&args);
    // Bounded: long enough for several retries of the roots and leaf calls.
    let outcome = tokio::time::timeout(std::time::Duration::from_millis(1500), start).await;
    assert!(
        outcome.is_err(),
        "ferry must not start on an agent it cannot verify"
    );
    assert_eq!(
        agent.count("GET", "/v1/agent/connect/ca"),
        0,
        "no request got through TLS: {}",
        agent.call_log()
    );
}

/// An agent that answers with an endless body (here: chunks forever) gets
/// cut off at ferry's reply cap with a clear error, instead of being
/// buffered without bound.
#[tokio::test]
async fn an_endless_agent_reply_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _agent = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 4096];
        let _ = s.read(&mut req).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b' '; 1 << 20];
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat();
        // Bounded: 100 MiB at most, more than the cap; the client hangs up first.
        for _ in 0..100 {
            if s.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let args = ferry::cli::AgentArgs {
        http_addr: Some(url),
        ..Default::default()
    };
    let config = ferry::config::agent::AgentConfig::resolve(&args, &NO_ENV).expect("agent config");
    let client = ferry::control::agent::AgentClient::new(&config).expect("client");
    let blocking = ferry::control::agent::api::Blocking {
        index: 0,
        wait: std::time::Duration::from_secs(5),
    };
    let err = within("the capped read", client.roots(blocking))
        .await
        .expect_err("must not succeed");
    assert!(err.to_string().contains("reply larger than"), "{err}");
}
