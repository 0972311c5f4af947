//! ferry's integration tests: one binary, real sockets, real TLS, all on
//! 127.0.0.1. Each module is a group of scenarios.

mod support;

// Bytes through two ferries: sizes, directions, half-close.
mod transfer;
// Round robin, retries past dead instances, ejection and recovery.
mod balancing;
// Certificate rotation under live connections.
mod rotation;
// What the inbound and upstream sides refuse, and that ferry keeps serving.
mod refusals;
// Other TLS stacks: openssl s_client into ferry, ferry into openssl s_server.
mod interop;
// A real Envoy 1.40 in Consul's sidecar shapes beside ferry, both directions (needs `make deps`).
mod envoy;
// The per-connection log line, read from the binary's stderr.
mod logs;
// The fake Consul agent (support::fake_agent) is faithful to Consul, so failures elsewhere are ferry's.
mod fake_agent_fidelity;
// Reaching the agent over a unix socket and over https with our own CA and server name.
mod agent_transport;
// The binary's command line: bad flags and files give clear errors.
mod cli;
// The Nomad job examples in nomad-jobs/ start ferry with flags it accepts.
mod nomad_jobs;
// Registration mode (-proxy-id, -sidecar-for) and -register against the fake agent.
mod expose;
mod registration;
mod registration_tuning;
mod sockets;
// ferry with a Consul agent: certificates, instances, intentions and agent trouble, against the fake agent.
mod consul_mode;
// Admin endpoints (/metrics, /ready, /live, /status), drain on shutdown and signals, access-log fields, TTL check vs leaf lifetime.
mod operability;
// Connection limits (-max-conns, -max-handshakes, -max-upstream-conns, -max-lifetime): refuse at once, count, log once per burst.
mod limits;
// Data-plane faults: local app refusing or resetting, upstream dying mid-stream, peer vanishing.
mod faults;
// TLS session resumption between sidecars, per upstream instance.
mod resumption;
// Hostile input: floods of half-open connections, hostile chains, huge hellos.
mod hostile;
// Admission under a mixed flood (one source and spread), an upstream flood, and an app that starts before its certificates.
mod admission;
// The soak (ignored; make soak): long runs, leaks, limits.
mod soak;
// xDS mode (`ferry envoy`) against a Delta ADS server in Consul's manner.
#[cfg(feature = "xds")]
mod xds;
// A real Envoy and ferry fed by one ADS server decide the same (needs `make deps`).
#[cfg(feature = "xds")]
mod xds_oracle;
