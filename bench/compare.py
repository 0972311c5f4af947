#!/usr/bin/env python3
"""Side-by-side benchmark: ferry against haproxy, nginx, stunnel and Envoy.

Every candidate runs the same two-hop chain, one process per hop:

    client --plain--> [outbound] ==mTLS, TLS 1.3==> [inbound] --plain--> backend

and "plain" is the client talking straight to the backend (the floor).
"relay" is two haproxy hops in TCP mode without TLS: with one AES-128-GCM
encryption and one decryption per byte added (openssl speed, same run, same
CPU), it gives the floor for proxy CPU per GB.

Both proxy processes are pinned to CPU 0; this script, the load generators
(iperf3, wrk, redis-benchmark, the held-connections client) and the
backends (nginx, iperf3, redis) run on CPU 1, so the proxies' cost is what
limits throughput and what the CPU counters see.

All peers use the same certificates from `ferry certs` (Consul-shaped, EC
P-256), TLS 1.3 only, mutual: the inbound hop requires a client certificate
chaining to the dev CA, the outbound hop presents web's leaf and verifies
the server chain. haproxy, nginx and stunnel check the chain only; Envoy,
configured as Consul configures a sidecar, also matches the server's SPIFFE
URI and allows the client's SPIFFE ID through its RBAC filter; ferry checks
the SPIFFE identity on both sides and the intentions on every inbound
connection.

Every figure of ferry is reported as a ratio to the best peer and to Envoy;
every column's figures also as ratios to Envoy's (a second table, the JSON
and an SVG chart), and the targets against Envoy as met or missed.

The machine may be shared: before each workload the run waits (within a
budget) for both CPUs to be quiet, reruns a workload that other tasks
disturbed anyway, and reports how much of the proxies' CPU went to other
tasks, so a disturbed result is visible as such.

Run through bench/compare.sh, which installs the peers and builds ferry:

    bash bench/compare.sh --quick                 # smoke run, one to two minutes
    bash bench/compare.sh                         # full run, several minutes
    bash bench/compare.sh --peers envoy,ferry --duration 10
    python3 bench/compare.py --svg bench/results/compare-<date>.json

Results: a table on stdout, and bench/results/compare-<date>.{json,md,svg}.
Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATES = HERE / "peers"
FERRY = REPO / "target" / "release" / "ferry"
# compare.sh exports the path tests/envoy/install.sh printed.
ENVOY = Path(os.environ.get("FERRY_ENVOY") or REPO / ".deps" / "envoy" / "envoy" / "_bin" / "envoy")

PEERS = ["haproxy", "nginx", "stunnel", "envoy", "ferry"]
COMPETITORS = ["haproxy", "nginx", "stunnel", "envoy"]
# The reference every ratio and target below is taken against, beside the
# best peer.
REFERENCE = "envoy"
VS_FERRY, VS_ALL = f"ferry_vs_{REFERENCE}", f"vs_{REFERENCE}"  # keys in the JSON's ratios
# Two plain TCP relay hops (haproxy, no TLS): the floor's relay part.
RELAY = "relay"
PROXY_CPU = 0
LOAD_CPU = 1

# The backend's whole response body: exactly 100 bytes.
BODY = b"0123456789" * 10
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

# Each proxy hop holds two fds per connection (client side and upstream
# side); keep this many for everything else a process has open.
FD_RESERVE = 500
HOLD_MAX = 10000
# Concurrent connection attempts while opening held connections: below
# ferry's default -max-handshakes (128), which refuses more at accept.
HOLD_CONCURRENCY = 64
WRK_CONNECTIONS = 32
REDIS_CLIENTS = 20
REDIS_TIMEOUT = 120  # a bounded count, and a bound on its time as well
STOP_DEADLINE = 6.0  # ferry drains for up to 4 s on SIGTERM
# Envoy takes a second or more to come up, more on a busy machine.
START_DEADLINE = 30.0

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A process did not come up (bad config, missing binary, crash)."""


class WorkloadError(Exception):
    """A workload ran but did not produce a usable result."""


# --------------------------------------------------------------------------
# Processes: everything this run starts is tracked here and only that is
# ever signalled.


class Processes:
    def __init__(self, logdir: Path, nofile: int):
        self.logdir = logdir
        self.nofile = nofile
        self.live: list[tuple[str, subprocess.Popen]] = []

    def wrap(self, argv: list[str], cpu: int) -> list[str]:
        # taskset and prlimit exec the real program, so the PID we track is
        # the proxy's own; all threads and forked workers inherit both.
        return ["taskset", "-c", str(cpu), "prlimit",
                f"--nofile={self.nofile}:{self.nofile}", *argv]

    def start(self, name: str, argv: list[str], cpu: int) -> subprocess.Popen:
        cmd = self.wrap(argv, cpu)
        log = open(self.logdir / f"{name}.log", "ab")
        try:
            # A session of its own: Ctrl-C on the terminal reaches only this
            # script, which then stops the children in order; and the
            # process group holds exactly this child and what it forks
            # (nginx workers), so it can be killed as a unit.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            raise StartError(f"{name}: {e}") from e
        finally:
            log.close()
        proc.bench_cmd = cmd  # type: ignore[attr-defined]
        self.live.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def run(self, name: str, argv: list[str], cpu: int, timeout: float) -> tuple[int, str]:
        """A bounded foreground tool (wrk, iperf3 client): its output."""
        out = self.logdir / f"{name}.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen(self.wrap(argv, cpu), stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.live.append((name, proc))
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop([proc])
                raise WorkloadError(f"{name} did not finish within {timeout:.0f}s")
            finally:
                self._forget([proc])
        return rc, out.read_text(errors="replace")

    def _forget(self, procs):
        ids = {id(p) for p in procs}
        self.live = [(n, p) for n, p in self.live if id(p) not in ids]

    def stop(self, procs: list[subprocess.Popen], deadline: float = STOP_DEADLINE):
        """SIGTERM, then SIGKILL the whole process group after the deadline."""
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + deadline
        for p in procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            # The group id is the child's PID (start_new_session), which the
            # kernel does not hand out again while any member is alive, so
            # this can only reach what we started.
            if p.poll() is None or _group_alive(p.pid):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        self._forget(procs)

    def stop_all(self):
        self.stop([p for _, p in self.live])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# --------------------------------------------------------------------------
# /proc readers.


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants (nginx master and worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (fields 14 and 15) of each process, all its threads
    included, even threads that have exited (stunnel's per-connection ones)."""
    ticks = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
            ticks += int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / CLK_TCK


def cpu_stat(cpu: int) -> tuple[float, float]:
    """(busy: user+nice+system+irq+softirq, steal) of one CPU so far, in
    seconds. Interrupt time is included because a task's own utime+stime
    also holds the softirq work (loopback TCP) done in its context."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, v[7] / CLK_TCK
    return 0.0, 0.0


class CpuMeter:
    """CPU used by the proxies over one workload, and CPU used meanwhile on
    the two benchmark CPUs by tasks that are not part of the benchmark (the
    machine may be shared), plus hypervisor steal. The latter, "foreign"
    time, is everything the kernel counts as task time on CPUs 0 and 1
    minus what the proxies, the backends, the load generators (reaped
    children) and this script used. More than a few percent means the
    workload competed with something else and its numbers are suspect."""

    def __init__(self, proxy_pids: list[int], backend_pids: list[int]):
        self.proxy_pids = proxy_pids
        self.backend_pids = backend_pids

    def _ours(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (cpu_seconds(self.proxy_pids) + cpu_seconds(self.backend_pids)
                + own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime)

    @staticmethod
    def _machine() -> float:
        return sum(sum(cpu_stat(c)) for c in sorted({PROXY_CPU, LOAD_CPU}))

    def __enter__(self):
        self.t0 = time.monotonic()
        self.p0 = cpu_seconds(self.proxy_pids)
        self.o0, self.m0 = self._ours(), self._machine()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        self.proxy = cpu_seconds(self.proxy_pids) - self.p0
        foreign = (self._machine() - self.m0) - (self._ours() - self.o0)
        # Tick-based counters make this jitter by a few hundredths either way.
        self.foreign_pct = max(0.0, 100 * foreign / wall) if wall else 0.0
        self.foreign_raw_s = foreign


class Quiet:
    """This machine may be shared (builds, tests). Before each workload,
    wait for a moment when no other task keeps either CPU busy, and rerun a
    workload that was disturbed anyway; both within one time budget for the
    whole run, so a machine that never quiets down still ends in time."""

    THRESHOLD = 10.0  # % of a CPU

    def __init__(self, budget: float, retries: int, backend_pids):
        self.backend_pids = backend_pids  # callable: the backends' processes now
        self.left = budget
        # One wait may use a sixth of the budget: enough to sit out a build
        # with a large budget, without one burst starving every later wait.
        self.cap = max(10.0, budget / 6)
        self.retries = retries
        self.waited = 0.0
        self.reruns = 0

    def wait(self) -> None:
        cpus = sorted({PROXY_CPU, LOAD_CPU})
        end = time.monotonic() + self.cap
        while self.left > 0 and time.monotonic() < end:
            before = [cpu_stat(c) for c in cpus]
            time.sleep(0.5)
            after = [cpu_stat(c) for c in cpus]
            busy = max(100 * ((a[0] - b[0]) + (a[1] - b[1])) / 0.5
                       for a, b in zip(after, before))
            if busy < self.THRESHOLD:
                return
            self.left -= 0.5
            self.waited += 0.5

    def run(self, pids: list[int], workload, cost: float):
        """workload() under a CpuMeter; rerun while disturbed and the budget
        allows. Returns (result, meter) of the least disturbed attempt."""
        best = None
        for attempt in range(1 + self.retries):
            if attempt:
                self.left -= cost
                self.reruns += 1
            self.wait()
            with CpuMeter(pids, self.backend_pids()) as meter:
                r = workload()
            if best is None or meter.foreign_pct < best[1].foreign_pct:
                best = (r, meter)
            if meter.foreign_pct <= self.THRESHOLD or self.left < cost:
                break
        return best


def proc_status(pids: list[int], field: str) -> int:
    """Sum of an integer field of /proc/<pid>/status (VmRSS in KiB, Threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def listening(port: int) -> bool:
    # An IPv4 socket on 127.0.0.1 or 0.0.0.0 at this port in state LISTEN (0A).
    suffix = f":{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split(None, 4)
                local, st = parts[1], parts[3]
                if st == "0A" and local.endswith(suffix) and \
                        local[:8] in ("0100007F", "00000000"):
                    return True
    except OSError:
        pass
    return False


def wait_listening(port: int, proc: subprocess.Popen, procs: Processes, name: str,
                   deadline: float = START_DEADLINE):
    """Poll until the port is listening, with a deadline.

    Read from the kernel's socket table rather than by connecting: a probe
    connection to an outbound hop would travel the whole chain, and iperf3
    counts a connection that sends nothing as a failed test.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise StartError(f"{name} exited with status {proc.returncode}: "
                             f"{procs.log_tail(name)}")
        if listening(port):
            return
        time.sleep(0.02)
    raise StartError(f"{name} not listening on {port} after {deadline:.0f}s: "
                     f"{procs.log_tail(name)}")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RssSampler:
    """Samples each hop's RSS (summed over its processes) while a workload
    runs, keeping the peak of each hop and of both together."""

    def __init__(self, hops: dict[str, list[int]], interval: float = 0.05):
        self.hops = hops
        self.interval = interval
        self.peak = {h: 0 for h in hops} | {"total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            total = 0
            for hop, pids in self.hops.items():
                kib = proc_status(pids, "VmRSS")
                self.peak[hop] = max(self.peak[hop], kib)
                total += kib
            self.peak["total"] = max(self.peak["total"], total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# Certificates.


def make_certs(work: Path) -> dict:
    """The shared certificates, plus what some peers need in another shape."""
    certs = work / "certs"
    subprocess.run([str(FERRY), "certs", "-dir", str(certs), "web", "api"],
                   check=True, capture_output=True, timeout=30)
    # haproxy wants the leaf and its key in one file.
    for svc in ("web", "api"):
        (certs / f"{svc}-bundle.pem").write_bytes(
            (certs / f"{svc}.pem").read_bytes() + (certs / f"{svc}-key.pem").read_bytes())

    # nginx always matches the upstream certificate against proxy_ssl_name
    # (X509_check_host; there is no chain-only mode), and a Consul leaf has
    # no DNS name at all. So the inbound nginx presents a copy of api's
    # leaf, same key and profile, that also carries the DNS name Envoy uses
    # as SNI for api. Verification cost is the same; without it nginx's
    # outbound hop would have to skip verification entirely.
    san = subprocess.run(["openssl", "x509", "-in", str(certs / "api.pem"), "-noout",
                          "-ext", "subjectAltName"], check=True, capture_output=True,
                         text=True, timeout=10).stdout
    uri = re.search(r"URI:(spiffe://([^/\s,]+)/ns/([^/\s,]+)/dc/([^/\s,]+)/svc/api)\b", san)
    if not uri:
        raise StartError(f"unexpected api leaf SAN: {san!r}")
    spiffe, trust_domain, ns, dc = uri.groups()
    dns_name = f"api.{ns}.{dc}.internal.{trust_domain}"
    ext = certs / "api-dns.ext"
    ext.write_text(
        "[v3]\n"
        f"subjectAltName = critical,URI:{spiffe},DNS:{dns_name}\n"
        "keyUsage = critical,digitalSignature,keyEncipherment,dataEncipherment,keyAgreement\n"
        "extendedKeyUsage = clientAuth,serverAuth\n"
        "basicConstraints = critical,CA:FALSE\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")
    csr = certs / "api-dns.csr"
    subprocess.run(["openssl", "req", "-new", "-key", str(certs / "api-key.pem"),
                    "-subj", "/", "-out", str(csr)], check=True, capture_output=True, timeout=10)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(certs / "ca.pem"),
                    "-CAkey", str(certs / "ca-key.pem"), "-days", "3",
                    "-set_serial", "0x" + os.urandom(8).hex(), "-extfile", str(ext),
                    "-extensions", "v3", "-out", str(certs / "api-dns.pem")],
                   check=True, capture_output=True, timeout=10)

    # A second, unrelated CA: its web leaf must be refused by every inbound hop.
    foreign = work / "foreign"
    subprocess.run([str(FERRY), "certs", "-dir", str(foreign), "web"],
                   check=True, capture_output=True, timeout=30)
    # dns_name is also Consul's SNI for api (<svc>.<ns>.<dc>.internal.<td>),
    # which Envoy's outbound hop sends. Envoy's inbound RBAC allows web's
    # SPIFFE ID by regex, as Consul writes an intention: the trust domain's
    # dots escaped, any datacenter.
    td_re = trust_domain.replace(".", r"\.")
    return {"dir": certs, "foreign": foreign, "dns_name": dns_name,
            "api_spiffe": spiffe, "trust_domain": trust_domain, "ns": ns, "dc": dc,
            "web_regex": f"^spiffe://{td_re}/ns/{ns}/dc/[^/]+/svc/web$"}


# --------------------------------------------------------------------------
# Peers: how to start each hop.


def render(template: str, dest: Path, **values) -> Path:
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise StartError(f"{template}: unfilled {left}")
    dest.write_text(text)
    return dest


def nginx_stream_module() -> str:
    for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",
              "/usr/share/nginx/modules/ngx_stream_module.so"):
        if os.path.exists(p):
            return p
    raise StartError("nginx stream module not found (package libnginx-mod-stream)")


def peer_argv(peer: str, hop: str, ctx: "Context", listen: int, upstream: int,
              tag: str, extra: dict) -> list[str]:
    """argv for one hop. hop: 'out' (plain in, mTLS out) or 'in' (mTLS in,
    plain out). extra: what the caller should know beyond the argv (Envoy's
    admin port)."""
    certs = ctx.certs["dir"]
    conf = ctx.work / f"{peer}-{hop}-{tag}"
    if peer == "ferry":
        if hop == "out":
            return [str(FERRY), "-service", "web", "-upstream", f"api:{listen}",
                    "-upstream-addr", f"api=127.0.0.1:{upstream}", "-certs", str(certs),
                    "-log-level", "warn", "-max-upstream-conns", "30000"]
        return [str(FERRY), "-service", "api", "-listen", f"127.0.0.1:{listen}",
                "-service-addr", f"127.0.0.1:{upstream}", "-certs", str(certs),
                "-allow", "web", "-default-deny", "-log-level", "warn",
                "-max-conns", "30000"]
    if peer == "haproxy":
        # haproxy needs about 2 fds per connection plus a few of its own.
        cfg = render(f"haproxy-{hop}.cfg", conf.with_suffix(".cfg"), listen=listen,
                     upstream=upstream, certs=certs, maxconn=(ctx.nofile - 100) // 2)
        return ["haproxy", "-db", "-f", str(cfg)]
    if peer == "nginx":
        rundir = conf.with_suffix(".d")
        rundir.mkdir(exist_ok=True)
        # worker_connections counts both sides of a proxied connection.
        cfg = render(f"nginx-{hop}.conf", conf.with_suffix(".conf"), listen=listen,
                     upstream=upstream, certs=certs, rundir=rundir,
                     nofile=ctx.nofile, worker_connections=ctx.nofile,
                     stream_module=nginx_stream_module(), server_name=ctx.certs["dns_name"])
        # -e: nginx opens its error log before reading the config; keep it here.
        return ["nginx", "-c", str(cfg), "-p", str(rundir), "-e", str(rundir / "startup.log")]
    if peer == "stunnel":
        cfg = render(f"stunnel-{hop}.conf", conf.with_suffix(".conf"), listen=listen,
                     upstream=upstream, certs=certs)
        return ["stunnel4" if shutil.which("stunnel4") else "stunnel", str(cfg)]
    if peer == "envoy":
        # The admin listener Consul's bootstrap always has (there on
        # 19000); here on a free loopback port, read for TLS statistics.
        (admin,) = free_ports(1)
        extra["admin"] = admin
        c = ctx.certs
        cfg = render(f"envoy-{hop}.yaml", conf.with_suffix(".yaml"), listen=listen,
                     upstream=upstream, certs=certs, admin=admin,
                     maxconn=max(1024, (ctx.nofile - 100) // 2),
                     client_regex=c["web_regex"].replace("\\", "\\\\"),
                     sni=c["dns_name"], server_spiffe=c["api_spiffe"], dc=c["dc"])
        # One worker per pinned CPU, like the other peers' one worker. No
        # hot restart, so no shared memory region and no base id to collide
        # between the two hops (each still gets its own, --base-id, should
        # a build ignore the flag).
        return [str(ENVOY), "-c", str(cfg), "--concurrency", str(len({PROXY_CPU})),
                "--disable-hot-restart", "--base-id", str(extra["base_id"]),
                "--log-level", "warn"]
    if peer == RELAY:
        cfg = render("haproxy-relay.cfg", conf.with_suffix(".cfg"), listen=listen,
                     upstream=upstream, maxconn=(ctx.nofile - 100) // 2)
        return ["haproxy", "-db", "-f", str(cfg)]
    raise ValueError(peer)


class Pair:
    """One running outbound + inbound pair of a peer."""

    base_ids = iter(range(100, 1 << 20))  # Envoy: a distinct base id per process

    def __init__(self, peer: str, ctx: "Context", backend: int, tag: str):
        self.peer, self.ctx = peer, ctx
        self.p0, self.p1 = free_ports(2)
        self.procs: dict[str, subprocess.Popen] = {}
        self.extra = {hop: {"base_id": next(Pair.base_ids)} for hop in ("in", "out")}
        self.argv = {
            "in": peer_argv(peer, "in", ctx, self.p1, backend, tag, self.extra["in"]),
            "out": peer_argv(peer, "out", ctx, self.p0, self.p1, tag, self.extra["out"]),
        }
        try:
            for hop, port in (("in", self.p1), ("out", self.p0)):
                name = f"{peer}-{hop}-{tag}"
                self.procs[hop] = ctx.procs.start(name, self.argv[hop], PROXY_CPU)
                wait_listening(port, self.procs[hop], ctx.procs, name)
        except BaseException:
            self.stop()
            raise

    def hops(self) -> dict[str, list[int]]:
        return {hop: process_tree(p.pid) for hop, p in self.procs.items()}

    def commands(self) -> dict[str, str]:
        return {hop: shlex.join(p.bench_cmd) for hop, p in self.procs.items()}

    def configs(self) -> dict[str, str]:
        """The rendered config file of each hop (ferry has none): the temp
        dir is removed at the end, the JSON keeps them."""
        out = {}
        for hop, argv in self.argv.items():
            for arg in argv:
                if arg.endswith((".cfg", ".conf", ".yaml")) and os.path.isfile(arg):
                    out[hop] = Path(arg).read_text()
        return out

    def stop(self):
        self.ctx.procs.stop(list(self.procs.values()))


# --------------------------------------------------------------------------
# Checks made before measuring a peer.


def http_get(port: int, timeout: float = 5.0) -> bytes:
    """One keep-alive GET; returns the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(REQUEST)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise WorkloadError(f"connection closed after {buf[:80]!r}")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if not head.startswith(b"HTTP/1.1 200") or not m:
            raise WorkloadError(f"unexpected response {head[:80]!r}")
        while len(body) < int(m.group(1)):
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
        return body


def tls_client(port: int, ca: Path, cert: Path | None, key: Path | None) -> dict:
    """Talk HTTP over TLS 1.3 to an inbound hop directly. With TLS 1.3 the
    server judges the client certificate after the client's Finished, so a
    refusal shows up as an alert on the first read rather than in the
    handshake: what matters is whether any application data comes back."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the leaf names a SPIFFE URI, no host
    ctx.load_verify_locations(str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                info = {"version": s.version(), "cipher": s.cipher()[0]}
                s.sendall(REQUEST)
                data = s.recv(4096)
                return info | {"data": len(data), "outcome": "answered" if data else "closed"}
    except (ssl.SSLError, ConnectionError) as e:
        return {"data": 0, "outcome": f"refused ({type(e).__name__}: {e})"}
    except socket.timeout:
        return {"data": 0, "outcome": "no answer within 5s"}


def check_mtls(port: int, certs: dict) -> dict:
    d, foreign = certs["dir"], certs["foreign"]
    ok = tls_client(port, d / "ca.pem", d / "web.pem", d / "web-key.pem")
    nocert = tls_client(port, d / "ca.pem", None, None)
    alien = tls_client(port, d / "ca.pem", foreign / "web.pem", foreign / "web-key.pem")
    return {"with_cert": ok, "no_cert": nocert, "foreign_ca": alien,
            "enforced": ok["data"] > 0 and nocert["data"] == 0 and alien["data"] == 0}


# --------------------------------------------------------------------------
# Workloads.


def iperf(ctx: "Context", port: int, streams: int, label: str) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(ctx.duration),
            "-P", str(streams), "-J", "--connect-timeout", "3000"]
    rc, out = ctx.procs.run(f"iperf3-{label}", argv, LOAD_CPU, timeout=ctx.duration + 20)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        ctx.restart_iperf_server()
        raise WorkloadError(f"iperf3 exit {rc}: {out[-300:]!r}")
    if rc != 0 or "error" in doc:
        # A test that broke midway can leave the server stuck on it.
        ctx.restart_iperf_server()
        raise WorkloadError(f"iperf3 exit {rc}: {doc.get('error')}")
    recv = doc["end"]["sum_received"]
    return {"gbps": recv["bits_per_second"] / 1e9, "bytes": recv["bytes"],
            "seconds": recv["seconds"]}


def wrk(ctx: "Context", port: int, label: str, close: bool) -> dict:
    argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{ctx.duration}s", "--latency",
            "-s", str(TEMPLATES / "wrk-report.lua")]
    if close:
        # wrk opens a new connection after a response that says close.
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    rc, out = ctx.procs.run(f"wrk-{label}", argv, LOAD_CPU, timeout=ctx.duration + 30)
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise WorkloadError(f"wrk exit {rc}: {out[-300:]!r}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / secs if secs else 0.0
    r["errors"] = sum(r[k] for k in r if k.startswith("err_"))
    return r


def redis_bench(ctx: "Context", port: int, label: str) -> dict:
    """redis-benchmark, SET then GET, 20 clients, a fixed request count:
    ops/s and latency of each, from its CSV output."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(ctx.redis_n),
            "-c", str(REDIS_CLIENTS), "-t", "get,set", "--csv"]
    rc, out = ctx.procs.run(f"redis-{label}", argv, LOAD_CPU, timeout=REDIS_TIMEOUT)
    r = {}
    for m in re.finditer(r'^"(GET|SET)","([\d.]+)","([\d.]+)","[\d.]+","([\d.]+)",'
                         r'"[\d.]+","([\d.]+)"', out, re.M):
        test, rps, avg, p50, p99 = m.groups()
        r[test.lower()] = {"rps": float(rps), "avg_ms": float(avg), "p50_ms": float(p50),
                           "p99_ms": float(p99)}
    if rc != 0 or set(r) != {"get", "set"}:
        raise WorkloadError(f"redis-benchmark exit {rc}: {out[-300:]!r}")
    return r


def aes_speed(ctx: "Context") -> dict:
    """AES-128-GCM throughput of one CPU of the proxies' kind (openssl speed
    on the proxies' CPU, 16 KiB buffers, the TLS record size), encrypting and
    decrypting. openssl speed divides by the CPU time it used, so these are
    bytes per CPU second, the unit CPU per GB is the inverse of."""
    out = {}
    for mode in ("encrypt", "decrypt"):
        argv = ["openssl", "speed", "-evp", "aes-128-gcm", "-bytes", "16384",
                "-seconds", str(ctx.aes_seconds), "-mr"] + (["-decrypt"] if mode == "decrypt" else [])
        def workload(argv=argv, mode=mode):
            rc, text = ctx.procs.run(f"openssl-speed-{mode}", argv, PROXY_CPU,
                                     timeout=ctx.aes_seconds * 3 + 20)
            m = re.search(r"^\+F:\d+:AES-128-GCM:([\d.]+)", text, re.M)
            if rc != 0 or not m:
                raise WorkloadError(f"openssl speed exit {rc}: {text[-300:]!r}")
            return float(m.group(1))
        bps, meter = ctx.quiet.run([], workload, ctx.aes_seconds)
        out[f"{mode}_bytes_per_cpu_s"] = bps
        out[f"{mode}_foreign_cpu_pct"] = meter.foreign_pct
        out[f"{mode}_command"] = shlex.join(argv)
    out["s_per_gb"] = 1e9 / out["encrypt_bytes_per_cpu_s"] + 1e9 / out["decrypt_bytes_per_cpu_s"]
    return out


def envoy_stats(admin: int, filt: str = r"\.ssl\.") -> dict[str, int]:
    """Counters of one Envoy from its admin listener (/stats, text form)."""
    path = "/stats?filter=" + urllib.parse.quote(filt)
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    out = {}
    for line in body.splitlines():
        name, _, value = line.rpartition(": ")
        if name and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def envoy_tls_summary(pair: "Pair") -> dict:
    """What the Envoy hops negotiated between them and how often the
    outbound hop resumed, from the outbound hop's cluster counters."""
    st = envoy_stats(pair.extra["out"]["admin"])
    def pick(part: str) -> list[str]:
        return sorted(k.split(f".ssl.{part}.", 1)[1] for k, v in st.items()
                      if k.startswith("cluster.") and f".ssl.{part}." in k and v > 0)
    def total(suffix: str) -> int:
        return sum(v for k, v in st.items() if k.startswith("cluster.") and k.endswith(suffix))
    return {"versions": pick("versions"), "ciphers": pick("ciphers"), "curves": pick("curves"),
            "handshakes": total(".ssl.handshake"), "resumed": total(".ssl.session_reused"),
            "counters": st}


def backend_accepts(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /nginx_status HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    # "server accepts handled requests\n A H R"
    m = re.search(rb"server accepts handled requests\s+(\d+)", data)
    if not m:
        raise WorkloadError(f"bad stub_status answer {data[-200:]!r}")
    return int(m.group(1))


async def _hold(port: int, n: int, deadline: float, measure):
    """Open n connections, each sends one keep-alive GET and reads the whole
    response, then stays open and idle; call measure() while all are held."""
    sem = asyncio.Semaphore(HOLD_CONCURRENCY)
    held: list[asyncio.StreamWriter] = []
    failures: dict[str, int] = {}

    def fail(why: str):
        failures[why] = failures.get(why, 0) + 1

    async def one():
        async with sem:
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
                w.write(REQUEST)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                body = await asyncio.wait_for(r.readexactly(int(m.group(1)) if m else 0), 10)
                if body != BODY:
                    raise WorkloadError("wrong body")
                held.append(w)
            except Exception as e:  # every failure is counted, none aborts the test
                fail(type(e).__name__)
                if w:
                    w.close()

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    if pending:
        failures["deadline"] = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    open_secs = time.monotonic() - t0
    try:
        result = measure(len(held))
    finally:
        for w in held:
            w.close()
        await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for w in held),
                                              return_exceptions=True), 30)
    return {"attempted": n, "opened": len(held), "failed": sum(failures.values()),
            "failures": failures, "open_seconds": round(open_secs, 2)} | result


# --------------------------------------------------------------------------
# The run.


class Context:
    def __init__(self, args, work: Path, nofile: int):
        self.work = work
        self.nofile = nofile
        self.duration = args.duration
        self.hold = args.hold
        self.procs = Processes(work, nofile)
        self.quiet = Quiet(args.quiet_budget, args.retries, self.backend_pids)
        self.certs: dict = {}
        self.iperf_port = 0
        self.iperf_proc: subprocess.Popen | None = None
        self.backend_proc: subprocess.Popen | None = None
        # One backend port per column: see start_backends.
        self.http_ports: dict[str, int] = {}
        self.redis_n = args.redis_requests
        self.redis_port = 0
        self.redis_proc: subprocess.Popen | None = None
        self.aes_seconds = 1 if args.quick else 3
        self.aes: dict | None = None

    def start_backends(self, columns: list[str]):
        # Each column gets its own backend port. The new-connection workload
        # leaves tens of thousands of TIME_WAIT sockets towards the port it
        # used; on a shared port, the next column's inbound hop would pay for
        # them in every connect() (the kernel's search for a free 4-tuple),
        # a handicap for whichever peer runs right after plain.
        ports = free_ports(len(columns) + 1)
        self.iperf_port = ports.pop()
        self.http_ports = dict(zip(columns, ports))
        rundir = self.work / "backend.d"
        rundir.mkdir()
        listens = "\n        ".join(f"listen 127.0.0.1:{port} backlog=4096;"
                                    for port in self.http_ports.values())
        cfg = render("nginx-backend.conf", self.work / "backend.conf",
                     listens=listens, rundir=rundir, nofile=self.nofile,
                     worker_connections=max(12000, self.nofile - 1000),
                     body=BODY.decode())
        p = self.backend_proc = self.procs.start(
            "backend-nginx", ["nginx", "-c", str(cfg), "-p", str(rundir),
                              "-e", str(rundir / "startup.log")], LOAD_CPU)
        for port in self.http_ports.values():
            wait_listening(port, p, self.procs, "backend-nginx")
            if http_get(port) != BODY:
                raise StartError("backend nginx does not serve the 100-byte body")
        self.restart_iperf_server()
        if self.redis_n:
            self.start_redis()

    def start_redis(self):
        # The real-client workload's server: on the load CPU, loopback only,
        # nothing persisted; stopped by PID with everything else.
        (self.redis_port,) = free_ports(1)
        rundir = self.work / "redis.d"
        rundir.mkdir()
        self.redis_proc = self.procs.start(
            "backend-redis", ["redis-server", "--port", str(self.redis_port),
                              "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--daemonize", "no", "--dir", str(rundir),
                              "--maxclients", "1000", "--loglevel", "warning"], LOAD_CPU)
        wait_listening(self.redis_port, self.redis_proc, self.procs, "backend-redis")

    def backend_pids(self) -> list[int]:
        procs = [p for p in (self.backend_proc, self.iperf_proc, self.redis_proc) if p]
        return [pid for p in procs for pid in process_tree(p.pid)]

    def restart_iperf_server(self):
        if self.iperf_proc:
            self.procs.stop([self.iperf_proc])
        self.iperf_proc = self.procs.start(
            "backend-iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port),
                               "--rcv-timeout", "10000"], LOAD_CPU)
        wait_listening(self.iperf_port, self.iperf_proc, self.procs, "backend-iperf3")


def measure_http(ctx: Context, res: dict, port: int, pair: Pair | None):
    """req/resp, new connection per request, and (through proxies) CPU,
    memory and held connections. pair None: plain, straight to the backend."""
    m, err = res["metrics"], res["errors"]
    backend = ctx.http_ports[res["name"]]
    hops = pair.hops() if pair else {}
    pids = [p for ps in hops.values() for p in ps]
    if pair:
        for hop, ps in hops.items():
            m[f"rss_idle_{hop}"] = proc_status(ps, "VmRSS") / 1024
            res["raw"][f"threads_idle_{hop}"] = proc_status(ps, "Threads")
        m["rss_idle_total"] = m["rss_idle_out"] + m["rss_idle_in"]

    with RssSampler(hops) as sampler:
        for label, close in (("rr", False), ("nc", True)):
            def workload(label=label, close=close):
                acc0 = backend_accepts(backend)
                r = wrk(ctx, port, f"{res['name']}-{label}", close)
                # minus 1: the stub_status request itself
                return r | {"backend_accepts": backend_accepts(backend) - acc0 - 1}
            try:
                r, meter = ctx.quiet.run(pids, workload, ctx.duration)
                cpu, accepts = meter.proxy, r["backend_accepts"]
            except WorkloadError as e:
                err[label] = str(e)
                continue
            print(f"   {label:6} {r['rps']:>10,.0f} req/s  p99 {r['p99_us'] / 1000:.2f} ms  "
                  f"errors {r['errors']}  proxy CPU {cpu:.2f} s", flush=True)
            m[f"{label}_rps"] = r["rps"]
            for p in (50, 90, 99):
                m[f"{label}_p{p}_ms"] = r[f"p{p}_us"] / 1000
            m[f"{label}_errors"] = r["errors"]
            m[f"{label}_accepts_per_req"] = accepts / r["requests"] if r["requests"] else None
            res["raw"][label] = r | {"proxy_cpu_s": cpu, "foreign_cpu_pct": meter.foreign_pct,
                                     "foreign_cpu_raw_s": round(meter.foreign_raw_s, 3)}
            m["foreign_cpu_pct"] = max(m.get("foreign_cpu_pct", 0.0), meter.foreign_pct)
            if pair and r["requests"]:
                m[f"cpu_per_1k_{label}"] = cpu / (r["requests"] / 1000)
                m[f"{label}_proxy_core_pct"] = 100 * cpu / (r["duration_us"] / 1e6)
    if pair:
        res["raw"]["rss_peak_http_kib"] = sampler.peak
        res["raw"]["hwm_http_kib"] = {h: proc_status(ps, "VmHWM") for h, ps in hops.items()}
        m["rss_peak_total"] = sampler.peak["total"] / 1024

    if pair and ctx.hold:
        def at_hold(opened: int) -> dict:
            now = {h: proc_status(ps, "VmRSS") for h, ps in pair.hops().items()}
            return {"rss_held_kib": now}
        before = {h: proc_status(ps, "VmRSS") for h, ps in pair.hops().items()}
        print(f"   hold   opening {ctx.hold} idle connections", flush=True)
        try:
            h = asyncio.run(_hold(port, ctx.hold, deadline=60, measure=at_hold))
        except Exception as e:
            err["hold"] = f"{type(e).__name__}: {e}"
            return
        h["rss_before_kib"] = before
        print(f"   hold   {h['opened']} open, {h['failed']} failed, "
              f"in {h['open_seconds']} s", flush=True)
        res["raw"]["hold"] = h
        m["hold_opened"] = h["opened"]
        m["hold_failed"] = h["failed"]
        if h["opened"]:
            for hop in ("out", "in"):
                m[f"rss_per_conn_{hop}"] = \
                    (h["rss_held_kib"][hop] - before[hop]) / h["opened"]
            m["rss_per_conn_total"] = m["rss_per_conn_out"] + m["rss_per_conn_in"]


def measure_bulk(ctx: Context, res: dict, port: int, pair: Pair | None):
    m, err = res["metrics"], res["errors"]
    hops = pair.hops() if pair else {}
    pids = [p for ps in hops.values() for p in ps]
    with RssSampler(hops) as sampler:
        for streams in (1, 8):
            label = f"bulk{streams}"
            try:
                r, meter = ctx.quiet.run(
                    pids, lambda: iperf(ctx, port, streams, f"{res['name']}-{label}"),
                    ctx.duration)
                cpu = meter.proxy
            except WorkloadError as e:
                err[label] = str(e)
                continue
            print(f"   {label:6} {r['gbps']:>10.2f} Gbit/s  proxy CPU {cpu:.2f} s", flush=True)
            m[f"bulk{streams}_gbps"] = r["gbps"]
            res["raw"][label] = r | {"proxy_cpu_s": cpu, "foreign_cpu_pct": meter.foreign_pct,
                                     "foreign_cpu_raw_s": round(meter.foreign_raw_s, 3)}
            m["foreign_cpu_pct"] = max(m.get("foreign_cpu_pct", 0.0), meter.foreign_pct)
            if pair and r["bytes"]:
                m[f"cpu_per_gb_{streams}"] = cpu / (r["bytes"] / 1e9)
                m[f"{label}_proxy_core_pct"] = 100 * cpu / r["seconds"]
    if pair:
        res["raw"]["rss_peak_bulk_kib"] = sampler.peak
        m["rss_peak_total"] = max(m.get("rss_peak_total", 0), sampler.peak["total"] / 1024)


def measure_redis(ctx: Context, res: dict, port: int, pair: Pair | None):
    """redis-benchmark GET and SET through the chain (or straight to redis
    for plain); the ratio to the direct connection is filled in at the end."""
    m, err = res["metrics"], res["errors"]
    pids = [p for ps in (pair.hops() if pair else {}).values() for p in ps]
    try:
        # Cost of a rerun: both tests at a few thousand ops/s at worst.
        r, meter = ctx.quiet.run(pids, lambda: redis_bench(ctx, port, res["name"]),
                                 max(1.0, ctx.redis_n / 5000))
    except WorkloadError as e:
        err["redis"] = str(e)
        return
    print(f"   redis  SET {r['set']['rps']:>10,.0f} ops/s  GET {r['get']['rps']:>10,.0f} ops/s  "
          f"proxy CPU {meter.proxy:.2f} s", flush=True)
    for op in ("get", "set"):
        m[f"redis_{op}_ops"] = r[op]["rps"]
        m[f"redis_{op}_p99_ms"] = r[op]["p99_ms"]
    res["raw"]["redis"] = r | {"requests_each": ctx.redis_n, "clients": REDIS_CLIENTS,
                               "proxy_cpu_s": meter.proxy, "foreign_cpu_pct": meter.foreign_pct,
                               "foreign_cpu_raw_s": round(meter.foreign_raw_s, 3)}
    m["foreign_cpu_pct"] = max(m.get("foreign_cpu_pct", 0.0), meter.foreign_pct)


def measure_relay(ctx: Context, res: dict, live: list):
    """Only what the CPU-per-GB floor needs: AES-128-GCM's cost on the
    proxies' CPU, and the bytes through two plain relay hops."""
    a = ctx.aes = res["raw"]["aes"] = aes_speed(ctx)
    print(f"   aes    AES-128-GCM {a['encrypt_bytes_per_cpu_s'] / 1e9:.2f} GB/s encrypt, "
          f"{a['decrypt_bytes_per_cpu_s'] / 1e9:.2f} GB/s decrypt per CPU second: "
          f"{a['s_per_gb']:.3f} s per GB for one of each", flush=True)
    pair = Pair(RELAY, ctx, ctx.iperf_port, "bulk")
    live.append(pair)
    res["commands"] = pair.commands()
    res["configs"] = pair.configs()
    measure_bulk(ctx, res, pair.p0, pair)


def measure_peer(ctx: Context, res: dict, live: list):
    """Pre-flight checks, then every workload through the peer's chain."""
    name = res["name"]
    pair = Pair(name, ctx, ctx.http_ports[name], "http")
    live.append(pair)
    res["commands"] = pair.commands()
    res["configs"] = pair.configs()
    try:
        body = http_get(pair.p0)
    except (OSError, WorkloadError) as e:
        raise StartError(f"chain check: {e}") from e
    if body != BODY:
        raise StartError(f"chain check: got {len(body)} bytes, not the 100-byte body")
    mtls = check_mtls(pair.p1, ctx.certs)
    res["mtls"] = mtls
    if not mtls["enforced"]:
        raise StartError("inbound hop does not enforce mTLS: "
                         f"no cert -> {mtls['no_cert']['outcome']}, "
                         f"foreign CA -> {mtls['foreign_ca']['outcome']}, "
                         f"good cert -> {mtls['with_cert']['outcome']}")
    if name == "envoy":
        # What the two Envoy hops negotiated with each other (the GET above).
        t = envoy_tls_summary(pair)
        res["hop_tls"] = short_tls('/'.join(t['versions']) or '?', '/'.join(t['ciphers']) or '?')
    measure_http(ctx, res, pair.p0, pair)
    if name == "envoy":
        t = envoy_tls_summary(pair)
        res["raw"]["envoy_tls_out"] = t
        print(f"   tls    between the hops {res['hop_tls']} {'/'.join(t['curves'])}; "
              f"outbound resumed {t['resumed']} of {t['handshakes']} handshakes", flush=True)
    # Each further backend needs the inbound hop pointed at it: a fresh pair.
    for backend, tag, measure in ((ctx.iperf_port, "bulk", measure_bulk),
                                  (ctx.redis_port, "redis", measure_redis)):
        if tag == "redis" and not ctx.redis_n:
            continue
        live.pop().stop()
        pair = Pair(name, ctx, backend, tag)
        live.append(pair)
        measure(ctx, res, pair.p0, pair)


def run_column(ctx: Context, name: str) -> dict:
    res = {"name": name, "status": "ok", "metrics": {}, "errors": {}, "raw": {},
           "commands": {}}
    t0 = time.monotonic()
    print(f"== {name}", flush=True)
    if name == "plain":
        measure_http(ctx, res, ctx.http_ports[name], None)
        measure_bulk(ctx, res, ctx.iperf_port, None)
        if ctx.redis_n:
            measure_redis(ctx, res, ctx.redis_port, None)
        res["wall_seconds"] = round(time.monotonic() - t0, 1)
        return res
    live: list[Pair] = []  # the pair running now, stopped whatever happens
    try:
        (measure_relay if name == RELAY else measure_peer)(ctx, res, live)
    except StartError as e:
        res["status"] = f"failed: {e}"
        print(f"   {name} FAILED: {e}", flush=True)
    except Exception as e:  # one peer's surprise must not lose the others' results
        res["status"] = f"failed: {type(e).__name__}: {e}"
        print(f"   {name} FAILED: {type(e).__name__}: {e}", flush=True)
    finally:
        for pair in live:
            pair.stop()
    for k, v in res["errors"].items():
        print(f"   {name} {k}: {v}", flush=True)
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    return res


# --------------------------------------------------------------------------
# Report.

# key, label, better ("higher", "lower" or None), format
ROWS = [
    ("bulk1_gbps", "bulk, 1 stream (Gbit/s, higher is better)", "higher", "{:.2f}"),
    ("bulk8_gbps", "bulk, 8 streams (Gbit/s, higher is better)", "higher", "{:.2f}"),
    ("rr_rps", "req/resp, 32 keep-alive conns (req/s, higher is better)", "higher", "{:,.0f}"),
    ("rr_p50_ms", "req/resp latency p50 (ms, lower is better)", "lower", "{:.3f}"),
    ("rr_p90_ms", "req/resp latency p90 (ms, lower is better)", "lower", "{:.3f}"),
    ("rr_p99_ms", "req/resp latency p99 (ms, lower is better)", "lower", "{:.3f}"),
    ("nc_rps", "new connection per request (conn/s, higher is better)", "higher", "{:,.0f}"),
    ("nc_p50_ms", "new conn latency p50 (ms, lower is better)", "lower", "{:.3f}"),
    ("nc_p99_ms", "new conn latency p99 (ms, lower is better)", "lower", "{:.3f}"),
    ("nc_accepts_per_req", "new conn: backend accepts per request (1.00 = a new conn each)", None, "{:.2f}"),
    ("rr_errors", "req/resp errors (wrk)", None, "{:d}"),
    ("nc_errors", "new conn errors (wrk)", None, "{:d}"),
    ("redis_get_ops", "redis-benchmark GET, 20 clients (ops/s, higher is better)", "higher", "{:,.0f}"),
    ("redis_set_ops", "redis-benchmark SET, 20 clients (ops/s, higher is better)", "higher", "{:,.0f}"),
    ("redis_get_vs_direct", "redis GET vs direct to redis (×, higher is better)", "higher", "{:.2f}"),
    ("redis_set_vs_direct", "redis SET vs direct to redis (×, higher is better)", "higher", "{:.2f}"),
    ("redis_get_p99_ms", "redis GET latency p99 (ms, lower is better)", "lower", "{:.3f}"),
    ("redis_set_p99_ms", "redis SET latency p99 (ms, lower is better)", "lower", "{:.3f}"),
    ("cpu_per_gb_1", "proxy CPU per GB, bulk 1 stream (s, lower is better)", "lower", "{:.3f}"),
    ("cpu_per_gb_8", "proxy CPU per GB, bulk 8 streams (s, lower is better)", "lower", "{:.3f}"),
    ("cpu_per_1k_rr", "proxy CPU per 1,000 requests (s, lower is better)", "lower", "{:.4f}"),
    ("cpu_per_1k_nc", "proxy CPU per 1,000 new conns (s, lower is better)", "lower", "{:.3f}"),
    ("cpu_floor_gb_1", "CPU per GB floor, 1 stream: relay + AES-128-GCM enc+dec (s)", None, "{:.3f}"),
    ("cpu_floor_gb_8", "CPU per GB floor, 8 streams: relay + AES-128-GCM enc+dec (s)", None, "{:.3f}"),
    ("cpu_floor_ratio_1", "proxy CPU per GB / floor, 1 stream (×, lower is better)", "lower", "{:.2f}"),
    ("cpu_floor_ratio_8", "proxy CPU per GB / floor, 8 streams (×, lower is better)", "lower", "{:.2f}"),
    ("rss_idle_out", "idle RSS, outbound hop (MiB, lower is better)", "lower", "{:.1f}"),
    ("rss_idle_in", "idle RSS, inbound hop (MiB, lower is better)", "lower", "{:.1f}"),
    ("rss_idle_total", "idle RSS, both hops (MiB, lower is better)", "lower", "{:.1f}"),
    ("rss_peak_total", "peak RSS under load, both hops (MiB, lower is better)", "lower", "{:.1f}"),
    ("hold_opened", "held idle conns opened", None, "{:d}"),
    ("hold_failed", "held idle conns failed", None, "{:d}"),
    ("rss_per_conn_out", "RSS per held idle conn, outbound hop (KiB, lower is better)", "lower", "{:.1f}"),
    ("rss_per_conn_in", "RSS per held idle conn, inbound hop (KiB, lower is better)", "lower", "{:.1f}"),
    ("rss_per_conn_total", "RSS per held idle conn, both hops (KiB, lower is better)", "lower", "{:.1f}"),
    ("foreign_cpu_pct", "CPU used by non-benchmark tasks + steal, worst workload (% of one CPU)", None, "{:.1f}"),
]


def fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    if spec == "{:d}":
        value = int(value)
    return spec.format(value)


def finish_metrics(cols: dict, aes: dict | None):
    """Figures that need more than one column: the CPU-per-GB floor (the
    relay's CPU per GB plus one AES-128-GCM encryption and one decryption
    per byte) and each peer's CPU per GB against it; redis through each
    chain against redis straight."""
    relay = cols.get(RELAY, {}).get("metrics", {})
    for streams in (1, 8):
        r = relay.get(f"cpu_per_gb_{streams}")
        if r is None or not aes:
            continue
        floor = relay[f"cpu_floor_gb_{streams}"] = r + aes["s_per_gb"]
        for name, c in cols.items():
            v = c["metrics"].get(f"cpu_per_gb_{streams}")
            if name in PEERS and v is not None:
                c["metrics"][f"cpu_floor_ratio_{streams}"] = v / floor
    direct = cols.get("plain", {}).get("metrics", {})
    for op in ("get", "set"):
        d = direct.get(f"redis_{op}_ops")
        for c in cols.values():
            v = c["metrics"].get(f"redis_{op}_ops")
            if d and v is not None:
                c["metrics"][f"redis_{op}_vs_direct"] = v / d


def short_tls(version: str, cipher: str) -> str:
    """'TLSv1.3', 'TLS_AES_128_GCM_SHA256' -> '1.3 AES_128_GCM_SHA256'."""
    return f"{version.replace('TLSv', '')} {cipher.replace('TLS_', '')}"


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compute_ratios(cols: dict) -> dict:
    """Every comparable figure as a ratio: ferry's to the best peer's (Envoy
    among them) and to Envoy's; and every column's to Envoy's."""
    out = {"reference": REFERENCE, "ferry_vs_best": {}, VS_FERRY: {}, VS_ALL: {}}
    ok = {n: c for n, c in cols.items() if c["status"] == "ok"}
    ref = ok.get(REFERENCE, {}).get("metrics", {})
    f = ok.get("ferry", {}).get("metrics", {})
    for key, _label, better, _spec in ROWS:
        if better is None:
            continue
        peers = {n: ok[n]["metrics"].get(key) for n in COMPETITORS if n in ok}
        peers = {n: v for n, v in peers.items() if v is not None}
        if f.get(key) is not None and peers:
            best = (max if better == "higher" else min)(peers, key=peers.get)
            r = _ratio(f[key], peers[best])
            if r is not None:
                out["ferry_vs_best"][key] = {"ratio": r, "peer": best}
        r = _ratio(f.get(key), ref.get(key))
        if r is not None:
            out[VS_FERRY][key] = r
        for name, c in ok.items():
            if name == REFERENCE:
                continue
            r = _ratio(c["metrics"].get(key), ref.get(key))
            if r is not None:
                out[VS_ALL].setdefault(name, {})[key] = r
    return out


def table(cols: dict, ratios: dict) -> tuple[list[str], list[list[str]]]:
    extra = [h for h, want in (("ferry vs best peer", "ferry" in cols),
                               (f"ferry vs {REFERENCE}", "ferry" in cols and REFERENCE in cols))
             if want]
    header = ["metric"] + list(cols) + extra
    pad = [""] * len(extra)
    # The full reason is printed under the table and kept in the JSON.
    rows = [["status"] + [("ok" if c["status"] == "ok" else "FAILED")
                          for c in cols.values()] + pad]
    mtls_row = ["inbound refuses no-cert / foreign-CA client"]
    for name, c in cols.items():
        mt = c.get("mtls")
        mtls_row.append("—" if not mt else
                        f"{'yes' if mt['no_cert']['data'] == 0 else 'NO'} / "
                        f"{'yes' if mt['foreign_ca']['data'] == 0 else 'NO'}")
    rows.append(mtls_row + pad)
    tls_row = ["TLS to inbound hop (probe)"]
    for c in cols.values():
        w = (c.get("mtls") or {}).get("with_cert", {})
        tls_row.append(short_tls(w["version"], w["cipher"]) if "cipher" in w else "—")
    rows.append(tls_row + pad)
    if any("hop_tls" in c for c in cols.values()):
        rows.append(["TLS between the hops (the peer's own counters)"]
                    + [c.get("hop_tls", "—") for c in cols.values()] + pad)
    for key, label, better, spec in ROWS:
        cells = [label] + [fmt(c["metrics"].get(key), spec) for c in cols.values()]
        if extra:
            b = ratios["ferry_vs_best"].get(key)
            cells.append("" if better is None else f"{b['ratio']:.2f}× ({b['peer']})" if b else "—")
        if len(extra) == 2:
            r = ratios[VS_FERRY].get(key)
            cells.append("" if better is None else f"{r:.2f}×" if r is not None else "—")
        if any(c != "—" for c in cells[1:1 + len(cols)]):
            rows.append(cells)
    return header, rows


def reference_table(cols: dict, ratios: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every column's comparable figures divided by Envoy's."""
    names = [n for n in cols if n in ratios[VS_ALL]]
    if not names:
        return None
    header = [f"value / {REFERENCE}'s"] + names
    rows = []
    for key, label, better, _spec in ROWS:
        if better is None:
            continue
        cells = [ratios[VS_ALL][n].get(key) for n in names]
        if any(v is not None for v in cells):
            rows.append([label] + [fmt(v, "{:.2f}×") for v in cells])
    return header, rows


# (description, [(metric, op, threshold)], compared against): every ratio is
# ferry's figure over Envoy's, except "floor", ferry's CPU per GB over the
# floor (relay + AES-128-GCM).
TARGETS = [
    ("bulk throughput, 1 stream ≥ 1.25× Envoy", [("bulk1_gbps", ">=", 1.25)], "envoy"),
    ("bulk throughput, 8 streams ≥ 1.25× Envoy", [("bulk8_gbps", ">=", 1.25)], "envoy"),
    ("proxy CPU per GB ≤ 0.8× Envoy (1 and 8 streams)",
     [("cpu_per_gb_1", "<=", 0.8), ("cpu_per_gb_8", "<=", 0.8)], "envoy"),
    ("proxy CPU per GB within 1.2× the floor (1 and 8 streams)",
     [("cpu_floor_ratio_1", "<=", 1.2), ("cpu_floor_ratio_8", "<=", 1.2)], "floor"),
    ("req/s over 32 keep-alive conns ≥ 2× Envoy, p99 ≤ 0.5×",
     [("rr_rps", ">=", 2.0), ("rr_p99_ms", "<=", 0.5)], "envoy"),
    ("new connections/s ≥ 3× Envoy", [("nc_rps", ">=", 3.0)], "envoy"),
    ("idle RSS per process ≤ 0.1× Envoy (each hop)",
     [("rss_idle_out", "<=", 0.1), ("rss_idle_in", "<=", 0.1)], "envoy"),
    ("RSS per held idle conn ≤ 0.5× Envoy (each hop)",
     [("rss_per_conn_out", "<=", 0.5), ("rss_per_conn_in", "<=", 0.5)], "envoy"),
]


def evaluate_targets(cols: dict, ratios: dict) -> list[dict]:
    out = []
    f = cols.get("ferry", {}).get("metrics", {})
    for desc, checks, against in TARGETS:
        got = []
        for key, op, limit in checks:
            v = f.get(key) if against == "floor" else ratios[VS_FERRY].get(key)
            ok = None if v is None else (v >= limit if op == ">=" else v <= limit)
            got.append({"metric": key, "ratio": v, "op": op, "threshold": limit, "ok": ok})
        result = ("not measured" if any(g["ok"] is None for g in got)
                  else "met" if all(g["ok"] for g in got) else "missed")
        out.append({"target": desc, "against": against, "checks": got, "result": result})
    return out


def targets_table(targets: list[dict]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for t in targets:
        # Three decimals: 1.204 must not print as a missed 1.20.
        figures = ", ".join(f"{g['metric']} {fmt(g['ratio'], '{:.3f}×')}" for g in t["checks"])
        rows.append([t["target"], figures, t["result"] if t["result"] != "missed" else "MISSED"])
    return ["target (ferry's figure / Envoy's, or / floor)", "ferry", "result"], rows


# The chart: per workload, each peer's figure against Envoy's.
CHART = [
    ("bulk1_gbps", "bulk, 1 stream"),
    ("bulk8_gbps", "bulk, 8 streams"),
    ("rr_rps", "req/s, 32 keep-alive conns"),
    ("rr_p99_ms", "req/resp latency p99"),
    ("nc_rps", "new connections/s"),
    ("redis_get_ops", "redis GET ops/s"),
    ("redis_set_ops", "redis SET ops/s"),
    ("cpu_per_gb_1", "CPU per GB, 1 stream"),
    ("cpu_per_gb_8", "CPU per GB, 8 streams"),
    ("cpu_per_1k_rr", "CPU per 1,000 requests"),
    ("cpu_per_1k_nc", "CPU per 1,000 new conns"),
    ("rss_idle_total", "idle RSS, both hops"),
    ("rss_per_conn_total", "RSS per held idle conn"),
]
# ferry's target on the chart's scale (times better than Envoy).
CHART_TARGETS = {"bulk1_gbps": 1.25, "bulk8_gbps": 1.25, "rr_rps": 2.0, "rr_p99_ms": 2.0,
                 "nc_rps": 3.0, "cpu_per_gb_1": 1.25, "cpu_per_gb_8": 1.25,
                 "rss_idle_total": 10.0, "rss_per_conn_total": 2.0}
COLORS = {"haproxy": "#1b9e77", "nginx": "#7570b3", "stunnel": "#e7298a",
          "envoy": "#666666", "ferry": "#d95f02"}


def render_svg(doc: dict) -> str:
    """A hand-written SVG of doc (the run's JSON): one group of bars per
    workload, one bar per peer, showing how many times better than Envoy the
    peer is: its figure / Envoy's where higher is better, Envoy's / its
    figure where lower is better. Log scale; the centre line is Envoy."""
    import html
    import math
    better = {r["key"]: r["better"] for r in doc["rows"]}
    vs = doc["ratios"][VS_ALL]
    peers = [p for p in PEERS if p in vs]
    groups = []
    for key, label in CHART:
        bars = []
        for peer in peers:
            r = vs[peer].get(key)
            if r:
                bars.append((peer, r if better.get(key) == "higher" else 1 / r))
        if bars:
            groups.append((key, label, bars))
    env = doc["environment"]
    worst = max((c["metrics"].get("foreign_cpu_pct", 0) for c in doc["columns"].values()),
                default=0)
    noisy = worst > Quiet.THRESHOLD
    values = [v for _, _, bars in groups for _, v in bars] + [1.0]
    values += [CHART_TARGETS[k] for k, _, _ in groups if k in CHART_TARGETS]
    # Whole powers of two, with about an octave beyond the extreme bars for
    # their figures.
    lo = 2.0 ** math.floor(math.log2(max(min(values), 1 / 64)) - 0.9)
    hi = 2.0 ** math.ceil(math.log2(min(max(values), 64)) + 0.9)

    left, plot_w, right, bar_h, gap = 200, 600, 70, 13, 12
    top = 112
    width = left + plot_w + right
    height = top + sum(len(b) * bar_h + gap for _, _, b in groups) + 60

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return left + plot_w * (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" '
           f'font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">ferry and its peers relative '
           f'to {e(REFERENCE.capitalize())}: times better, per workload</text>',
           f'<text x="10" y="38" fill="#333">Right of the centre line: better than '
           f'{e(REFERENCE.capitalize())} by that factor, on a log scale. Higher-is-better '
           f'figures: the peer\'s ÷ {e(REFERENCE.capitalize())}\'s;</text>',
           f'<text x="10" y="52" fill="#333">lower-is-better ones (latency, CPU, memory): '
           f'{e(REFERENCE.capitalize())}\'s ÷ the peer\'s. Dashed: ferry\'s target.</text>',
           f'<text x="10" y="66" fill="#333">{e(env.get("date", ""))} · '
           f'{e(env.get("command", ""))} · {env.get("duration_s", "?")} s per workload · '
           f'proxies pinned to one CPU</text>']
    if noisy:
        out.append(f'<text x="10" y="82" fill="#b00000" font-weight="bold">Noisy run: other '
                   f'tasks took up to {worst:.0f}% of a CPU during a workload; read as a '
                   f'smoke test, not as figures.</text>')
    # Legend.
    lx = left
    for peer in peers:
        out.append(f'<rect x="{lx}" y="{top - 18}" width="10" height="10" '
                   f'fill="{COLORS.get(peer, "#999")}"/>')
        out.append(f'<text x="{lx + 14}" y="{top - 9}">{e(peer)}</text>')
        lx += 14 + 8 * len(peer) + 16
    out.append(f'<line x1="{lx}" y1="{top - 13}" x2="{lx + 14}" y2="{top - 13}" stroke="black" '
               f'stroke-dasharray="3,2"/><text x="{lx + 18}" y="{top - 9}">ferry\'s target</text>')
    lx += 18 + 90
    out.append(f'<line x1="{lx + 5}" y1="{top - 19}" x2="{lx + 5}" y2="{top - 7}" stroke="black" '
               f'stroke-width="1.5"/><text x="{lx + 12}" y="{top - 9}">'
               f'{e(REFERENCE.capitalize())} = 1×</text>')
    # Grid and axis.
    y_end = height - 44
    v = lo
    while v <= hi * 1.0001:
        gx = x(v)
        label = f"{v:g}×" if v >= 1 else f"1/{1 / v:g}"
        out.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{y_end}" '
                   f'stroke="{"#000" if v == 1 else "#ddd"}" stroke-width="{1.5 if v == 1 else 1}"/>')
        out.append(f'<text x="{gx:.1f}" y="{y_end + 14}" text-anchor="middle">{label}</text>')
        v *= 2
    out.append(f'<text x="{x(1.0):.1f}" y="{y_end + 30}" text-anchor="middle" fill="#333">'
               f'{e(REFERENCE.capitalize())} = 1×   ← worse · better →</text>')
    y = top + 4
    for key, label, bars in groups:
        gh = len(bars) * bar_h
        out.append(f'<text x="{left - 8}" y="{y + gh / 2 + 4:.1f}" text-anchor="end">'
                   f'{e(label)}</text>')
        for peer, v in bars:
            x0, x1 = sorted((x(1.0), x(v)))
            out.append(f'<rect x="{x0:.1f}" y="{y + 1}" width="{max(x1 - x0, 1):.1f}" '
                       f'height="{bar_h - 2}" fill="{COLORS.get(peer, "#999")}">'
                       f'<title>{e(peer)} {e(label)}: {v:.2f}× vs {e(REFERENCE)}</title></rect>')
            tx, anchor = (x1 + 3, "start") if v >= 1 else (x0 - 3, "end")
            if peer == "ferry" and key in CHART_TARGETS:
                mx = x(CHART_TARGETS[key])
                out.append(f'<line x1="{mx:.1f}" y1="{y - 1}" x2="{mx:.1f}" y2="{y + bar_h + 1}" '
                           f'stroke="black" stroke-width="1.5" stroke-dasharray="3,2"/>')
            # A white halo keeps the figure readable across a target mark.
            out.append(f'<text x="{tx:.1f}" y="{y + bar_h - 3}" text-anchor="{anchor}" '
                       f'font-size="9.5" stroke="white" stroke-width="3" paint-order="stroke">'
                       f'{e(peer)} {v:.2f}×</text>')
            y += bar_h
        y += gap
        out.append(f'<line x1="{left - 190}" y1="{y - gap / 2:.1f}" x2="{left + plot_w}" '
                   f'y2="{y - gap / 2:.1f}" stroke="#eee"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def floor_summary(cols: dict, aes: dict | None) -> list[str]:
    relay = cols.get(RELAY, {}).get("metrics", {})
    out = []
    for streams in (1, 8):
        floor = relay.get(f"cpu_floor_gb_{streams}")
        if floor is None:
            continue
        line = (f"{streams} stream{'s' if streams > 1 else ''}: relay "
                f"{relay[f'cpu_per_gb_{streams}']:.3f} s/GB + AES-128-GCM {aes['s_per_gb']:.3f} "
                f"s/GB (one encryption at {aes['encrypt_bytes_per_cpu_s'] / 1e9:.2f} GB/s, one "
                f"decryption at {aes['decrypt_bytes_per_cpu_s'] / 1e9:.2f} GB/s per CPU "
                f"second) = {floor:.3f} s/GB")
        f = cols.get("ferry", {}).get("metrics", {}).get(f"cpu_floor_ratio_{streams}")
        if f is not None:
            line += f"; ferry {f:.2f}× the floor"
        out.append(line)
    return out


def problems(cols: dict) -> list[str]:
    out = []
    for name, c in cols.items():
        if c["status"] != "ok":
            out.append(f"{name}: {c['status']}")
        out += [f"{name} {k}: {v}" for k, v in c["errors"].items()]
    return out


def render_text(header, rows) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in rows])


def render_md(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def cmd_out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment(args, nofile: int, hold_why: str) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pkgs = {}
    for p in ("haproxy", "nginx", "libnginx-mod-stream", "stunnel4", "iperf3", "wrk",
              "redis-server", "redis-tools", "libssl3"):
        pkgs[p] = cmd_out(["dpkg-query", "-W", "-f", "${Version}", p]) or "not installed"
    # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    envoy = cmd_out([str(ENVOY), "--version"]) if ENVOY.exists() else ""
    m = re.search(r"version: (\S+)", envoy)
    pkgs["envoy"] = m.group(1) if m else "not installed"
    lock = (REPO / "Cargo.lock").read_text()
    rustls = re.search(r'name = "rustls"\nversion = "([^"]+)"', lock)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "packages": pkgs,
        "openssl": cmd_out(["openssl", "version"]),
        "ferry": cmd_out([str(FERRY), "--version"]),
        "ferry_git": cmd_out(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "rustls": rustls.group(1) if rustls else "unknown",
        "command": os.environ.get("COMPARE_ENTRY") or shlex.join([sys.executable, *sys.argv]),
        "duration_s": args.duration,
        "hold": args.hold,
        "hold_why": hold_why,
        "nofile_hard": nofile,
        "pinning": f"proxies on CPU {PROXY_CPU}; load generators and backends on CPU {LOAD_CPU}",
        "envoy_binary": str(ENVOY),
        "redis_requests": args.redis_requests,
    }


NOTES = [
    "All peers: the same ferry-made certificates (EC P-256), TLS 1.3 only, mutual; "
    "inbound requires a client cert chaining to the dev CA, outbound presents web's "
    "leaf and verifies the server chain. haproxy, nginx and stunnel check the chain "
    "only. Envoy is configured as Consul configures a sidecar (peers/envoy-*.yaml): "
    "its outbound cluster sends Consul's SNI and matches api's SPIFFE URI, its "
    "inbound RBAC filter allows web's SPIFFE ID by regex. ferry checks the SPIFFE "
    "identity on both sides and the intentions on every inbound connection.",
    "nginx always checks the upstream certificate's host name, so its inbound hop "
    "presents a copy of api's leaf (same key, same CA) with an added DNS SAN.",
    "Client-side TLS session reuse as each peer does by default (nginx "
    "proxy_ssl_session_reuse on; Envoy keeps one session per cluster). "
    "Per-connection logging off everywhere.",
    "One process per hop, one worker each (haproxy nbthread 1, nginx "
    "worker_processes 1, stunnel's default threads, Envoy --concurrency 1 "
    "--disable-hot-restart, ferry sized by its CPU mask); nginx RSS includes "
    "master + worker.",
    "Envoy pinned to TLS 1.3 on both ends: Consul leaves the client side's versions "
    "unset and Envoy's client default is TLS 1.2 at most, so a stock Consul sidecar "
    "dials with TLS 1.2. Key exchange pinned to X25519 (newer Consul offers "
    "X25519MLKEM768 first). Its circuit breakers are raised above the default 1,024 "
    "connections for the held-connections test.",
    "CPU = utime+stime of both hops' processes (all threads) over the workload; "
    "RSS per held conn = (RSS with N held - RSS before) / N.",
    "haproxy, nginx and stunnel use the system OpenSSL (libssl3 above); Envoy its "
    "BoringSSL; ferry rustls with the ring provider. Key exchange is X25519 "
    "everywhere. The OpenSSL peers negotiate TLS_AES_256_GCM_SHA384 between their "
    "hops (OpenSSL's default order); Envoy's and ferry's hops negotiate "
    "TLS_AES_128_GCM_SHA256 (BoringSSL's order, which ferry offers too). The probe "
    "row shows each inbound hop's choice for a default OpenSSL client; Envoy's own "
    "counters give what its two hops negotiated.",
    "Floor for CPU per GB: the column 'relay' is two haproxy hops in TCP mode without "
    "TLS, pinned like the peers; to its CPU per GB the floor adds one AES-128-GCM "
    "encryption and one decryption per byte at the rate openssl speed (16 KiB "
    "buffers, on the proxies' CPU, per CPU second) measured in the same run.",
    "redis: redis-benchmark -c 20 -t get,set with a fixed request count through each "
    "chain to one redis-server on the load CPU, and straight to it (plain); 'vs "
    "direct' is the chain's ops/s over the direct connection's.",
    "Ratios: 'ferry vs best peer' takes the best of haproxy, nginx, stunnel and "
    "Envoy for each figure; 'ferry vs envoy' and the second table divide by Envoy's "
    "figure. Targets are judged on those ratios.",
    "Last row: CPU time that tasks outside the benchmark (and hypervisor steal) took "
    "on the two benchmark CPUs during the worst workload of each column. Above 10% "
    "the machine was busy and that column's numbers are suspect.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)} (default: all)")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the no-proxy baseline column")
    ap.add_argument("--duration", type=int, default=None,
                    help="seconds per workload (default 5; 1 with --quick)")
    ap.add_argument("--hold", type=int, default=None,
                    help="idle connections to hold for the per-connection memory test "
                         "(default: as many as the fd limit allows, at most 10000; "
                         "0 skips the test)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 s workloads, 500 held connections, 10,000 redis "
                         "requests per test")
    ap.add_argument("--redis-requests", type=int, default=None,
                    help="requests per redis-benchmark test (GET, SET) through each chain "
                         "(default 50000; 10000 with --quick; 0 skips redis)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the CPU-per-GB floor (plain relay + AES-128-GCM)")
    ap.add_argument("--svg", metavar="JSON",
                    help="only (re)draw the chart of an earlier run's JSON, next to it")
    ap.add_argument("--quiet-budget", type=float, default=None,
                    help="seconds the whole run may spend waiting for a busy machine to "
                         "quiet down and rerunning disturbed workloads (default 60; 10 "
                         "with --quick)")
    ap.add_argument("--retries", type=int, default=1,
                    help="reruns of a workload disturbed by other tasks (default 1)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary directory (configs, logs) for debugging")
    args = ap.parse_args()

    if args.svg:
        src = Path(args.svg)
        dest = src.with_suffix(".svg")
        dest.write_text(render_svg(json.loads(src.read_text())))
        print(f"wrote {dest}")
        return 0

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {bad}; choose from {PEERS}")
    if args.duration is None:
        args.duration = 1 if args.quick else 5
    if args.quiet_budget is None:
        args.quiet_budget = 10.0 if args.quick else 60.0
    if args.redis_requests is None:
        args.redis_requests = 10000 if args.quick else 50000
    if args.duration < 1:
        ap.error("--duration must be at least 1")

    # Raise our own fd limit to the hard limit: the held-connections client
    # holds N sockets, and children (load generators, proxies) inherit it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hold_max = min(HOLD_MAX, (hard - FD_RESERVE) // 2)
    hold_why = (f"N = min({HOLD_MAX}, (hard nofile {hard} - {FD_RESERVE}) // 2) = {hold_max}: "
                "each proxy hop holds 2 fds per connection")
    if args.hold is None and args.quick:
        args.hold = min(500, hold_max)
        hold_why += f"; --quick holds {args.hold}"
    elif args.hold is None:
        args.hold = hold_max
    elif args.hold > hold_max:
        hold_why += f"; --hold {args.hold} capped to {hold_max}"
        args.hold = hold_max
    else:
        hold_why += f"; --hold {args.hold} given"

    global LOAD_CPU, PROXY_CPU
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2 or not {PROXY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(f"warning: CPUs {PROXY_CPU} and {LOAD_CPU} are not both available; "
              "proxies and load share a CPU, numbers are not comparable to a pinned run",
              file=sys.stderr)
        LOAD_CPU = PROXY_CPU = min(os.sched_getaffinity(0))
    # This script is the held-connections client and samples /proc: keep it
    # off the proxies' CPU.
    os.sched_setaffinity(0, {LOAD_CPU})

    tools = ["iperf3", "wrk", "nginx", "openssl", "taskset", "prlimit"]
    tools += ["haproxy"] if not args.no_floor else []
    tools += ["redis-server", "redis-benchmark"] if args.redis_requests else []
    for tool in tools:
        if not shutil.which(tool):
            print(f"missing {tool}: run bench/compare.sh, which installs it", file=sys.stderr)
            return 2
    if not FERRY.exists():
        print(f"missing {FERRY}: cargo build --release", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP unwind through the finally below like Ctrl-C does.
    def _exit(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)

    env = environment(args, hard, hold_why)
    print(f"date     {env['date']}\nkernel   {env['kernel']}\ncpu      {env['cpu_model']} "
          f"({env['cpus']} CPUs; {env['pinning']})")
    print("packages " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    print(f"ferry    {env['ferry']} (git {env['ferry_git']}, rustls {env['rustls']}); "
          f"{env['openssl']}")
    print(f"command  {env['command']}")
    print(f"workloads {args.duration}s each; held connections: {hold_why}", flush=True)

    columns = (([] if args.no_plain else ["plain"]) + ([] if args.no_floor else [RELAY])
               + [p for p in PEERS if p in peers])
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ferry-compare-"))
    ctx = Context(args, work, hard)
    cols: dict[str, dict] = {}
    try:
        try:
            ctx.certs = make_certs(work)
            ctx.start_backends(columns)
        except (StartError, WorkloadError, OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", None)
            print(f"setup failed: {e}{': ' + err.decode(errors='replace') if err else ''}",
                  file=sys.stderr)
            return 2
        for name in columns:
            cols[name] = run_column(ctx, name)
    finally:
        ctx.procs.stop_all()
        if args.keep_temp:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    wall = time.monotonic() - t_start
    env["wall_seconds"] = round(wall, 1)
    env["quiet_waited_s"] = ctx.quiet.waited
    env["reruns"] = ctx.quiet.reruns
    finish_metrics(cols, ctx.aes)
    ratios = compute_ratios(cols)
    targets = evaluate_targets(cols, ratios) if "ferry" in cols and REFERENCE in cols else []
    header, rows = table(cols, ratios)
    ref_table = reference_table(cols, ratios)
    floor_lines = floor_summary(cols, ctx.aes)
    print()
    print(render_text(header, rows))
    if ref_table:
        print(f"\nEvery column relative to {REFERENCE} (its value / {REFERENCE}'s; "
              "below 1 is better where lower is better):\n")
        print(render_text(*ref_table))
    if targets:
        print()
        print(render_text(*targets_table(targets)))
    print()
    for line in floor_lines:
        print("floor: " + line)
    for line in problems(cols):
        print("! " + line)
    for n in NOTES:
        print("* " + n)
    disturbed = [n for n, c in cols.items()
                 if c["metrics"].get("foreign_cpu_pct", 0) > Quiet.THRESHOLD]
    if disturbed:
        print(f"\nwarning: tasks outside the benchmark (or steal) used more than "
              f"{Quiet.THRESHOLD:.0f}% of a CPU during a workload of {', '.join(disturbed)}: "
              "the machine was busy, so those numbers are suspect; rerun on a quiet machine")
    print(f"\nwall time {wall:.0f}s (waited {ctx.quiet.waited:.0f}s for a quiet machine, "
          f"{ctx.quiet.reruns} disturbed workload(s) rerun)")

    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    jpath, mpath, spath = (results / f"compare-{stamp}.{ext}" for ext in ("json", "md", "svg"))
    doc = {"environment": env, "notes": NOTES,
           "rows": [{"key": k, "label": l, "better": b} for k, l, b, _ in ROWS],
           "columns": cols, "floor": {"aes": ctx.aes, "summary": floor_lines},
           "ratios": ratios, "targets": targets}
    jpath.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = [f"# ferry vs peers, {env['date']}", "",
          f"- Kernel {env['kernel']}, {env['cpu_model']}, {env['cpus']} CPUs; {env['pinning']}.",
          "- Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".",
          f"- ferry: {env['ferry']} (git {env['ferry_git']}), rustls {env['rustls']}; "
          f"{env['openssl']}.",
          f"- Command: `{env['command']}`; {args.duration} s per workload; wall time "
          f"{wall:.0f} s ({ctx.quiet.waited:.0f} s waiting for a quiet machine, "
          f"{ctx.quiet.reruns} disturbed workload(s) rerun).",
          f"- Held connections: {hold_why}.", "",
          render_md(header, rows), ""]
    if ref_table:
        md += [f"Every column relative to {REFERENCE} (its value / {REFERENCE}'s):", "",
               render_md(*ref_table), ""]
    if targets:
        md += ["Targets:", "", render_md(*targets_table(targets)), ""]
    md += [f"- Floor: {x}" for x in floor_lines]
    # Multi-line reasons (a peer's startup log) would break the list.
    md += [f"- Problem: {' / '.join(x.splitlines())}" for x in problems(cols)]
    md += [f"- {n}" for n in NOTES]
    mpath.write_text("\n".join(md) + "\n")
    written = [jpath, mpath]
    if ratios[VS_ALL]:
        spath.write_text(render_svg(doc))
        written.append(spath)
    for path in written:
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0 if all(c["status"] == "ok" and not c["errors"] for c in cols.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # main's finally has already stopped every process and removed the temp dir.
        print("\ninterrupted: every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)
