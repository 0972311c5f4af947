//! Envoy as the oracle for ferry's xDS mode. One ADS server in Consul's
//! manner (support/ads.rs) feeds a real Envoy 1.40 and ferry as two
//! sidecars of `web`: two instances of it, each its own proxy registration
//! and node id, so each has its own listeners (their ports differ) while
//! clusters, endpoints and secrets are common. Each test asserts that both
//! proxies decide the same, and what they decide: the sources allowed and
//! denied, the endpoints used in failover order, the SNI sent, the
//! refusals of a wrong server identity, the connection caps of an upstream
//! and of the public listener, the SDS leaf presented and its rotation,
//! the ejection of a failing instance. Every step waits until both nodes
//! answered everything the server sent them, and fails on any NACK, so a
//! resource Envoy silently refused cannot make a test pass. Where the two
//! differ on purpose (`tests/envoy/README.md`), a test asserts each one's
//! answer, and Envoy's admin stats show which of its mechanisms acted.

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::google::protobuf::Any;
use ferry::identity::dev_ca::Leaf;

use crate::support::ads::{self, Ads, ClusterOpts, Intentions, Tls, CDS, EDS, LDS, SDS};
use crate::support::{
    echo_once, mesh_conn, mesh_echo, plain_echo, refused, spare_addr, EchoServer, Pki,
    TlsEchoServer, DEADLINE, MSG,
};
use tokio::net::TcpStream;

/// The service IDs of the two instances of `web`; their sidecars' node ids
/// are `<id>-sidecar-proxy`. Index 0 is ferry, 1 is Envoy everywhere below.
const SIDES: [&str; 2] = ["web-ferry", "web-envoy"];

const DB_CLUSTER: &str = "db.default.dc1.internal.test";

/// Endpoints as `ads::cla` takes them: (priority, address, health).
type Hosts = Vec<(u32, SocketAddr, i32)>;

/// A real Envoy configured over ADS through a bootstrap in Consul's shape.
/// Its log goes to a file, printed if the test fails.
pub(crate) struct XdsEnvoy {
    child: Child,
    log: PathBuf,
    /// Where Envoy writes its admin address once it listens.
    admin_path: PathBuf,
}

impl XdsEnvoy {
    /// Runs Envoy from `bootstrap`, its log in `dir`.
    pub(crate) fn start(bootstrap: &Path, dir: &Path) -> XdsEnvoy {
        let log = dir.join("envoy.log");
        let admin_path = dir.join("envoy-admin-address");
        let child = Command::new(crate::support::envoy::binary())
            .arg("-c")
            .arg(bootstrap)
            .args(["-l", "info", "--log-path"])
            .arg(&log)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy");
        XdsEnvoy {
            child,
            log,
            admin_path,
        }
    }

    /// `GET <admin><path>`, the body.
    pub(crate) async fn admin(&self, path: &str) -> String {
        let admin = crate::support::within("Envoy's admin address", async {
            loop {
                match std::fs::read_to_string(&self.admin_path) {
                    Ok(a) if !a.trim().is_empty() => return a.trim().to_string(),
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await;
        let url = format!("http://{admin}{path}");
        crate::support::within("Envoy's admin API", async {
            crate::support::http()
                .get(&url)
                .send()
                .await
                .expect("GET")
                .text()
                .await
                .expect("body")
        })
        .await
    }

    /// One counter or gauge from the admin `/stats`; 0 while Envoy has not
    /// created it.
    pub(crate) async fn stat(&self, name: &str) -> u64 {
        self.admin("/stats")
            .await
            .lines()
            .filter_map(|l| l.rsplit_once(": "))
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for XdsEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            // Without the list of extensions and the deprecation notices.
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("server.cc:467") && !l.contains("Deprecated field"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("--- Envoy's log (last lines) ---\n{}", tail.join("\n"));
        }
    }
}

/// ferry and Envoy as two sidecars of `web` on one ADS server.
struct Oracle {
    pki: Pki,
    ads: Ads,
    web: Leaf,
    app: EchoServer,
    /// Each side's public listener.
    public: [SocketAddr; 2],
    dir: tempfile::TempDir,
}

/// Both proxies, running.
struct Proxies {
    ferry: ferry::Running,
    envoy: XdsEnvoy,
}

impl Oracle {
    /// The common `local_app` and each node's public listener with
    /// intentions `i`.
    async fn new(i: &Intentions) -> Oracle {
        let pki = Pki::new();
        let web = pki.leaf("web");
        let ads = Ads::start().await;
        let app = EchoServer::start().await;
        ads.set(CDS, "local_app", ads::local_app(app.addr));
        let o = Oracle {
            public: [spare_addr(), spare_addr()],
            dir: tempfile::tempdir().expect("tempdir"),
            pki,
            ads,
            web,
            app,
        };
        o.set_public(i);
        o
    }

    /// The local app's address.
    fn app_addr(&self) -> SocketAddr {
        self.app.addr
    }

    fn node(side: usize) -> String {
        ads::node_id(SIDES[side])
    }

    fn tls(&self) -> Tls {
        Tls::Inline {
            leaf: self.web.clone(),
            roots: self.pki.ca.cert_pem().to_string(),
        }
    }

    fn sni(&self, svc: &str, dc: &str) -> String {
        crate::support::envoy::sni(svc, dc, self.pki.trust_domain())
    }

    /// Each node's public listener, with intentions `i`.
    fn set_public(&self, i: &Intentions) {
        self.set_public_with(&self.tls(), i, None);
    }

    /// Each node's public listener with certificates `tls`, intentions `i`
    /// and, as Consul's `max_inbound_connections` adds it, a
    /// `connection_limit` filter of `limit` connections.
    fn set_public_with(&self, tls: &Tls, i: &Intentions, limit: Option<u64>) {
        for (side, addr) in self.public.iter().enumerate() {
            let (name, mut l) = ads::public_listener(*addr, tls, self.pki.trust_domain(), i);
            if let Some(max) = limit {
                l = ads::with_filter_before_tcp_proxy(&l, ads::connection_limit(max));
            }
            self.ads.set_for(&Oracle::node(side), LDS, &name, l);
        }
    }

    /// Upstream `id` → `cluster` on a free port of each node; the binds.
    async fn upstream(&self, id: &str, cluster: &str) -> [SocketAddr; 2] {
        let binds = [spare_addr(), spare_addr()];
        for (side, bind) in binds.iter().enumerate() {
            let (name, l) = ads::upstream_listener(id, *bind, cluster);
            self.ads.set_for(&Oracle::node(side), LDS, &name, l);
        }
        binds
    }

    /// A common upstream cluster in Consul's shape.
    fn cluster(&self, name: &str, sni: &str, sans: &[String]) -> Any {
        self.cluster_with(name, sni, sans, &ClusterOpts::default())
    }

    /// [`Oracle::cluster`] with limits or outlier detection.
    fn cluster_with(&self, name: &str, sni: &str, sans: &[String], opts: &ClusterOpts) -> Any {
        ads::eds_cluster(name, sni, sans, &self.tls(), opts)
    }

    /// `DB_CLUSTER` as an aggregate failing over from dc1 to dc2
    /// (`clusters/connect-proxy-with-chain-and-failover`): each leg with its
    /// datacenter's SNI and identity. The legs, and their SNIs.
    fn cross_dc_failover(&self) -> ([String; 2], [String; 2]) {
        let legs = ads::failover_legs(DB_CLUSTER);
        let snis = [self.sni("db", "dc1"), self.sni("db", "dc2")];
        self.ads
            .set(CDS, DB_CLUSTER, ads::aggregate_cluster(DB_CLUSTER, &legs));
        for ((leg, sni), dc) in legs.iter().zip(&snis).zip(["dc1", "dc2"]) {
            let san = self.pki.ca.spiffe_uri(dc, "db");
            self.ads.set(CDS, leg, self.cluster(leg, sni, &[san]));
        }
        (legs, snis)
    }

    /// Starts Envoy and ferry, each from its own bootstrap.
    async fn start(&self) -> Proxies {
        let boot = |side: usize| {
            let path = self.dir.path().join(format!("{}.json", SIDES[side]));
            let b = ads::bootstrap_for(self.ads.addr, "web", SIDES[side], "");
            std::fs::write(&path, b.to_string()).expect("write bootstrap");
            path
        };
        let envoy = XdsEnvoy::start(&boot(1), self.dir.path());
        let ferry = ads::start_ferry(&boot(0)).await;
        assert_eq!(ferry.inbound, Some(self.public[0]));
        self.in_sync().await;
        Proxies { ferry, envoy }
    }

    /// Both nodes hold exactly what the server serves them, nothing NACKed.
    async fn in_sync(&self) {
        for side in 0..2 {
            self.ads.in_sync(&Oracle::node(side)).await;
        }
    }
}

/// Probes until `probe` answers `want`; panics after DEADLINE with the
/// last answer.
async fn converge<T, F, Fut>(what: &str, want: &T, mut probe: F)
where
    T: PartialEq + Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = probe().await;
        if &got == want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: after {DEADLINE:?} still {got:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until each side answers `want` to `probe(side)`, Envoy first (the
/// oracle), then asks both once more: at the same moment they must decide
/// the same, and as expected.
async fn both<T, F, Fut>(step: &str, want: T, probe: F)
where
    T: PartialEq + Debug,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T>,
{
    converge(&format!("{step}: Envoy"), &want, || probe(1)).await;
    converge(&format!("{step}: ferry"), &want, || probe(0)).await;
    let (f, e) = (probe(0).await, probe(1).await);
    assert_eq!(f, e, "{step}: ferry and Envoy decide differently");
    assert_eq!(e, want, "{step}");
}

/// Where one connection to an upstream listener went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// Echoed by this server after a handshake that sent this SNI.
    Echoed {
        server: &'static str,
        sni: Option<String>,
    },
    /// Nothing echoed and no handshake completed; TCP reached these
    /// servers (none: no host was tried).
    Refused { reached: Vec<&'static str> },
    /// Anything else (a handshake without an echo, a hang, two servers).
    Odd(String),
}

fn echoed(server: &'static str, sni: &str) -> Route {
    Route::Echoed {
        server,
        sni: Some(sni.to_string()),
    }
}

fn refused_at(servers: &[&'static str]) -> Route {
    Route::Refused {
        reached: servers.to_vec(),
    }
}

/// Named upstream instances: mTLS echo servers that record each handshake.
struct Servers(Vec<(&'static str, TlsEchoServer)>);

impl Servers {
    async fn start(pki: &Pki, named: Vec<(&'static str, &Leaf)>) -> Servers {
        let mut v = Vec::new();
        for (name, leaf) in named {
            v.push((name, TlsEchoServer::start(pki, leaf).await));
        }
        Servers(v)
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .expect("server")
            .1
            .addr
    }

    fn counts(&self) -> Vec<(usize, usize)> {
        self.0
            .iter()
            .map(|(_, s)| (s.counts.accepted(), s.handshakes()))
            .collect()
    }

    /// One echo through the upstream listener `bind`. The test makes one
    /// connection at a time, so what changed on the servers is its doing.
    async fn route(&self, bind: SocketAddr) -> Route {
        let before = self.counts();
        let r = plain_echo(bind).await;
        let after = self.counts();
        let mut reached = Vec::new();
        let mut shook = Vec::new();
        for (i, (name, server)) in self.0.iter().enumerate() {
            if after[i].0 > before[i].0 {
                reached.push(*name);
            }
            if after[i].1 > before[i].1 {
                let sni = server.snis.lock().unwrap()[before[i].1].clone();
                shook.push((*name, sni));
            }
        }
        let echo = matches!(&r, Ok(got) if got == MSG);
        match (echo, shook.as_slice()) {
            (true, [(server, sni)]) => Route::Echoed {
                server,
                sni: sni.clone(),
            },
            (false, []) if refused(&r) => Route::Refused { reached },
            _ => Route::Odd(format!("{r:?}, handshakes {shook:?}, reached {reached:?}")),
        }
    }
}

impl Servers {
    /// The serial of the client leaf the server saw in one echo through
    /// the upstream listener `bind`, or why there was none.
    async fn client_serial(&self, bind: SocketAddr) -> Result<String, String> {
        let before: Vec<usize> = self.0.iter().map(|(_, s)| s.handshakes()).collect();
        let r = plain_echo(bind).await;
        if !matches!(&r, Ok(got) if got == MSG) {
            return Err(format!("no echo: {r:?}"));
        }
        for (i, (_, server)) in self.0.iter().enumerate() {
            if let Some(serial) = server.client_serials.lock().unwrap().get(before[i]) {
                return Ok(serial.clone());
            }
        }
        Err("echoed without a handshake".into())
    }
}

/// The serial of `leaf`'s certificate.
fn serial_of(leaf: &Leaf) -> String {
    ferry::identity::peer_identity(&crate::support::first_cert(&leaf.cert_pem))
        .expect("identity")
        .serial
}

/// The serial of the leaf the public listener at `addr` presents.
async fn served_serial(addr: SocketAddr, client: &Leaf) -> String {
    let c = mesh_conn(addr, client).await;
    let cert = c.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    ferry::identity::peer_identity(&cert)
        .expect("identity")
        .serial
}

/// Who a public listener lets through, per source leaf.
async fn decisions(addr: SocketAddr, sources: &[(&str, &Leaf)]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (name, leaf) in sources {
        out.push((name.to_string(), !refused(&mesh_echo(addr, *leaf).await)));
    }
    out
}

#[tokio::test]
async fn envoy_and_ferry_decide_the_same_for_the_same_rbac() {
    let o = Oracle::new(&Intentions::DefaultDeny(vec!["api".into()])).await;
    let _p = o.start().await;
    let api = o.pki.leaf("api");
    let evil = o.pki.leaf("evil");
    let other = o.pki.leaf("other");
    let sources = [("api", &api), ("evil", &evil), ("other", &other)];
    // (intentions, whether api, evil, other pass), by Consul's semantics.
    let cases = [
        (
            Intentions::DefaultDeny(vec!["api".into()]),
            [true, false, false],
        ),
        (
            Intentions::DefaultAllow(vec!["evil".into()]),
            [true, false, true],
        ),
        (Intentions::DefaultDeny(Vec::new()), [false, false, false]),
        (Intentions::DefaultAllow(Vec::new()), [true, true, true]),
    ];
    for (intentions, pass) in cases {
        o.set_public(&intentions);
        o.in_sync().await;
        let want: Vec<(String, bool)> = sources
            .iter()
            .zip(pass)
            .map(|((n, _), p)| (n.to_string(), p))
            .collect();
        let step = format!("intentions {pass:?}");
        both(&step, want, |side| decisions(o.public[side], &sources)).await;
    }
}

/// Priorities are kept fully healthy or fully unhealthy: with Envoy's
/// default overprovisioning factor (140%) a partly healthy priority 0
/// spills part of the load to priority 1 at random, and only Consul's
/// factor (100000, which `ads::cla` carries) makes Envoy's failover strict.
/// The one partly healthy step relies on that factor.
#[tokio::test]
async fn envoy_and_ferry_fail_over_across_priorities_in_the_same_order() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let s = Servers::start(&o.pki, vec![("dc1", &db), ("dc1-b", &db), ("dc2", &db)]).await;
    let sni = o.sni("db", "dc1");
    o.ads.set(
        CDS,
        DB_CLUSTER,
        o.cluster(DB_CLUSTER, &sni, &[o.pki.uri("db")]),
    );
    let (dc1, dc1b, dc2) = (s.addr("dc1"), s.addr("dc1-b"), s.addr("dc2"));
    let (up, down) = (ads::HEALTHY, ads::UNHEALTHY);
    o.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(DB_CLUSTER, &[(0, dc1, down), (1, dc2, up)]),
    );
    let binds = o.upstream("db", DB_CLUSTER).await;
    let p = o.start().await;
    assert_eq!(p.ferry.upstream("db"), Some(binds[0]));

    let steps: [(&str, Hosts, Route); 5] = [
        (
            "priority 0 unhealthy: priority 1 serves",
            vec![(0, dc1, down), (1, dc2, up)],
            echoed("dc2", &sni),
        ),
        (
            "priority 0 healthy again: back to it",
            vec![(0, dc1, up), (1, dc2, up)],
            echoed("dc1", &sni),
        ),
        (
            "no healthy host anywhere: refused, nothing tried",
            vec![(0, dc1, down), (1, dc2, down)],
            refused_at(&[]),
        ),
        (
            "priority 0 partly healthy (Consul's factor): its healthy host only",
            vec![(0, dc1, up), (0, dc1b, down), (1, dc2, up)],
            echoed("dc1", &sni),
        ),
        (
            "priority 0 down again: priority 1",
            vec![(0, dc1, down), (0, dc1b, down), (1, dc2, up)],
            echoed("dc2", &sni),
        ),
    ];
    for (step, hosts, want) in steps {
        o.ads.set(EDS, DB_CLUSTER, ads::cla(DB_CLUSTER, &hosts));
        o.in_sync().await;
        both(step, want, |side| s.route(binds[side])).await;
    }
}

#[tokio::test]
async fn envoy_and_ferry_fail_over_across_aggregate_legs_each_with_its_own_sni() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let (db, db_dc2) = (o.pki.leaf("db"), o.pki.leaf_in("db", "dc2"));
    // The second leg's endpoint stands in for dc2's mesh gateway, which
    // would route on the SNI; the handshake is end to end with db in dc2.
    let s = Servers::start(&o.pki, vec![("local", &db), ("remote", &db_dc2)]).await;
    let primary = DB_CLUSTER;
    let (legs, [sni1, sni2]) = o.cross_dc_failover();
    let (local, remote) = (s.addr("local"), s.addr("remote"));
    let (up, down) = (ads::HEALTHY, ads::UNHEALTHY);
    o.ads.set(EDS, &legs[0], ads::cla(&legs[0], &[]));
    o.ads
        .set(EDS, &legs[1], ads::cla(&legs[1], &[(0, remote, up)]));
    let binds = o.upstream("db", primary).await;
    let _p = o.start().await;

    let steps: [(&str, Hosts, Hosts, Route); 4] = [
        (
            "the first leg has no endpoints: the second leg, with its SNI",
            vec![],
            vec![(0, remote, up)],
            echoed("remote", &sni2),
        ),
        (
            "the first leg gets a healthy endpoint: back to it, with its SNI",
            vec![(0, local, up)],
            vec![(0, remote, up)],
            echoed("local", &sni1),
        ),
        (
            "the first leg's endpoint turns unhealthy: the second leg",
            vec![(0, local, down)],
            vec![(0, remote, up)],
            echoed("remote", &sni2),
        ),
        (
            "no leg has a healthy endpoint: refused, nothing tried",
            vec![(0, local, down)],
            vec![(0, remote, down)],
            refused_at(&[]),
        ),
    ];
    for (step, first, second, want) in steps {
        o.ads.set(EDS, &legs[0], ads::cla(&legs[0], &first));
        o.ads.set(EDS, &legs[1], ads::cla(&legs[1], &second));
        o.in_sync().await;
        both(step, want, |side| s.route(binds[side])).await;
    }
}

#[tokio::test]
async fn envoy_and_ferry_send_the_clusters_sni_and_follow_its_changes() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let geo_dc2 = o.pki.leaf_in("geo-db", "dc2");
    let s = Servers::start(&o.pki, vec![("db", &db), ("geo-db", &geo_dc2)]).await;
    let sni = o.sni("db", "dc1");
    o.ads.set(
        CDS,
        DB_CLUSTER,
        o.cluster(DB_CLUSTER, &sni, &[o.pki.uri("db")]),
    );
    o.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(DB_CLUSTER, &[(0, s.addr("db"), ads::HEALTHY)]),
    );
    // A prepared query's cluster (`clusters/connect-proxy-with-chain.latest.golden`'s
    // geo-cache): the SNI is the cluster's name, and a SAN per datacenter.
    let geo = format!("geo-db.default.dc1.query.{}", o.pki.trust_domain());
    let geo_sans = [
        o.pki.ca.spiffe_uri("dc1", "geo-db"),
        o.pki.ca.spiffe_uri("dc2", "geo-db"),
    ];
    o.ads.set(CDS, &geo, o.cluster(&geo, &geo, &geo_sans));
    o.ads.set(
        EDS,
        &geo,
        ads::cla(&geo, &[(0, s.addr("geo-db"), ads::HEALTHY)]),
    );
    let db_binds = o.upstream("db", DB_CLUSTER).await;
    let geo_binds = o.upstream("prepared_query:geo-db", &geo).await;
    let _p = o.start().await;

    both("the cluster's sni", echoed("db", &sni), |side| {
        s.route(db_binds[side])
    })
    .await;
    both("a prepared query's sni", echoed("geo-db", &geo), |side| {
        s.route(geo_binds[side])
    })
    .await;

    // A new sni on the cluster (what a resolver redirect does to the name):
    // new connections send it.
    let renamed = o.sni("db", "dc3");
    o.ads.set(
        CDS,
        DB_CLUSTER,
        o.cluster(DB_CLUSTER, &renamed, &[o.pki.uri("db")]),
    );
    o.in_sync().await;
    both("a changed sni", echoed("db", &renamed), |side| {
        s.route(db_binds[side])
    })
    .await;
}

#[tokio::test]
async fn envoy_and_ferry_refuse_the_same_wrong_server_identities() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let evil = o.pki.leaf("evil");
    let db_dc2 = o.pki.leaf_in("db", "dc2");
    // Another CA with the same trust domain: db's very SPIFFE ID, but a
    // chain that does not lead to the roots.
    let impostor = Pki::with_trust_domain(o.pki.trust_domain()).leaf("db");
    // Every server trusts our CA for client certificates; only what it
    // presents differs.
    let s = Servers::start(
        &o.pki,
        vec![
            ("db", &db),
            ("evil", &evil),
            ("db-in-dc2", &db_dc2),
            ("impostor", &impostor),
        ],
    )
    .await;
    let sni = o.sni("db", "dc1");
    let cluster = |san: &str| o.cluster(DB_CLUSTER, &sni, &[o.pki.uri(san)]);
    o.ads.set(CDS, DB_CLUSTER, cluster("db"));
    let only = |name: &str| ads::cla(DB_CLUSTER, &[(0, s.addr(name), ads::HEALTHY)]);
    o.ads.set(EDS, DB_CLUSTER, only("db"));
    let binds = o.upstream("db", DB_CLUSTER).await;
    let _p = o.start().await;

    // (the endpoint, the SAN the cluster expects, what happens)
    let steps = [
        ("db", "db", echoed("db", &sni)),
        ("evil", "db", refused_at(&["evil"])),
        ("impostor", "db", refused_at(&["impostor"])),
        ("db-in-dc2", "db", refused_at(&["db-in-dc2"])),
        ("db", "payments", refused_at(&["db"])),
        ("db", "db", echoed("db", &sni)),
    ];
    for (endpoint, san, want) in steps {
        o.ads.set(CDS, DB_CLUSTER, cluster(san));
        o.ads.set(EDS, DB_CLUSTER, only(endpoint));
        o.in_sync().await;
        let step = format!("server {endpoint}, cluster expects {san}");
        both(&step, want, |side| s.route(binds[side])).await;
    }
}

#[tokio::test]
async fn a_failover_leg_checks_its_own_identity_in_envoy_and_ferry() {
    // Leg 0 expects db in dc1, leg 1 db in dc2; a server presenting the
    // other leg's identity is refused, and a refusal does not fail over.
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let (db, db_dc2) = (o.pki.leaf("db"), o.pki.leaf_in("db", "dc2"));
    let s = Servers::start(&o.pki, vec![("db", &db), ("db-in-dc2", &db_dc2)]).await;
    let (legs, [_, sni2]) = o.cross_dc_failover();
    let (dc1, dc2) = (s.addr("db"), s.addr("db-in-dc2"));
    let up = ads::HEALTHY;
    o.ads
        .set(EDS, &legs[0], ads::cla(&legs[0], &[(0, dc2, up)]));
    o.ads
        .set(EDS, &legs[1], ads::cla(&legs[1], &[(0, dc1, up)]));
    let binds = o.upstream("db", DB_CLUSTER).await;
    let _p = o.start().await;
    both(
        "leg 0's endpoint presents dc2's identity",
        refused_at(&["db-in-dc2"]),
        |side| s.route(binds[side]),
    )
    .await;
    o.ads.set(EDS, &legs[0], ads::cla(&legs[0], &[]));
    o.in_sync().await;
    both(
        "leg 1's endpoint presents dc1's identity",
        refused_at(&["db"]),
        |side| s.route(binds[side]),
    )
    .await;
    o.ads
        .set(EDS, &legs[1], ads::cla(&legs[1], &[(0, dc2, up)]));
    o.in_sync().await;
    both(
        "leg 1's endpoint presents its own identity",
        echoed("db-in-dc2", &sni2),
        |side| s.route(binds[side]),
    )
    .await;
}

/// Where Envoy's defaults differ from ferry when a server leaves out what
/// Consul always sends (`tests/envoy/README.md`, differences 12 and 13):
/// ferry ignores `policy.overprovisioning_factor` and
/// `common_lb_config.healthy_panic_threshold` and always behaves as
/// Consul's values make Envoy behave.
#[tokio::test]
async fn without_consuls_lb_settings_envoy_spills_and_panics_where_ferry_stays_strict() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let s = Servers::start(&o.pki, vec![("p0", &db), ("p0-down", &db), ("p1", &db)]).await;
    let sni = o.sni("db", "dc1");
    let mut c: Cluster = prost::Message::decode(
        o.cluster(DB_CLUSTER, &sni, &[o.pki.uri("db")])
            .value
            .as_slice(),
    )
    .expect("decode");
    c.common_lb_config = None; // Envoy's default panic threshold, 50%
    o.ads.set(CDS, DB_CLUSTER, ads::any(&c));
    let (up, down) = (ads::HEALTHY, ads::UNHEALTHY);
    let hosts = [
        (0, s.addr("p0"), up),
        (0, s.addr("p0-down"), down),
        (1, s.addr("p1"), up),
    ];
    o.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla_default_overprovisioning(DB_CLUSTER, &hosts),
    );
    let binds = o.upstream("db", DB_CLUSTER).await;
    let _p = o.start().await;

    // Half of priority 0 healthy at 140%: Envoy sends about 30% of
    // connections to priority 1 (at random); ferry sends none.
    converge(
        "Envoy to spill a connection to priority 1",
        &true,
        || async { s.route(binds[1]).await == echoed("p1", &sni) },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(s.route(binds[0]).await, echoed("p0", &sni), "ferry");
    }

    // Every host unhealthy, panic threshold 50%: Envoy's panic mode uses
    // the unhealthy host; ferry refuses without trying.
    let hosts = [(0, s.addr("p0-down"), down)];
    o.ads.set(EDS, DB_CLUSTER, ads::cla(DB_CLUSTER, &hosts));
    o.in_sync().await;
    converge("Envoy in panic mode", &echoed("p0-down", &sni), || {
        s.route(binds[1])
    })
    .await;
    converge("ferry", &refused_at(&[]), || s.route(binds[0])).await;
}

/// Holds one connection through each of `binds` (an upstream listener or
/// a public one, by `open`), each proven by an echo.
async fn hold<C, F, Fut>(binds: &[SocketAddr; 2], open: F) -> Vec<C>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = C>,
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut held = Vec::new();
    for bind in binds {
        let mut c = open(*bind).await;
        echo_once(&mut c, b"held").await;
        held.push(c);
    }
    held
}

/// Consul's upstream `limits.max_connections` is the cluster's circuit
/// breaker; tcp_proxy checks it before connecting and closes the
/// downstream connection when it is reached.
#[tokio::test]
async fn envoy_and_ferry_cap_an_upstream_at_its_circuit_breaker() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let s = Servers::start(&o.pki, vec![("db", &db)]).await;
    let sni = o.sni("db", "dc1");
    let one = ClusterOpts {
        max_connections: Some(1),
        ..Default::default()
    };
    o.ads.set(
        CDS,
        DB_CLUSTER,
        o.cluster_with(DB_CLUSTER, &sni, &[o.pki.uri("db")], &one),
    );
    o.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(DB_CLUSTER, &[(0, s.addr("db"), ads::HEALTHY)]),
    );
    let binds = o.upstream("db", DB_CLUSTER).await;
    let p = o.start().await;

    both("one connection at a time", echoed("db", &sni), |side| {
        s.route(binds[side])
    })
    .await;
    let held = hold(&binds, |b| async move {
        TcpStream::connect(b).await.expect("connect")
    })
    .await;
    both(
        "a second while one is held: refused, nothing tried",
        refused_at(&[]),
        |side| s.route(binds[side]),
    )
    .await;
    let overflow = format!("cluster.{DB_CLUSTER}.upstream_cx_overflow");
    assert!(p.envoy.stat(&overflow).await > 0, "Envoy's breaker refused");
    drop(held);
    both(
        "the held one closed: a new one passes",
        echoed("db", &sni),
        |side| s.route(binds[side]),
    )
    .await;
}

/// Consul's `max_inbound_connections` in both its places: a circuit
/// breaker on `local_app` and a `connection_limit` filter on the public
/// listener. Each proxy caps the public listener at the smaller of the two
/// (here the filter's 1; the breaker's 2 is what ferry would take without
/// it). Where they count differs: Envoy counts a connection from its accept
/// (it dials the app at once, difference 1), ferry once its handshake is
/// done, so a silent TCP connection takes Envoy's only slot and not ferry's.
#[tokio::test]
async fn envoy_and_ferry_cap_the_public_listener_at_max_inbound_connections() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    o.ads
        .set(CDS, "local_app", ads::local_app_limited(o.app_addr(), 2));
    o.set_public_with(&o.tls(), &Intentions::DefaultAllow(Vec::new()), Some(1));
    let p = o.start().await;
    let api = o.pki.leaf("api");
    let pass = |side: usize| {
        let api = &api;
        let addr = o.public[side];
        async move { !refused(&mesh_echo(addr, api).await) }
    };
    both("one connection at a time", true, pass).await;
    let held = hold(&o.public, |a| mesh_conn(a, &api)).await;
    both("a second while one is held: refused", false, pass).await;
    let limited = "connection_limit.inbound_connection_limit.limited_connections";
    assert!(
        p.envoy.stat(limited).await > 0,
        "Envoy refused by the filter (1), not by the breaker (2)"
    );
    drop(held);
    both("the held one closed: a new one passes", true, pass).await;

    // A TCP connection that never starts its handshake.
    let silent = connect_both(&o.public).await;
    converge(
        "Envoy: the silent connection holds the slot",
        &false,
        || pass(1),
    )
    .await;
    converge("ferry: a silent connection holds no slot", &true, || {
        pass(0)
    })
    .await;
    drop(silent);
    both("the silent one closed", true, pass).await;
}

/// A plain TCP connection to each of `addrs`.
async fn connect_both(addrs: &[SocketAddr; 2]) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(TcpStream::connect(a).await.expect("connect"));
    }
    out
}

/// With failover Consul's `limits` sit on the legs (each target cluster),
/// none on the aggregate. tcp_proxy checks only the cluster it names, the
/// aggregate (Envoy's default cap, 1024); a leg's breaker is enforced by
/// the leg's connection pool, which queues a connection over it until one
/// closes (Envoy counts `upstream_cx_overflow` and a pending request) and
/// lets each host have one connection whatever the cap. ferry applies the
/// first leg's cap as it does any upstream's: it refuses at once.
#[tokio::test]
async fn over_a_failover_legs_limit_envoy_queues_the_connection_where_ferry_refuses_it() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let db = o.pki.leaf("db");
    let s = Servers::start(&o.pki, vec![("db", &db)]).await;
    let legs = ads::failover_legs(DB_CLUSTER);
    let sni = o.sni("db", "dc1");
    let one = ClusterOpts {
        max_connections: Some(1),
        ..Default::default()
    };
    o.ads
        .set(CDS, DB_CLUSTER, ads::aggregate_cluster(DB_CLUSTER, &legs));
    for leg in &legs {
        o.ads.set(
            CDS,
            leg,
            o.cluster_with(leg, &sni, &[o.pki.uri("db")], &one),
        );
    }
    o.ads.set(
        EDS,
        &legs[0],
        ads::cla(&legs[0], &[(0, s.addr("db"), ads::HEALTHY)]),
    );
    o.ads.set(EDS, &legs[1], ads::cla(&legs[1], &[]));
    let binds = o.upstream("db", DB_CLUSTER).await;
    let p = o.start().await;

    both("one connection at a time", echoed("db", &sni), |side| {
        s.route(binds[side])
    })
    .await;
    let mut held = hold(&binds, |b| async move {
        TcpStream::connect(b).await.expect("connect")
    })
    .await;
    converge("ferry: a second is refused", &refused_at(&[]), || {
        s.route(binds[0])
    })
    .await;
    let queued = tokio::spawn(plain_echo(binds[1]));
    let pending = format!("cluster.{}.upstream_rq_pending_active", legs[0]);
    converge("Envoy: a second waits in the leg's pool", &1, || {
        p.envoy.stat(&pending)
    })
    .await;
    assert!(!queued.is_finished(), "Envoy holds it, unanswered");
    drop(held.pop()); // Envoy's
    let got = crate::support::within("the queued connection", queued)
        .await
        .expect("join");
    assert_eq!(got.expect("echo"), MSG, "Envoy: served once a slot freed");
    let overflow = format!("cluster.{}.upstream_cx_overflow", legs[0]);
    assert!(p.envoy.stat(&overflow).await > 0);
}

/// The newest Consul's certificates: `connect-leaf` and `connect-root` by
/// SDS, here for the public listener and an upstream cluster (whose SAN
/// matchers then sit in a combined validation context). Both proxies
/// present the secret's leaf to mesh clients and to upstream servers; a
/// new `connect-leaf` reaches new handshakes on both sides while
/// connections opened before it keep flowing.
#[tokio::test]
async fn envoy_and_ferry_present_the_sds_leaf_and_rotate_it_without_dropping_connections() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    o.set_public_with(&Tls::Sds, &Intentions::DefaultAllow(Vec::new()), None);
    o.ads
        .set(SDS, "connect-root", ads::root_secret(o.pki.ca.cert_pem()));
    o.ads.set(SDS, "connect-leaf", ads::leaf_secret(&o.web));
    let db = o.pki.leaf("db");
    let s = Servers::start(&o.pki, vec![("db", &db)]).await;
    let sni = o.sni("db", "dc1");
    o.ads.set(
        CDS,
        DB_CLUSTER,
        ads::eds_cluster(
            DB_CLUSTER,
            &sni,
            &[o.pki.uri("db")],
            &Tls::Sds,
            &ClusterOpts::default(),
        ),
    );
    o.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(DB_CLUSTER, &[(0, s.addr("db"), ads::HEALTHY)]),
    );
    let binds = o.upstream("db", DB_CLUSTER).await;
    let _p = o.start().await;
    let api = o.pki.leaf("api");
    let first = serial_of(&o.web);
    both(
        "the public listener serves connect-leaf",
        first.clone(),
        |side| served_serial(o.public[side], &api),
    )
    .await;
    both(
        "upstream handshakes present connect-leaf",
        Ok(first.clone()),
        |side| s.client_serial(binds[side]),
    )
    .await;

    let mut inbound = hold(&o.public, |a| mesh_conn(a, &api)).await;
    let mut upstream = hold(&binds, |b| async move {
        TcpStream::connect(b).await.expect("connect")
    })
    .await;
    let rotated = o.pki.leaf("web");
    o.ads.set(SDS, "connect-leaf", ads::leaf_secret(&rotated));
    o.in_sync().await;
    let second = serial_of(&rotated);
    assert_ne!(first, second);
    both(
        "new mesh clients get the rotated leaf",
        second.clone(),
        |side| served_serial(o.public[side], &api),
    )
    .await;
    both(
        "new upstream handshakes present the rotated leaf",
        Ok(second),
        |side| s.client_serial(binds[side]),
    )
    .await;
    for (side, c) in inbound.iter_mut().enumerate() {
        echo_once(c, format!("inbound {side}, across the rotation").as_bytes()).await;
    }
    for (side, c) in upstream.iter_mut().enumerate() {
        echo_once(
            c,
            format!("upstream {side}, across the rotation").as_bytes(),
        )
        .await;
    }
}

/// A shape Consul does not send: an upstream cluster whose roots come by
/// SDS with no SAN matcher. Envoy takes it and then accepts any server the
/// roots sign; ferry refuses it (it always checks the server's identity)
/// and keeps the cluster it had.
#[tokio::test]
async fn an_upstream_cluster_without_a_san_matcher_is_taken_by_envoy_and_refused_by_ferry() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    o.ads
        .set(SDS, "connect-root", ads::root_secret(o.pki.ca.cert_pem()));
    o.ads.set(SDS, "connect-leaf", ads::leaf_secret(&o.web));
    let (db, evil) = (o.pki.leaf("db"), o.pki.leaf("evil"));
    let s = Servers::start(&o.pki, vec![("db", &db), ("evil", &evil)]).await;
    let sni = o.sni("db", "dc1");
    let sds = |sans: &[String]| {
        ads::eds_cluster(DB_CLUSTER, &sni, sans, &Tls::Sds, &ClusterOpts::default())
    };
    o.ads.set(CDS, DB_CLUSTER, sds(&[o.pki.uri("db")]));
    let only = |name: &str| ads::cla(DB_CLUSTER, &[(0, s.addr(name), ads::HEALTHY)]);
    o.ads.set(EDS, DB_CLUSTER, only("db"));
    let binds = o.upstream("db", DB_CLUSTER).await;
    let _p = o.start().await;
    both("db, as the cluster expects", echoed("db", &sni), |side| {
        s.route(binds[side])
    })
    .await;

    o.ads.set(CDS, DB_CLUSTER, sds(&[]));
    o.ads.set(EDS, DB_CLUSTER, only("evil"));
    let ferry = Oracle::node(0);
    let nack = o
        .ads
        .reply("ferry to refuse the cluster", |r| {
            r.node == ferry && r.type_url == CDS && r.error.is_some()
        })
        .await;
    let why = nack.error.unwrap_or_default();
    assert!(why.contains("without a SAN matcher"), "{why}");
    o.ads.in_sync(&Oracle::node(1)).await;
    converge(
        "Envoy: any server the roots sign",
        &echoed("evil", &sni),
        || s.route(binds[1]),
    )
    .await;
    converge(
        "ferry: the last good cluster, expecting db",
        &refused_at(&["evil"]),
        || s.route(binds[0]),
    )
    .await;
}

/// Accepts TCP connections and resets them at once: an instance whose
/// port is open but that fails every handshake. Counts what it accepted.
struct Resetter {
    addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Resetter {
    async fn start() -> Resetter {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                crate::support::reset_on_close(&c);
                drop(c);
            }
        });
        Resetter {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What connections through one upstream listener did with a failing
/// instance beside a healthy one, in two runs: until the failing one had
/// been tried `consecutive_5xx` times, then (once the proxy says what it
/// made of that) four more.
#[derive(Debug, PartialEq, Eq)]
struct Ejection {
    /// Connections of the first run that got no echo.
    failed: usize,
    /// Of the four after: the ones that tried the failing instance, and
    /// the ones that got no echo.
    after: (usize, usize),
}

/// The first run: connections through `bind` until `tries` (attempts on
/// the failing instance so far) has grown by `n`; how many failed. Bounded
/// at `4 n` connections.
async fn until_tried<F, Fut>(s: &Servers, bind: SocketAddr, n: usize, tries: &F) -> usize
where
    F: Fn() -> Fut,
    Fut: Future<Output = usize>,
{
    let start = tries().await;
    let mut failed = 0;
    for _ in 0..4 * n {
        if tries().await >= start + n {
            break;
        }
        let served = matches!(s.route(bind).await, Route::Echoed { server: "good", .. });
        failed += usize::from(!served);
    }
    failed
}

/// The run after: four connections through `bind`.
async fn four_more<F, Fut>(s: &Servers, bind: SocketAddr, tries: &F) -> (usize, usize)
where
    F: Fn() -> Fut,
    Fut: Future<Output = usize>,
{
    let (mut tried, mut failed) = (0, 0);
    for _ in 0..4 {
        let before = tries().await;
        let served = matches!(s.route(bind).await, Route::Echoed { server: "good", .. });
        tried += usize::from(tries().await > before);
        failed += usize::from(!served);
    }
    (tried, failed)
}

/// Whether Envoy has ejected host `addr` of `cluster` (`/clusters`).
async fn envoy_ejected(envoy: &XdsEnvoy, cluster: &str, addr: SocketAddr) -> bool {
    envoy_host(envoy, cluster, addr, "health_flags")
        .await
        .contains("failed_outlier_check")
}

/// One of Envoy's per-host values in `/clusters`: `<cluster>::<addr>::<what>::<value>`.
async fn envoy_host(envoy: &XdsEnvoy, cluster: &str, addr: SocketAddr, what: &str) -> String {
    let key = format!("{cluster}::{addr}::{what}::");
    envoy
        .admin("/clusters")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&key).map(str::to_string))
        .unwrap_or_default()
}

/// ferry's state of instance `addr` of upstream `id`: its consecutive
/// failures and whether it is ejected.
fn ferry_instance(ferry: &ferry::Running, id: &str, addr: SocketAddr) -> (usize, bool) {
    ferry
        .instances(id)
        .unwrap_or_default()
        .iter()
        .find(|i| i.addr == addr)
        .map_or((0, false), |i| (i.consecutive_failures as usize, i.ejected))
}

/// Consul's `passive_health_check` is the cluster's outlier detection;
/// for tcp_proxy a failed connection (refused, reset, or a handshake that
/// fails, the server's identity included) counts towards
/// `consecutive_5xx`. Both proxies stop trying a failing instance after
/// exactly `consecutive_5xx` failures and send everything to the healthy
/// one. How a failure reaches the client differs: Envoy's tcp_proxy makes
/// one connect attempt (`max_connect_attempts`, which Consul leaves at 1),
/// so each failure closes a client connection; ferry tries the next
/// instance within the same connection, so no client sees one. And at
/// Envoy's default `max_ejection_percent` (10%, Consul's unless
/// `passive_health_check.max_ejection_percent` is set) Envoy ejects nothing
/// from fewer than ten hosts and keeps failing every other connection,
/// where ferry ejects whatever the share. Envoy ejects on another thread
/// than the one that counted: each first run ends on the failure that
/// reaches the count, and the second starts once Envoy shows what it did.
#[tokio::test]
async fn envoy_and_ferry_eject_a_failing_instance_after_consecutive_5xx_failures() {
    let o = Oracle::new(&Intentions::DefaultAllow(Vec::new())).await;
    let (db, evil) = (o.pki.leaf("db"), o.pki.leaf("evil"));
    let s = Servers::start(&o.pki, vec![("good", &db), ("impostor", &evil)]).await;
    let reset = Resetter::start().await;
    let dead = spare_addr();
    let impostor = s.addr("impostor");
    let sni = o.sni("db", "dc1");
    let n = 3;
    let outlier = |max_ejection_percent| ClusterOpts {
        outlier: Some((n as u32, Duration::from_secs(60))),
        max_ejection_percent,
        ..Default::default()
    };
    // (cluster, the failing instance, outlier detection)
    let clusters = [
        ("db-reset", reset.addr, outlier(Some(100))),
        ("db-dead", dead, outlier(Some(100))),
        ("db-impostor", impostor, outlier(Some(100))),
        ("db-default-share", reset.addr, outlier(None)),
    ];
    let mut binds = Vec::new();
    for (name, failing, opts) in &clusters {
        let hosts = [
            (0, *failing, ads::HEALTHY),
            (0, s.addr("good"), ads::HEALTHY),
        ];
        o.ads.set(
            CDS,
            name,
            o.cluster_with(name, &sni, &[o.pki.uri("db")], opts),
        );
        o.ads.set(EDS, name, ads::cla(name, &hosts));
        binds.push(o.upstream(name, name).await);
    }
    let p = o.start().await;
    let impostor_server =
        &s.0.iter()
            .find(|(n, _)| *n == "impostor")
            .expect("impostor")
            .1;

    for (i, (name, failing, _)) in clusters.iter().enumerate() {
        // Attempts on the failing instance: what it accepted where it
        // listens, else what each proxy counted.
        let accepted = || async {
            match *name {
                "db-impostor" => impostor_server.counts.accepted(),
                _ => reset.accepted(),
            }
        };
        let envoy_tries = || async {
            match *name {
                "db-dead" => envoy_host(&p.envoy, name, dead, "cx_connect_fail")
                    .await
                    .parse()
                    .unwrap_or(0),
                _ => accepted().await,
            }
        };
        let ferry_tries = || async {
            match *name {
                "db-dead" => ferry_instance(&p.ferry, name, dead).0,
                _ => accepted().await,
            }
        };
        let share = *name != "db-default-share";

        let failed = until_tried(&s, binds[i][1], n, &envoy_tries).await;
        if share {
            converge(&format!("{name}: Envoy ejects"), &true, || {
                envoy_ejected(&p.envoy, name, *failing)
            })
            .await;
        } else {
            let overflow = format!("cluster.{name}.outlier_detection.ejections_overflow");
            converge(&format!("{name}: Envoy over the share"), &true, || async {
                p.envoy.stat(&overflow).await > 0
            })
            .await;
        }
        let envoy = Ejection {
            failed,
            after: four_more(&s, binds[i][1], &envoy_tries).await,
        };
        let failed = until_tried(&s, binds[i][0], n, &ferry_tries).await;
        converge(&format!("{name}: ferry ejects"), &true, || async {
            ferry_instance(&p.ferry, name, *failing).1
        })
        .await;
        let ferry = Ejection {
            failed,
            after: four_more(&s, binds[i][0], &ferry_tries).await,
        };

        let ejected = |failed| Ejection {
            failed,
            after: (0, 0),
        };
        if share {
            assert_eq!(envoy, ejected(n), "{name}: Envoy, a client's failure each");
        } else {
            let round_robin = Ejection {
                failed: n,
                after: (2, 2),
            };
            assert_eq!(envoy, round_robin, "{name}: Envoy, not ejected");
            assert!(!envoy_ejected(&p.envoy, name, *failing).await);
        }
        assert_eq!(
            ferry,
            ejected(0),
            "{name}: ferry, retried within the connection"
        );
    }
}
