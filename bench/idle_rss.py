#!/usr/bin/env python3
"""Idle RSS of ferry binaries side by side, in one run.

Starts each binary in flag mode as an inbound sidecar (dev certificates,
`-listen`, `-service-addr`) on loopback, waits until it accepts, lets it
settle, and reads VmRSS, RssFile and RssAnon from /proc/<pid>/status. The
binaries take turns, ROUNDS times, so machine noise hits all of them alike;
the medians are printed, with each binary's difference from the first.

    python3 bench/idle_rss.py [--rounds 7] NAME=PATH [NAME=PATH ...]

Example (is xDS mode's code out of flag mode's binary?):

    cargo build --release --no-default-features --bin ferry
    cp target/release/ferry /tmp/ferry-noxds
    cargo build --release
    python3 bench/idle_rss.py noxds=/tmp/ferry-noxds ferry=target/release/ferry
"""

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTLE_S = 2.0  # after the first accept: jemalloc's background thread starts
DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssFile", "RssAnon"):
            out[key] = int(val.split()[0])
    return out


def wait_accepting(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the proxy exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on 127.0.0.1:{port} after {DEADLINE_S} s")


def sample(binary: str, certs: Path) -> dict[str, int]:
    listen, app = free_port(), free_port()
    proc = subprocess.Popen(
        [binary, "-service", "api", "-listen", f"127.0.0.1:{listen}",
         "-service-addr", f"127.0.0.1:{app}", "-certs", str(certs),
         "-allow", "web", "-default-deny", "-log-level", "error"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_accepting(listen, proc)
        time.sleep(SETTLE_S)
        return status(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("binaries", nargs="+", metavar="NAME=PATH")
    args = ap.parse_args()
    named = [b.split("=", 1) for b in args.binaries]
    if any(len(n) != 2 for n in named):
        sys.exit("each binary is NAME=PATH")
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run([named[0][1], "certs", "-dir", str(certs), "web", "api"],
                       check=True, stdout=subprocess.DEVNULL)
        runs: dict[str, list[dict[str, int]]] = {n: [] for n, _ in named}
        for _ in range(args.rounds):
            for name, path in named:
                runs[name].append(sample(path, certs))
    base = None
    print(f"median of {args.rounds} rounds (MiB): VmRSS  RssFile  RssAnon  VmRSS vs {named[0][0]}")
    for name, _ in named:
        med = {k: statistics.median(r[k] for r in runs[name]) / 1024
               for k in ("VmRSS", "RssFile", "RssAnon")}
        base = base or med["VmRSS"]
        print(f"  {name:>12}: {med['VmRSS']:6.2f} {med['RssFile']:8.2f} {med['RssAnon']:8.2f}"
              f"  {med['VmRSS'] - base:+.2f}")


if __name__ == "__main__":
    main()
