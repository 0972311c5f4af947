//! Certificate rotation without dropping connections: new credentials are
//! validated, then swapped in; connections already established keep going
//! on the old ones, new connections use the new ones at once.

use std::sync::Arc;

use ferry::identity::tls::{Credentials, PemBundle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn bundle(roots: &str, leaf: &ferry::identity::dev_ca::Leaf) -> PemBundle {
    PemBundle {
        roots: roots.to_string(),
        chain: leaf.cert_pem.clone(),
        key: leaf.key_pem.clone(),
        origin: ["roots".into(), "leaf".into(), "key".into()],
    }
}

/// A CA rotation as Consul does it: both sides first trust old and new
/// roots, then the server's leaf is re-issued by the new CA. A connection
/// opened before keeps echoing; the next one sees the new leaf.
#[tokio::test]
async fn rotating_roots_and_leaf_keeps_live_connections() {
    let mesh = Mesh::echo("web", "api", &[]).await;
    let td = mesh.pki.trust_domain().to_string();

    let mut live = TcpStream::connect(mesh.entry("api")).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    within("echo before rotation", live.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"before");

    // A new CA for the same trust domain; both ferries trust both roots.
    let new_ca = ferry::identity::dev_ca::DevCa::generate(&td).unwrap();
    let roots = format!("{}{}", mesh.pki.ca.cert_pem(), new_ca.cert_pem());
    let new_api = new_ca
        .leaf("api", "dc1", std::time::Duration::from_secs(3600))
        .unwrap();
    let old_web = mesh.pki.leaf("web");
    let server_creds =
        Credentials::new(&bundle(&roots, &new_api), "api").expect("new api credentials");
    let client_creds = Credentials::new(&bundle(&roots, &old_web), "web").expect("web credentials");
    mesh.client.running.rotate(Arc::new(client_creds));
    mesh.server.running.rotate(Arc::new(server_creds));

    // New connections work and are served with the new leaf.
    assert_echo(mesh.entry("api"), b"after rotation").await;
    let tcp = TcpStream::connect(mesh.server.inbound()).await.unwrap();
    let tls = raw_client(Some(&old_web))
        .connect(any_name(), tcp)
        .await
        .expect("handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("server cert")[0].clone();
    assert_eq!(
        presented,
        first_cert(&new_api.cert_pem),
        "new connections get the new leaf"
    );

    // The connection from before the rotation is untouched.
    live.write_all(b"still here").await.unwrap();
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("echo after rotation", live.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(rest, b"still here");
}

/// Credentials that do not validate are refused before they could be
/// published: a leaf from a CA the roots do not include, or for the wrong
/// service.
#[tokio::test]
async fn invalid_credentials_are_refused() {
    let pki = Pki::new();
    let other = ferry::identity::dev_ca::DevCa::generate(pki.trust_domain()).unwrap();
    let stranger = other
        .leaf("api", "dc1", std::time::Duration::from_secs(60))
        .unwrap();
    let err = Credentials::new(&bundle(pki.ca.cert_pem(), &stranger), "api").unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");

    let web = pki.leaf("web");
    let err = Credentials::new(&bundle(pki.ca.cert_pem(), &web), "api").unwrap_err();
    assert!(
        err.to_string().contains("\"web\""),
        "names the service found: {err}"
    );
}
