//! The fake Consul agent (`support::fake_agent`) behaves like Consul (so
//! failures elsewhere are ferry's): shapes, status codes and error texts
//! from spec §1, blocking queries, intentions, ACLs, and the fault knobs
//! other tests rely on.

use std::time::Duration;

use reqwest::{Client, RequestBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

use crate::support::fake_agent::{sha1, AgentOpts, FakeAgent, Health, Instance, Intention};
use crate::support::{http, is_colon_hex, loopback, within, Pki, DEADLINE};

/// Long enough that a query which should block visibly has not returned.
const STILL_BLOCKED: Duration = Duration::from_millis(200);

/// What came back, with the headers Consul clients read.
#[derive(Debug)]
struct Answer {
    status: u16,
    index: Option<u64>,
    hash: Option<String>,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn index(&self) -> u64 {
        self.index
            .unwrap_or_else(|| panic!("no X-Consul-Index: {self:?}"))
    }
}

async fn try_send(req: RequestBuilder) -> Result<Answer, reqwest::Error> {
    let resp = req.send().await?;
    let header = |name: &str| {
        let value = resp.headers().get(name)?;
        value.to_str().ok().map(String::from)
    };
    let index = header("X-Consul-Index").map(|i| i.parse().expect("numeric X-Consul-Index"));
    let hash = header("X-Consul-ContentHash");
    let content_type = header("content-type").unwrap_or_default();
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok(Answer {
        status,
        index,
        hash,
        content_type,
        body,
    })
}

async fn send(req: RequestBuilder) -> Answer {
    within("request to the fake agent", try_send(req))
        .await
        .expect("request")
}

async fn get(http: &Client, agent: &FakeAgent, path: &str) -> Answer {
    send(http.get(format!("{}{path}", agent.url()))).await
}

async fn put_json(http: &Client, agent: &FakeAgent, path: &str, body: Value) -> Answer {
    send(http.put(format!("{}{path}", agent.url())).json(&body)).await
}

async fn authorize(http: &Client, agent: &FakeAgent, body: Value) -> Answer {
    let url = format!("{}/v1/agent/connect/authorize", agent.url());
    send(http.post(url).json(&body)).await
}

/// Starts `path` as a request in its own task, for blocking queries.
fn spawn_get(http: &Client, agent: &FakeAgent, path: &str) -> tokio::task::JoinHandle<Answer> {
    tokio::spawn(send(http.get(format!("{}{path}", agent.url()))))
}

/// Asserts a spawned request is still waiting after a short while.
async fn assert_blocked(call: &mut tokio::task::JoinHandle<Answer>, what: &str) {
    let early = timeout(STILL_BLOCKED, call).await;
    assert!(
        early.is_err(),
        "{what} returned without a change: {early:?}"
    );
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn roots_answer_at_once_block_until_rotation_and_time_out_unchanged() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();

    let first = get(&http, &agent, "/v1/agent/connect/ca/roots").await;
    assert_eq!(first.status, 200, "{first:?}");
    let index = first.index();
    assert!(index >= 1);
    let body = first.json();
    assert_eq!(body["TrustDomain"], pki.trust_domain());
    let root = &body["Roots"][0];
    assert_eq!(body["Roots"].as_array().unwrap().len(), 1);
    assert_eq!(body["ActiveRootID"], root["ID"]);
    assert_eq!(
        keys(root),
        [
            "Active",
            "CreateIndex",
            "ExternalTrustDomain",
            "ID",
            "IntermediateCerts",
            "ModifyIndex",
            "Name",
            "NotAfter",
            "NotBefore",
            "PrivateKeyBits",
            "PrivateKeyType",
            "RootCert",
            "SerialNumber",
            "SigningKeyID",
        ]
    );
    assert_eq!(
        root["RootCert"].as_str().unwrap().trim_end(),
        pki.ca.cert_pem().trim_end()
    );
    assert!(root["RootCert"].as_str().unwrap().ends_with('\n'));
    // The ID is the SHA-1 fingerprint of the root's DER.
    let der = CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).expect("CA DER");
    let fingerprint: Vec<String> = sha1(&der).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(root["ID"], fingerprint.join(":"));
    assert!(
        is_colon_hex(root["SigningKeyID"].as_str().unwrap()),
        "{root}"
    );
    assert_eq!(root["Active"], true);
    assert_eq!(root["IntermediateCerts"], Value::Null);
    assert_eq!(
        (
            root["PrivateKeyType"].as_str(),
            root["PrivateKeyBits"].as_u64()
        ),
        (Some("ec"), Some(256))
    );
    let cluster = pki.trust_domain().trim_end_matches(".consul");
    assert_eq!(root["ExternalTrustDomain"], cluster);

    // With the current index the query waits for a change.
    let mut blocked = spawn_get(
        &http,
        &agent,
        &format!("/v1/agent/connect/ca/roots?index={index}&wait=10s"),
    );
    assert_blocked(&mut blocked, "roots query at the current index").await;
    let next = Pki::new();
    agent.rotate(next.ca.cert_pem());
    let rotated = within("blocked roots query", &mut blocked).await.unwrap();
    let rotated_index = rotated.index();
    assert!(rotated_index > index, "{index} -> {rotated_index}");
    let body = rotated.json();
    let roots = body["Roots"].as_array().unwrap();
    assert_eq!(roots.len(), 2, "the old root stays listed");
    assert_eq!(roots[0]["Active"], false);
    assert_eq!(roots[1]["Active"], true);
    assert_eq!(
        roots[1]["RootCert"].as_str().unwrap().trim_end(),
        next.ca.cert_pem().trim_end()
    );
    assert_eq!(body["ActiveRootID"], roots[1]["ID"]);
    assert_ne!(roots[0]["ID"], roots[1]["ID"]);

    // Nothing changes: back after `wait` (plus at most wait/16), same index.
    let started = Instant::now();
    let path = format!("/v1/agent/connect/ca/roots?index={rotated_index}&wait=300ms");
    let same = get(&http, &agent, &path).await;
    let took = started.elapsed();
    assert_eq!((same.status, same.index), (200, Some(rotated_index)));
    assert!(
        took >= Duration::from_millis(300),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
}

#[tokio::test]
async fn query_parameters_are_checked_like_consul_ce() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    let cases = [
        (
            "/v1/agent/connect/ca/roots?index=1&wait=10",
            "Invalid wait time",
        ),
        (
            "/v1/agent/connect/ca/roots?index=1&wait=soon",
            "Invalid wait time",
        ),
        (
            "/v1/agent/connect/ca/roots?index=abc&wait=1s",
            "Invalid index",
        ),
        (
            "/v1/agent/connect/ca/roots?ns=default",
            "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
        ),
        (
            "/v1/health/connect/db?partition=default",
            "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature",
        ),
    ];
    for (path, want) in cases {
        let got = get(&http, &agent, path).await;
        assert_eq!((got.status, got.body.as_str()), (400, want), "{path}");
        assert!(
            got.content_type.starts_with("text/plain"),
            "{path}: {got:?}"
        );
    }
    // Go durations Consul accepts; an index below the current one answers at once.
    for wait in ["1m30s", "1.5s", "300000ms", "5m"] {
        let got = get(
            &http,
            &agent,
            &format!("/v1/agent/connect/ca/roots?index=1&wait={wait}"),
        )
        .await;
        assert_eq!(got.status, 200, "wait={wait}: {got:?}");
    }
    let namespaced = http
        .get(format!("{}/v1/agent/connect/ca/roots", agent.url()))
        .header("X-Consul-Namespace", "default");
    assert_eq!(send(namespaced).await.status, 400);
}

#[tokio::test]
async fn leaf_is_the_one_set_blocks_until_replaced_and_is_issued_on_demand() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();
    let leaf = pki.leaf("web");
    agent.set_leaf("web", &leaf);

    let first = get(&http, &agent, "/v1/agent/connect/ca/leaf/web").await;
    assert_eq!(first.status, 200, "{first:?}");
    let body = first.json();
    assert_eq!(
        keys(&body),
        [
            "CertPEM",
            "CreateIndex",
            "ModifyIndex",
            "PrivateKeyPEM",
            "SerialNumber",
            "Service",
            "ServiceURI",
            "ValidAfter",
            "ValidBefore",
        ]
    );
    assert_eq!(body["CertPEM"], leaf.cert_pem.as_str());
    assert_eq!(body["PrivateKeyPEM"], leaf.key_pem.as_str());
    assert_eq!(body["Service"], "web");
    assert_eq!(body["ServiceURI"], pki.uri("web"));
    assert!(
        is_colon_hex(body["SerialNumber"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(body["ModifyIndex"].as_u64(), Some(first.index()));
    assert_eq!(first.index(), agent.leaf_index("web"));

    let index = first.index();
    let mut blocked = spawn_get(
        &http,
        &agent,
        &format!("/v1/agent/connect/ca/leaf/web?index={index}&wait=10s"),
    );
    assert_blocked(&mut blocked, "leaf query at the current index").await;
    let renewed = pki.leaf("web");
    agent.set_leaf("web", &renewed);
    let next = within("blocked leaf query", &mut blocked).await.unwrap();
    assert!(next.index() > index);
    assert_eq!(next.json()["CertPEM"], renewed.cert_pem.as_str());

    // A service with no leaf set gets one from the CA, as Consul would.
    let issued = get(&http, &agent, "/v1/agent/connect/ca/leaf/billing").await;
    assert_eq!(issued.status, 200, "{issued:?}");
    assert_eq!(issued.json()["ServiceURI"], pki.uri("billing"));
}

#[tokio::test]
async fn leaf_without_a_ca_is_a_500() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let got = get(&http(), &agent, "/v1/agent/connect/ca/leaf/web").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (500, "cluster has no CA bootstrapped yet")
    );
}

#[tokio::test]
async fn health_passing_filters_unhealthy_instances_and_dc_selects() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    agent.set_instances(
        "db",
        vec![
            Instance::sidecar(loopback(21001)),
            Instance::sidecar(loopback(21002)).with_health(Health::Critical),
            Instance::native(loopback(21003)).with_health(Health::Warning),
            Instance::sidecar(loopback(21004)).in_dc("dc2"),
        ],
    );
    let ports = |a: &Answer| -> Vec<u64> {
        let list = a.json();
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| e["Service"]["Port"].as_u64().unwrap())
            .collect()
    };

    let all = get(&http, &agent, "/v1/health/connect/db").await;
    assert_eq!(ports(&all), [21001, 21002, 21003]);
    for q in ["passing", "passing=1", "passing=true", "passing=T"] {
        let got = get(&http, &agent, &format!("/v1/health/connect/db?{q}")).await;
        assert_eq!(ports(&got), [21001], "?{q}");
    }
    let not_filtered = get(&http, &agent, "/v1/health/connect/db?passing=false").await;
    assert_eq!(ports(&not_filtered), [21001, 21002, 21003]);
    let bad = get(&http, &agent, "/v1/health/connect/db?passing=maybe").await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Invalid value for ?passing")
    );

    let remote = get(&http, &agent, "/v1/health/connect/db?dc=dc2").await;
    assert_eq!(ports(&remote), [21004]);
    assert_eq!(remote.json()[0]["Node"]["Datacenter"], "dc2");
    let nowhere = get(&http, &agent, "/v1/health/connect/db?dc=nowhere").await;
    assert_eq!(
        (nowhere.status, nowhere.body.as_str()),
        (500, "No path to datacenter")
    );

    let entries = all.json();
    let sidecar = &entries[0];
    assert_eq!(keys(sidecar), ["Checks", "Node", "Service"]);
    assert_eq!(sidecar["Service"]["Kind"], "connect-proxy");
    assert_eq!(sidecar["Service"]["Service"], "db-sidecar-proxy");
    assert_eq!(sidecar["Service"]["Proxy"]["DestinationServiceName"], "db");
    assert_eq!(sidecar["Service"]["Address"], "127.0.0.1");
    assert_eq!(sidecar["Node"]["Address"], "127.0.0.1");
    assert_eq!(sidecar["Node"]["Datacenter"], "dc1");
    assert_eq!(sidecar["Checks"][0]["CheckID"], "serfHealth");
    let native = &entries[2];
    assert!(
        native["Service"].get("Kind").is_none(),
        "native has no Kind: {native}"
    );
    assert_eq!(native["Service"]["Service"], "db");
    assert_eq!(native["Service"]["Connect"]["Native"], true);
    assert_eq!(native["Checks"][1]["Status"], "warning");

    let unknown = get(&http, &agent, "/v1/health/connect/nothing").await;
    assert_eq!((unknown.status, unknown.body.as_str()), (200, "[]"));
    assert!(unknown.index() >= 1);

    // Blocking: the query returns when the instances change.
    let index = all.index();
    let mut blocked = spawn_get(
        &http,
        &agent,
        &format!("/v1/health/connect/db?passing&index={index}&wait=10s"),
    );
    assert_blocked(&mut blocked, "health query at the current index").await;
    agent.set_instances(
        "db",
        vec![Instance::sidecar(loopback(21005)).address_on_node()],
    );
    let changed = within("blocked health query", &mut blocked).await.unwrap();
    assert!(changed.index() > index);
    assert_eq!(ports(&changed), [21005]);
    assert_eq!(
        changed.json()[0]["Service"]["Address"],
        "",
        "address left to the node"
    );
}

#[tokio::test]
async fn prepared_query_returns_mesh_endpoints_with_connect_true() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    agent.set_instances(
        "db",
        vec![
            Instance::sidecar(loopback(21001)),
            Instance::native(loopback(21002)),
            Instance::sidecar(loopback(21003)).with_health(Health::Critical),
        ],
    );
    agent.set_query("db-query", "db");

    let mesh = get(&http, &agent, "/v1/query/db-query/execute?connect=true").await;
    assert_eq!(mesh.status, 200, "{mesh:?}");
    let body = mesh.json();
    assert_eq!(
        keys(&body),
        ["DNS", "Datacenter", "Failovers", "Nodes", "Service"]
    );
    assert_eq!(body["Service"], "db");
    assert_eq!(body["Datacenter"], "dc1");
    assert_eq!(
        body["Nodes"].as_array().unwrap().len(),
        2,
        "critical left out: {body}"
    );

    let plain = get(&http, &agent, "/v1/query/db-query/execute").await;
    assert_eq!(
        plain.json()["Nodes"].as_array().unwrap().len(),
        1,
        "only instances of db itself"
    );

    let unknown = get(&http, &agent, "/v1/query/nope/execute?connect=true").await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "Query not found")
    );
}

#[tokio::test]
async fn authorize_exact_source_beats_wildcard_and_falls_back_to_the_default() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();
    agent.set_intentions(vec![
        Intention::deny("*", "db"),
        Intention::allow("web", "db"),
        Intention::l7("api", "db"),
    ]);
    let ask = |client: &str, target: &str| json!({ "Target": target, "ClientCertURI": pki.uri(client), "ClientCertSerial": "01:02" });
    let decide = |a: Answer| {
        assert_eq!(a.status, 200, "{a:?}");
        let body = a.json();
        assert_eq!(keys(&body), ["Authorized", "Reason"]);
        (
            body["Authorized"].as_bool().unwrap(),
            body["Reason"].as_str().unwrap().to_string(),
        )
    };

    let (ok, reason) = decide(authorize(&http, &agent, ask("web", "db")).await);
    assert!(
        ok && reason.starts_with("Matched L4 intention: web => db"),
        "{reason}"
    );
    let (ok, reason) = decide(authorize(&http, &agent, ask("billing", "db")).await);
    assert!(
        !ok && reason.starts_with("Matched L4 intention: * => db"),
        "{reason}"
    );
    let (ok, reason) = decide(authorize(&http, &agent, ask("api", "db")).await);
    assert!(
        !ok && reason.starts_with("Matched L7 intention"),
        "{reason}"
    );

    // The client's trust domain is not compared (spec §2.2).
    let foreign = json!({ "Target": "db", "ClientCertURI": "spiffe://other.consul/ns/default/dc/dc9/svc/web" });
    assert!(decide(authorize(&http, &agent, foreign).await).0);

    let (ok, reason) = decide(authorize(&http, &agent, ask("web", "cache")).await);
    assert!(ok, "default allow");
    assert_eq!(reason, "Default behavior configured by ACLs");
    agent.set_default_allow(false);
    assert!(
        !decide(authorize(&http, &agent, ask("web", "cache")).await).0,
        "default deny"
    );
}

#[tokio::test]
async fn authorize_rejects_what_consul_rejects() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();
    let uri = pki.uri("web");
    let cases = [
        (
            json!({ "Target": "db", "ClientCertURI": uri, "Namespace": "default" }),
            "Request decode failed: json: unknown field \"Namespace\"",
        ),
        (
            json!({ "ClientCertURI": uri }),
            "Target service must be specified",
        ),
        (
            json!({ "Target": "db", "ClientCertURI": "https://web.example" }),
            "ClientCertURI not a valid Connect identifier",
        ),
        (
            json!({ "Target": "db", "ClientCertURI": "spiffe://x.consul/agent/client/dc/dc1/id/n1" }),
            "ClientCertURI not a valid Service identifier",
        ),
    ];
    for (body, want) in cases {
        let got = authorize(&http, &agent, body.clone()).await;
        assert_eq!((got.status, got.body.as_str()), (400, want), "{body}");
    }
    // Go matches field names case-insensitively.
    let lower = json!({ "target": "db", "clientcerturi": uri });
    assert_eq!(authorize(&http, &agent, lower).await.status, 200);
    let wrong_method = get(&http, &agent, "/v1/agent/connect/authorize").await;
    assert_eq!(wrong_method.status, 405);
}

#[tokio::test]
async fn acl_token_is_required_when_configured_and_never_printed() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki).token("s3cret")).await;
    let http = http();
    let leaf_url = format!("{}/v1/agent/connect/ca/leaf/web", agent.url());

    let anonymous = send(http.get(&leaf_url)).await;
    assert_eq!(anonymous.status, 403);
    assert_eq!(
        anonymous.body,
        "Permission denied: anonymous token lacks permission 'service:write' on \"web\". \
         The anonymous token is used implicitly when a request does not specify a token."
    );
    let wrong = send(http.get(&leaf_url).header("X-Consul-Token", "guess")).await;
    assert_eq!((wrong.status, wrong.body.as_str()), (403, "ACL not found"));
    let header = send(http.get(&leaf_url).header("X-Consul-Token", "s3cret")).await;
    assert_eq!(header.status, 200, "{header:?}");
    let bearer = send(http.get(&leaf_url).bearer_auth("s3cret")).await;
    assert_eq!(bearer.status, 200, "{bearer:?}");
    let health = get(&http, &agent, "/v1/health/connect/web").await;
    assert_eq!(health.status, 403);
    // Roots need no ACL in Consul.
    assert_eq!(
        get(&http, &agent, "/v1/agent/connect/ca/roots")
            .await
            .status,
        200
    );

    let tokens: Vec<Option<String>> = agent.calls().into_iter().map(|c| c.token).collect();
    let s = |t: &str| Some(t.to_string());
    assert_eq!(
        tokens,
        [None, s("guess"), s("s3cret"), s("s3cret"), None, None]
    );
    let printed = format!("{:?}\n{}", agent.calls(), agent.call_log());
    assert!(
        !printed.contains("s3cret") && !printed.contains("guess"),
        "{printed}"
    );
}

#[tokio::test]
async fn register_validates_like_consul_and_serves_what_was_registered() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    let register = "/v1/agent/service/register";
    let refused = [
        (json!({ "Name": "p", "Address": "0.0.0.0", "Port": 1 }), "Invalid service address"),
        (json!({ "Name": "p", "Address": "::", "Port": 1 }), "Invalid service address"),
        (json!({ "Port": 1 }), "Missing service name"),
        (
            json!({ "Name": "p", "Namespace": "default" }),
            "Request decode failed: json: unknown field \"Namespace\"",
        ),
        (
            json!({ "Name": "p", "Proxy": { "DestinationServiceName": "web", "Bogus": 1 } }),
            "Request decode failed: json: unknown field \"Bogus\"",
        ),
        (
            json!({ "Name": "p", "Kind": "connect-proxy" }),
            "Validation failed: 2 errors occurred:\n\t* Port or SocketPath must be set for a connect-proxy\n\t* Proxy.DestinationServiceName must be non-empty for Connect proxy services\n\n",
        ),
    ];
    for (body, want) in refused {
        let got = put_json(&http, &agent, register, body.clone()).await;
        assert_eq!((got.status, got.body.as_str()), (400, want), "{body}");
    }
    let wrong_type = put_json(
        &http,
        &agent,
        register,
        json!({ "Name": "p", "Port": "80" }),
    )
    .await;
    assert_eq!(wrong_type.status, 400);
    assert!(
        wrong_type
            .body
            .starts_with("Request decode failed: json: cannot unmarshal string"),
        "{wrong_type:?}"
    );
    assert!(agent.service_ids().is_empty());

    let proxy = json!({
        "Kind": "connect-proxy",
        "ID": "web-proxy-1",
        "Name": "web-proxy",
        "Port": 21000,
        "Proxy": {
            "DestinationServiceName": "web",
            "LocalServicePort": 8080,
            "Config": { "bind_port": 21000, "handshake_timeout_ms": 5000 },
            "Upstreams": [{ "DestinationName": "db", "LocalBindPort": 9191 }],
        },
        "Check": {
            "CheckID": "web-proxy-1-ttl", "Name": "proxy heartbeat", "TTL": "30s",
            "Notes": "Built-in proxy will heartbeat this check.", "Status": "passing",
        },
    });
    let ok = put_json(
        &http,
        &agent,
        &format!("{register}?replace-existing-checks"),
        proxy,
    )
    .await;
    assert_eq!((ok.status, ok.body.as_str()), (200, ""), "{ok:?}");

    let got = get(&http, &agent, "/v1/agent/service/web-proxy-1").await;
    let svc = got.json();
    assert_eq!(svc["Kind"], "connect-proxy");
    assert_eq!(svc["Datacenter"], "dc1");
    assert_eq!(svc["Port"], 21000);
    assert_eq!(svc["Proxy"]["DestinationServiceName"], "web");
    assert_eq!(
        svc["Proxy"]["Config"]["bind_port"], 21000,
        "opaque keys kept"
    );
    let upstream = &svc["Proxy"]["Upstreams"][0];
    assert_eq!(upstream["DestinationType"], "service", "defaulted");
    assert_eq!(upstream["LocalBindPort"], 9191);
    assert!(
        upstream.get("Datacenter").is_none(),
        "omitempty: {upstream}"
    );
    assert_eq!(svc["ContentHash"].as_str(), got.hash.as_deref());

    let all = get(&http, &agent, "/v1/agent/services").await.json();
    assert_eq!(keys(&all), ["web-proxy-1"]);
    let catalog = get(&http, &agent, "/v1/catalog/service/web-proxy?stale")
        .await
        .json();
    assert_eq!(catalog[0]["ServiceID"], "web-proxy-1");
    assert_eq!(catalog[0]["ServicePort"], 21000);

    // TTL checks.
    let check = agent.check("web-proxy-1-ttl").expect("check registered");
    assert_eq!((check.status.as_str(), check.updates), ("passing", 0));
    let pass = send(http.put(format!(
        "{}/v1/agent/check/pass/web-proxy-1-ttl?note=alive",
        agent.url()
    )))
    .await;
    assert_eq!(pass.status, 200, "{pass:?}");
    let check = agent.check("web-proxy-1-ttl").unwrap();
    assert_eq!(
        (check.status.as_str(), check.output.as_str(), check.updates),
        ("passing", "alive", 1)
    );
    assert!(check.updated.is_some());
    let update = "/v1/agent/check/update/web-proxy-1-ttl";
    let warned = put_json(
        &http,
        &agent,
        update,
        json!({ "Status": "warning", "Output": "slow" }),
    )
    .await;
    assert_eq!(warned.status, 200);
    assert_eq!(agent.check("web-proxy-1-ttl").unwrap().status, "warning");
    let bogus = put_json(&http, &agent, update, json!({ "Status": "bogus" })).await;
    assert_eq!(
        (bogus.status, bogus.body.as_str()),
        (400, "Invalid check status: 'bogus'")
    );
    let unknown = send(http.put(format!("{}/v1/agent/check/fail/nope", agent.url()))).await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (
            404,
            "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name."
        )
    );

    // Deregistration.
    let missing = send(http.put(format!("{}/v1/agent/service/deregister/nope", agent.url()))).await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (404, "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name.")
    );
    let gone = send(http.put(format!(
        "{}/v1/agent/service/deregister/web-proxy-1",
        agent.url()
    )))
    .await;
    assert_eq!(gone.status, 200);
    let after = get(&http, &agent, "/v1/agent/service/web-proxy-1").await;
    assert_eq!(
        (after.status, after.body.as_str()),
        (404, "unknown service ID: web-proxy-1")
    );
    assert!(agent.check("web-proxy-1-ttl").is_none());
}

#[tokio::test]
async fn agent_service_blocks_on_hash_until_it_changes_or_is_deregistered() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    let proxy = |port: u16| {
        json!({
            "Kind": "connect-proxy", "ID": "p1", "Name": "web-proxy", "Port": port,
            "Proxy": { "DestinationServiceName": "web", "LocalServicePort": 8080 },
        })
    };
    agent.register(proxy(21000));

    let first = get(&http, &agent, "/v1/agent/service/p1").await;
    let hash = first.hash.clone().expect("X-Consul-ContentHash");
    assert_eq!(first.json()["ContentHash"], hash.as_str());

    let mut blocked = spawn_get(
        &http,
        &agent,
        &format!("/v1/agent/service/p1?hash={hash}&wait=10s"),
    );
    assert_blocked(&mut blocked, "service query at the current hash").await;
    agent.register(proxy(21001));
    let changed = within("blocked service query", &mut blocked).await.unwrap();
    let new_hash = changed.hash.clone().expect("hash");
    assert_ne!(new_hash, hash);
    assert_eq!(changed.json()["Port"], 21001);

    let started = Instant::now();
    let same = get(
        &http,
        &agent,
        &format!("/v1/agent/service/p1?hash={new_hash}&wait=300ms"),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(same.hash.as_deref(), Some(new_hash.as_str()));

    let mut blocked = spawn_get(
        &http,
        &agent,
        &format!("/v1/agent/service/p1?hash={new_hash}&wait=10s"),
    );
    assert_blocked(&mut blocked, "service query at the current hash").await;
    assert!(agent.deregister("p1"));
    let gone = within("blocked service query", &mut blocked).await.unwrap();
    assert_eq!(
        (gone.status, gone.body.as_str()),
        (404, "unknown service ID: p1")
    );
}

#[tokio::test]
async fn intention_match_lists_by_precedence_and_blocks_until_intentions_change() {
    let agent = FakeAgent::start(AgentOpts::default()).await;
    let http = http();
    let path = "/v1/connect/intentions/match?by=destination&name=db";

    let empty = get(&http, &agent, path).await;
    assert_eq!(empty.json(), json!({ "db": [] }));
    let index = empty.index();
    let mut blocked = spawn_get(&http, &agent, &format!("{path}&index={index}&wait=10s"));
    assert_blocked(&mut blocked, "intention match at the current index").await;
    agent.add_intention(Intention::deny("*", "db"));
    agent.add_intention(Intention::allow("web", "db"));
    let changed = within("blocked intention match", &mut blocked)
        .await
        .unwrap();
    assert!(changed.index() > index);

    let listed = get(&http, &agent, path).await.json();
    let db = listed["db"].as_array().unwrap();
    assert_eq!(db.len(), 2);
    assert_eq!(
        (&db[0]["SourceName"], &db[0]["Action"], &db[0]["Precedence"]),
        (&json!("web"), &json!("allow"), &json!(9))
    );
    assert_eq!(
        (&db[1]["SourceName"], &db[1]["Action"], &db[1]["Precedence"]),
        (&json!("*"), &json!("deny"), &json!(8))
    );

    let no_by = get(&http, &agent, "/v1/connect/intentions/match?name=db").await;
    assert_eq!(
        (no_by.status, no_by.body.as_str()),
        (400, "required query parameter 'by' not set")
    );
}

#[tokio::test]
async fn fault_knobs_fail_malform_rewind_and_stall() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();
    let roots = "/v1/agent/connect/ca/roots";

    agent.fail_next(roots, 2, 500, "No cluster leader");
    for _ in 0..2 {
        let failed = get(&http, &agent, roots).await;
        assert_eq!(
            (failed.status, failed.body.as_str()),
            (500, "No cluster leader")
        );
    }
    let fine = get(&http, &agent, roots).await;
    assert_eq!(fine.status, 200);
    let index = fine.index();

    agent.malformed_next(roots, 1);
    let garbled = get(&http, &agent, roots).await;
    assert_eq!(garbled.status, 200);
    assert!(
        serde_json::from_str::<Value>(&garbled.body).is_err(),
        "{garbled:?}"
    );

    agent.set_index_backwards(roots);
    let restored = get(&http, &agent, roots).await;
    assert!(restored.index() < index, "{} !< {index}", restored.index());
    assert_eq!(get(&http, &agent, roots).await.index(), index, "only once");

    agent.stall(roots, true);
    let mut held = spawn_get(&http, &agent, roots);
    agent.wait_for_calls("GET", roots, 7, DEADLINE).await;
    assert_blocked(&mut held, "stalled request").await;
    agent.stall(roots, false);
    let released = within("released request", &mut held).await.unwrap();
    assert_eq!(released.status, 200);

    assert_eq!(agent.count("GET", roots), 7);
    let last = agent
        .wait_for_call("GET", "/v1/agent/connect", DEADLINE)
        .await;
    assert_eq!(last.path, roots);
}

#[tokio::test]
async fn pause_cuts_the_agent_off_and_resume_brings_it_back_on_the_same_port() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let http = http();
    let url = format!("{}/v1/agent/connect/ca/roots", agent.url());
    let index = send(http.get(&url)).await.index();

    let blocked = tokio::spawn(try_send(http.get(format!("{url}?index={index}&wait=30s"))));
    let call = agent
        .wait_for_calls("GET", "/v1/agent/connect/ca/roots", 2, DEADLINE)
        .await;
    assert_eq!(call[1].param("index"), Some(index.to_string()));
    agent.pause().await;
    let cut = within("blocked query during pause", blocked).await.unwrap();
    assert!(
        cut.as_ref().map_or(true, |a| a.status == 500),
        "a blocked query ends with an error when the agent goes: {cut:?}"
    );
    let refused = within("request while paused", try_send(http.get(&url))).await;
    assert!(refused.is_err(), "the agent is down: {refused:?}");

    agent.resume().await;
    let back = send(http.get(&url)).await;
    assert_eq!(
        (back.status, back.index),
        (200, Some(index)),
        "same port, same state"
    );
}

#[test]
fn sha1_matches_the_fips_examples() {
    let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        hex(sha1(b"abc")),
        "a9993e364706816aba3e25717850c26c9cd0d89d"
    );
    assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    let two_blocks = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_eq!(
        hex(sha1(two_blocks)),
        "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
    );
}
