//! A ferry process under attack: the real binary as `api`, with an admin
//! listener, in front of an echo app, and a genuine `web` leaf it accepts.
//! Used by the flood and hostile-input scenarios.

use std::net::SocketAddr;

use ferry::identity::dev_ca::Leaf;

use super::*;

/// An `api` ferry process (with an admin listener) in front of an echo
/// app, and a genuine `web` leaf it accepts.
pub struct Target {
    pub pki: Pki,
    pub web: Leaf,
    pub app: EchoServer,
    pub ferry: FerryProcess,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Target {
    /// Starts the binary with `extra` flags added and waits until both
    /// listeners are ready.
    pub async fn start(extra: &[&str]) -> Target {
        let pki = Pki::new();
        pki.leaf("api");
        let web = pki.leaf("web");
        let app = EchoServer::start().await;
        let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
        let mut args = api_args(&dir, &app_addr, &["-admin-addr", "127.0.0.1:0"]);
        args.extend_from_slice(extra);
        let ferry = FerryProcess::start(&args);
        let inbound = ferry.listen_addr("inbound listener ready").await;
        let admin = ferry.listen_addr("admin listener ready").await;
        Target {
            pki,
            web,
            app,
            ferry,
            inbound,
            admin,
        }
    }

    /// Resident memory (KiB) and open descriptors of the ferry process.
    pub fn proc_usage(&self) -> (u64, usize) {
        proc_usage(self.ferry.pid())
    }

    /// The process has not exited (crashed, aborted, run out of memory).
    pub fn assert_alive(&mut self, after: &str) {
        if let Some(status) = self.ferry.try_exit() {
            let log = self.ferry.stop();
            panic!(
                "after {after}: ferry exited with {status}; its last lines:\n{}",
                log[log.len().saturating_sub(20)..].join("\n")
            );
        }
    }

    /// A fresh genuine `web` client round-trips through the same listener,
    /// and the app sees exactly that one connection more.
    pub async fn assert_still_serves(&mut self, after: &str) {
        self.assert_alive(after);
        let before = self.app.counts.accepted();
        let got = within(
            &format!("a genuine client after {after}"),
            mesh_echo(self.inbound, &self.web),
        )
        .await
        .unwrap_or_else(|e| panic!("after {after}: a genuine client failed: {e}"));
        assert!(got == MSG, "after {after}: got {got:?} instead of the echo");
        assert_eq!(
            self.app.counts.accepted(),
            before + 1,
            "after {after}: the app sees the genuine client, once"
        );
    }
}

/// This process's soft limit on open descriptors, from `/proc/self/limits`
/// (the crate forbids `unsafe`, so no `getrlimit`; and raising the limit
/// would need it, so the test sizes itself to the limit instead).
pub fn soft_nofile_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("a numeric 'Max open files' soft limit")
}
