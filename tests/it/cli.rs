//! The real `ferry` binary and its command line: every bad flag or bad
//! certificate file is refused with exit code 64 (EX_USAGE) and one message
//! on stderr that names the flag or file, before any listener is bound;
//! `--help` works; `ferry certs` writes a usable dev PKI.
//!
//! Each run is bounded: a ferry that does not exit within DEADLINE (for
//! example because it accepted flags it should have refused and started
//! serving) is killed through its own process handle and the test fails.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::support::*;

/// BSD EX_USAGE, what ferry returns for bad flags and files.
const EX_USAGE: i32 = 64;

/// How one run of the binary ended.
#[derive(Debug)]
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// What is wrong with this run as the refusal of a usage error: it must
    /// exit with EX_USAGE, print nothing on stdout, and mention every string
    /// in `expect` on stderr. Empty when all is well.
    fn usage_error_problems(&self, case: &str, expect: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        if self.code != Some(EX_USAGE) {
            problems.push(format!(
                "{case}: exit code {:?}, expected {EX_USAGE}, for {:?}; stderr: {}",
                self.code,
                self.args,
                self.stderr.trim_end()
            ));
        }
        if !self.stdout.is_empty() {
            problems.push(format!(
                "{case}: errors go to stderr, stdout was: {}",
                self.stdout
            ));
        }
        for e in expect {
            if !self.stderr.contains(e) {
                problems.push(format!(
                    "{case}: stderr should mention {e:?}; it was: {}",
                    self.stderr.trim_end()
                ));
            }
        }
        // No PEM block (a key, say) may end up in an error message.
        if self.stderr.contains("-----BEGIN") {
            problems.push(format!("{case}: stderr shows PEM content"));
        }
        problems
    }

    /// Panics with every problem [`Run::usage_error_problems`] finds.
    fn assert_usage_error(&self, case: &str, expect: &[&str]) {
        let problems = self.usage_error_problems(case, expect);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

/// Kills the child (through its own handle) if the test leaves early.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs the ferry binary with `args` and waits, at most DEADLINE, for it to
/// exit. Both pipes are drained on threads; their end of file (the process
/// has exited) is what the wait is for, so nothing here sleeps.
fn ferry<S: AsRef<str>>(args: &[S]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the ferry binary");
    let (tx, rx) = mpsc::channel();
    let mut pipes: Vec<(usize, Box<dyn Read + Send>)> = vec![
        (0, Box::new(child.stdout.take().expect("stdout"))),
        (1, Box::new(child.stderr.take().expect("stderr"))),
    ];
    for (which, mut pipe) in pipes.drain(..) {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((which, String::from_utf8_lossy(&buf).into_owned()));
        });
    }
    drop(tx);
    let mut child = Reap(child);
    let deadline = Instant::now() + DEADLINE;
    let mut out = [None, None];
    while out.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((which, text)) => out[which] = Some(text),
            Err(_) => {
                drop(child); // kills it
                panic!(
                    "ferry {args:?} was still running after {DEADLINE:?}: it accepted \
                     flags it should have refused (or hung)"
                );
            }
        }
    }
    let status = child.0.wait().expect("wait for ferry");
    let [stdout, stderr] = out.map(Option::unwrap_or_default);
    Run {
        args,
        code: status.code(),
        stdout,
        stderr,
    }
}

/// A fresh directory for `-certs` holding `files`, as (name, contents).
fn cert_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write cert file");
    }
    dir
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Table: each bad flag, flag combination or value is refused with exit 64
/// and a message naming the flag (and the bad value). None of these needs a
/// certificate file to be wrong: the flags alone are the problem.
#[test]
fn bad_flags_exit_64_and_name_the_flag() {
    let pki = Pki::new();
    pki.leaf("web");
    let dir = pki.dir_arg();
    // A valid proxy, inbound only; each case adds or removes one thing.
    let base = |extra: &[&str]| -> Vec<String> {
        StandaloneArgs::new("web", &dir)
            .listen("127.0.0.1:9")
            .extra(extra)
            .to_vec()
    };
    let owned = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "unknown flag",
            base(&["-bogus"]),
            vec!["unexpected argument", "bogus"],
        ),
        (
            "upstream without a port",
            base(&["-upstream", "db"]),
            vec!["upstream", "\"db\"", "NAME[.TYPE]:[ADDR:]PORT"],
        ),
        (
            "upstream port out of range",
            base(&["-upstream", "db:99999"]),
            vec!["upstream", "invalid port \"99999\""],
        ),
        (
            "upstream of an unknown type",
            base(&["-upstream", "db.mesh:9191"]),
            vec!["upstream", "unknown upstream type \"mesh\""],
        ),
        (
            "upstream-addr without a port",
            base(&["-upstream", "db:0", "-upstream-addr", "db=nohost"]),
            vec!["upstream-addr", "\"nohost\" is not HOST:PORT"],
        ),
        (
            "upstream-addr for an undeclared upstream",
            base(&[
                "-upstream",
                "db:0",
                "-upstream-addr",
                "db=127.0.0.1:1",
                "-upstream-addr",
                "cache=127.0.0.1:2",
            ]),
            vec!["-upstream-addr cache", "there is no -upstream cache"],
        ),
        (
            "upstream without instances",
            base(&["-upstream", "db:0"]),
            vec!["-upstream db: no instances", "-upstream-addr db="],
        ),
        (
            "prepared query in standalone mode",
            base(&["-upstream", "db.query:0"]),
            vec!["-upstream db.query", "prepared queries"],
        ),
        (
            "two upstreams on one port",
            base(&[
                "-upstream",
                "db:127.0.0.1:7001",
                "-upstream-addr",
                "db=127.0.0.1:1",
                "-upstream",
                "cache:127.0.0.1:7001",
                "-upstream-addr",
                "cache=127.0.0.1:1",
            ]),
            vec!["-upstream", "both bind 127.0.0.1:7001"],
        ),
        (
            "listen without service-addr",
            owned(&["-service", "web", "-listen", "127.0.0.1:0", "-certs", &dir]),
            vec!["-listen requires -service-addr"],
        ),
        (
            "service-addr without listen",
            owned(&[
                "-service",
                "web",
                "-service-addr",
                "127.0.0.1:9",
                "-certs",
                &dir,
            ]),
            vec!["-service-addr is set but -listen is not"],
        ),
        (
            "listen address that is not HOST:PORT",
            owned(&[
                "-service",
                "web",
                "-listen",
                "nope",
                "-service-addr",
                "127.0.0.1:9",
                "-certs",
                &dir,
            ]),
            vec!["-listen \"nope\""],
        ),
        (
            "service-addr that is not HOST:PORT",
            owned(&[
                "-service",
                "web",
                "-listen",
                "127.0.0.1:0",
                "-service-addr",
                "nope",
                "-certs",
                &dir,
            ]),
            vec!["-service-addr \"nope\"", "HOST:PORT"],
        ),
        (
            "missing -service",
            owned(&[
                "-listen",
                "127.0.0.1:0",
                "-service-addr",
                "127.0.0.1:9",
                "-certs",
                &dir,
            ]),
            vec!["-service is required"],
        ),
        (
            "-proxy-id with -certs",
            owned(&["-proxy-id", "web-sidecar-proxy", "-certs", &dir]),
            vec!["-proxy-id/-sidecar-for", "-certs"],
        ),
        (
            "unknown agent address scheme",
            owned(&[
                "-service",
                "web",
                "-listen",
                "127.0.0.1:0",
                "-service-addr",
                "127.0.0.1:9",
                "-http-addr",
                "ftp://127.0.0.1:8500",
            ]),
            vec!["ftp"],
        ),
        (
            "nothing to do",
            owned(&["-service", "web", "-certs", &dir]),
            vec!["nothing to do", "-listen", "-upstream"],
        ),
        (
            "handshake-timeout that is not a duration",
            base(&["-handshake-timeout", "banana"]),
            vec!["handshake-timeout", "\"banana\" is not a duration"],
        ),
        (
            "zero handshake-timeout",
            base(&["-handshake-timeout", "0"]),
            vec!["-handshake-timeout: must be greater than 0"],
        ),
        (
            "zero upstream-attempts",
            base(&["-upstream-attempts", "0"]),
            vec!["-upstream-attempts: must be at least 1"],
        ),
        (
            "default-deny that is not a boolean",
            base(&["-default-deny=maybe"]),
            vec!["default-deny", "\"maybe\" is not a boolean"],
        ),
        (
            "allow and deny the same source",
            base(&["-allow", "web", "-deny", "web"]),
            vec!["\"web\"", "-allow", "-deny"],
        ),
        (
            "allow a malformed source",
            base(&["-allow", "bad name!"]),
            vec!["\"bad name!\"", "-allow/-deny"],
        ),
        (
            "log-level that is not a level",
            base(&["-log-level", "loud"]),
            vec!["-log-level \"loud\"", "trace, debug, info, warn or error"],
        ),
    ];
    let mut problems = Vec::new();
    for (case, args, expect) in &cases {
        problems.extend(ferry(args).usage_error_problems(case, expect));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Table: each bad `-certs` directory is refused with exit 64 and a message
/// naming `-certs` and the file at fault (or, for a leaf that is fine as a
/// file but wrong for this proxy, which service it is for).
#[test]
fn bad_certificate_files_exit_64_and_name_the_file() {
    let pki = Pki::new();
    let web = pki.leaf("web");
    let api = pki.leaf("api");
    let other_ca = Pki::new();
    let foreign_web = other_ca.leaf("web");
    let ca = pki.ca.cert_pem().to_string();
    let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";

    struct Case<'a> {
        name: &'a str,
        files: Vec<(&'a str, &'a str)>,
        /// Strings stderr must contain; `{dir}` is replaced by the directory.
        expect: Vec<&'a str>,
    }
    let cases = vec![
        Case {
            name: "empty directory",
            files: vec![],
            expect: vec!["-certs {dir}", "cannot read {dir}/ca.pem"],
        },
        Case {
            name: "leaf missing",
            files: vec![("ca.pem", &ca)],
            expect: vec!["cannot read {dir}/web.pem"],
        },
        Case {
            name: "key missing",
            files: vec![("ca.pem", &ca), ("web.pem", &web.cert_pem)],
            expect: vec!["cannot read {dir}/web-key.pem"],
        },
        Case {
            name: "ca.pem is not PEM",
            files: vec![
                ("ca.pem", "this is not a certificate\n"),
                ("web.pem", &web.cert_pem),
                ("web-key.pem", &web.key_pem),
            ],
            expect: vec!["{dir}/ca.pem", "no PEM CERTIFICATE block"],
        },
        Case {
            name: "ca.pem holds a block that is not a certificate",
            files: vec![
                ("ca.pem", not_der),
                ("web.pem", &web.cert_pem),
                ("web-key.pem", &web.key_pem),
            ],
            expect: vec!["{dir}/ca.pem", "root certificate #0 is not usable"],
        },
        Case {
            name: "web.pem is not PEM",
            files: vec![
                ("ca.pem", &ca),
                ("web.pem", "garbage\n"),
                ("web-key.pem", &web.key_pem),
            ],
            expect: vec!["{dir}/web.pem", "no PEM CERTIFICATE block"],
        },
        Case {
            name: "web-key.pem is not a key",
            files: vec![
                ("ca.pem", &ca),
                ("web.pem", &web.cert_pem),
                ("web-key.pem", "garbage\n"),
            ],
            expect: vec!["{dir}/web-key.pem", "no PEM private key"],
        },
        Case {
            name: "leaf for another service",
            files: vec![
                ("ca.pem", &ca),
                ("web.pem", &api.cert_pem),
                ("web-key.pem", &api.key_pem),
            ],
            expect: vec![
                "-certs {dir}",
                "{dir}/web.pem: leaf certificate is for service \"api\"",
                "this proxy is \"web\"",
            ],
        },
        Case {
            name: "key of another leaf",
            files: vec![
                ("ca.pem", &ca),
                ("web.pem", &web.cert_pem),
                ("web-key.pem", &api.key_pem),
            ],
            expect: vec![
                "-certs {dir}",
                "{dir}/web-key.pem is not the private key of the leaf in {dir}/web.pem",
            ],
        },
        Case {
            name: "leaf from another CA",
            files: vec![
                ("ca.pem", &ca),
                ("web.pem", &foreign_web.cert_pem),
                ("web-key.pem", &foreign_web.key_pem),
            ],
            expect: vec!["-certs {dir}", "does not chain to the trusted roots"],
        },
    ];
    let mut problems = Vec::new();
    for c in &cases {
        let dir = cert_dir(&c.files);
        let d = path_str(dir.path());
        let run = ferry(&StandaloneArgs::new("web", &d).listen("127.0.0.1:9").args());
        let expect: Vec<String> = c.expect.iter().map(|e| e.replace("{dir}", &d)).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        problems.extend(run.usage_error_problems(c.name, &expect));
        for key in [&web.key_pem, &api.key_pem, &foreign_web.key_pem] {
            if key
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .any(|line| run.stderr.contains(line))
            {
                problems.push(format!("{}: stderr shows private key material", c.name));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Validation comes before binding: with the `-listen` (or `-upstream`)
/// port already held by the test, a configuration error still exits 64
/// with the configuration message — had ferry tried to bind first it would
/// have failed on the held port instead. The control case (same flags,
/// valid certificates) shows that ferry does fail on that held port, with
/// exit 1 and a message naming the listener, so the check is real.
#[test]
fn config_errors_are_reported_before_anything_binds() {
    let pki = Pki::new();
    pki.leaf("web");
    let good = pki.dir_arg();
    let api = pki.leaf("api");
    let wrong = cert_dir(&[
        ("ca.pem", pki.ca.cert_pem()),
        ("web.pem", &api.cert_pem),
        ("web-key.pem", &api.key_pem),
    ]);
    let wrong_dir = path_str(wrong.path());

    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");

    let inbound = |certs: &str, extra: &[&str]| -> Vec<String> {
        StandaloneArgs::new("web", certs)
            .listen_on(&listen, "127.0.0.1:9")
            .extra(extra)
            .to_vec()
    };

    // Control: valid flags on the held port fail at bind time, exit 1.
    let control = ferry(&inbound(&good, &[]));
    assert_eq!(
        control.code,
        Some(1),
        "control: ferry should fail to bind the held port\nstderr: {}",
        control.stderr
    );
    assert!(
        control
            .stderr
            .contains(&format!("-listen: cannot listen on {listen}")),
        "control: bind error names the listener: {}",
        control.stderr
    );

    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "leaf for another service, listen port held",
            inbound(&wrong_dir, &[]),
            vec!["leaf certificate is for service \"api\"".into()],
        ),
        (
            "bad -upstream, listen port held",
            inbound(&good, &["-upstream", "db"]),
            vec!["upstream".into(), "\"db\"".into()],
        ),
        (
            "intention conflict, listen port held",
            inbound(&good, &["-allow", "api", "-deny", "api"]),
            vec!["-allow".into(), "-deny".into()],
        ),
        (
            "leaf for another service, upstream port held",
            StandaloneArgs::new("web", &wrong_dir)
                .upstream_on("db", &listen, &["127.0.0.1:1"])
                .to_vec(),
            vec!["leaf certificate is for service \"api\"".into()],
        ),
    ];
    for (case, args, expect) in &cases {
        let run = ferry(args);
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        run.assert_usage_error(case, &expect);
        assert!(
            !run.stderr.contains("cannot listen"),
            "{case}: ferry tried to bind before validating: {}",
            run.stderr
        );
    }
    drop(held);
}

/// `--help`, `-help` (Go style) and `-h` print usage on stdout, list the
/// proxy's flags, and exit 0.
#[test]
fn help_exits_0_and_lists_the_flags() {
    for flag in ["--help", "-help", "-h"] {
        let run = ferry(&[flag]);
        assert_eq!(
            run.code,
            Some(0),
            "{flag}: exit code\nstderr: {}",
            run.stderr
        );
        for f in ["-service ", "-listen ", "-upstream ", "-certs ", "certs"] {
            assert!(
                run.stdout.contains(f),
                "{flag}: help should list {f:?}:\n{}",
                run.stdout
            );
        }
    }
}

/// The trust domain from `ferry certs`' first line,
/// `created CA <dir>/ca.pem (trust domain <td>)` (or `reusing CA ...`).
fn printed_trust_domain(stdout: &str) -> String {
    let first = stdout.lines().next().unwrap_or_default();
    first
        .split_once("(trust domain ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no trust domain in {first:?}"))
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `ferry certs -dir D web` creates a CA and a leaf: ca.pem, web.pem and
/// web-key.pem exist, private keys are 0600, stdout names the SPIFFE ID,
/// and the files pass the same validation the proxy applies to `-certs`.
/// A second run for another service reuses the CA (same trust domain, same
/// ca.pem) and its leaf validates against it too.
#[test]
fn certs_writes_a_usable_dev_pki_and_reuses_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = path_str(&dir);

    let first = ferry(&["certs", "-dir", &d, "web"]);
    assert_eq!(first.code, Some(0), "stderr: {}", first.stderr);
    assert!(first.stdout.starts_with("created CA "), "{}", first.stdout);
    let td = printed_trust_domain(&first.stdout);
    let web_id = format!("spiffe://{td}/ns/default/dc/dc1/svc/web");
    assert!(
        first.stdout.contains(&web_id),
        "stdout names {web_id}: {}",
        first.stdout
    );
    assert!(!first.stdout.contains("-----BEGIN"), "no PEM on stdout");
    for f in ["ca.pem", "ca-key.pem", "web.pem", "web-key.pem"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    for key in ["ca-key.pem", "web-key.pem"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key} mode");
    }
    let pem = ferry::config::read_cert_dir(&dir, "web").expect("read web");
    let creds = ferry::identity::tls::Credentials::new(&pem, "web").expect("web leaf validates");
    assert_eq!(creds.identity.id.to_string(), web_id);
    let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();
    let web_before = std::fs::read(dir.join("web.pem")).unwrap();

    let second = ferry(&["certs", "-dir", &d, "api"]);
    assert_eq!(second.code, Some(0), "stderr: {}", second.stderr);
    assert!(
        second.stdout.starts_with("reusing CA "),
        "{}",
        second.stdout
    );
    assert_eq!(
        printed_trust_domain(&second.stdout),
        td,
        "same trust domain"
    );
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca_before,
        "ca.pem untouched"
    );
    assert_eq!(
        std::fs::read(dir.join("web.pem")).unwrap(),
        web_before,
        "web.pem untouched by a run for api"
    );
    assert_eq!(mode(&dir.join("api-key.pem")), 0o600, "api-key.pem mode");
    let pem = ferry::config::read_cert_dir(&dir, "api").expect("read api");
    let creds = ferry::identity::tls::Credentials::new(&pem, "api").expect("api leaf validates");
    assert_eq!(
        creds.identity.id.to_string(),
        format!("spiffe://{td}/ns/default/dc/dc1/svc/api")
    );
}

/// `ferry certs` with a flag or argument that is wrong in itself (an invalid
/// service name, an invalid -trust-domain, a -trust-domain that contradicts
/// the CA already in the directory) is a usage error like the proxy's: exit
/// 64 and a message naming the bad value.
#[test]
fn certs_usage_errors_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = Pki::new();
    let existing_dir = existing.dir_arg();
    // A directory of its own per case, so one case's leftovers cannot
    // change what the next one sees.
    let fresh = |n: u32| path_str(&tmp.path().join(format!("fresh{n}")));
    let (f1, f2, f3, f4) = (fresh(1), fresh(2), fresh(3), fresh(4));
    let cases: Vec<(&str, Vec<&str>, Vec<String>)> = vec![
        (
            "no service",
            vec!["certs", "-dir", &f1],
            vec!["<SERVICE>".into()],
        ),
        (
            "ttl that is not a duration",
            vec!["certs", "-dir", &f2, "-ttl", "banana", "web"],
            vec!["ttl".into(), "\"banana\"".into()],
        ),
        (
            "invalid service name",
            vec!["certs", "-dir", &f3, "we b"],
            vec!["invalid service name \"we b\"".into()],
        ),
        (
            "invalid trust domain",
            vec!["certs", "-dir", &f4, "-trust-domain", "NOPE", "web"],
            vec!["invalid trust domain \"NOPE\"".into()],
        ),
        (
            "trust domain that contradicts the existing CA",
            vec![
                "certs",
                "-dir",
                &existing_dir,
                "-trust-domain",
                "11111111-2222-4333-8444-555555555555.consul",
                "web",
            ],
            vec![
                format!("{existing_dir}/ca.pem"),
                existing.trust_domain().to_string(),
            ],
        ),
    ];
    let mut problems = Vec::new();
    for (case, args, expect) in &cases {
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        problems.extend(ferry(args).usage_error_problems(case, &expect));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `ferry certs` checks its arguments before touching the directory: an
/// invalid service name leaves no CA (or anything else) behind.
#[test]
fn certs_with_an_invalid_service_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let run = ferry(&["certs", "-dir", &path_str(&dir), "we b"]);
    assert_ne!(run.code, Some(0), "an invalid name is refused");
    assert!(
        run.stderr.contains("invalid service name \"we b\""),
        "{}",
        run.stderr
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "files written before the service name was checked: {left:?}"
    );
}
