"""The kernel's networking, by its commands (ip, tc, nft, sysctl): namespaces, veth, bridges, tbf.

Only names this module made are ever touched: every namespace is `pgl<pid>x<tag>-<name>`, where
<pid> is the process that made it.  `sweep()` deletes the namespaces of that family whose maker
is dead (a test run killed before its cleanup), never one whose maker still runs, so labs of
concurrent test runs do not disturb each other.  Deleting a namespace deletes the veth ends and
qdiscs inside it, so namespaces are the only thing to clean up.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

FAMILY = "pgl"  # every namespace of a lab starts with this
_NAME = re.compile(rf"^{FAMILY}(\d+)x[0-9a-f]+-")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 20.0  # seconds any single ip/tc command may take


class LabError(RuntimeError):
    """A kernel command failed: its command line and what it printed."""


def new_prefix() -> str:
    """A namespace-name prefix no other lab uses: this process's pid and a random tag."""
    return f"{FAMILY}{os.getpid()}x{uuid.uuid4().hex[:6]}-"


def run(*argv: str, netns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    """Run an `ip`, `tc`, `nft` or `sysctl` command, inside `netns` when given; its stdout."""
    if netns is None:
        cmd = list(argv)
    elif argv[0] == "ip":
        cmd = ["ip", "-n", netns, *argv[1:]]
    else:
        cmd = ["ip", "netns", "exec", netns, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, input=stdin)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


@functools.cache
def missing() -> str | None:
    """Why this machine cannot host a lab (for a skip reason), or None when it can (asked once)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_SYS_ADMIN (run as root)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables"), ("sysctl", "procps")):
        if not shutil.which(tool):
            return f"no `{tool}` command (apt-get install {package})"
    probe = new_prefix() + "probe"
    try:
        run("ip", "netns", "add", probe)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", netns=probe)
        run(
            "tc",
            "qdisc",
            "add",
            "dev",
            "v0",
            "root",
            "tbf",
            "rate",
            "1mbit",
            "burst",
            "32kb",
            "latency",
            "50ms",
            netns=probe,
        )
        run("nft", "add", "table", "bridge", "probe", netns=probe)
        return None
    except LabError as exc:
        return f"veth, the tbf qdisc or nftables' bridge family is missing in this kernel: {exc}"
    finally:
        delete_netns(probe)


def add_netns(netns: str) -> None:
    """A new network namespace, IPv4 only: IPv6's own chatter (neighbour discovery, multicast
    listener reports) would otherwise show up in the links' byte counters."""
    run("ip", "netns", "add", netns)
    for scope in ("all", "default"):
        run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1", netns=netns)


def namespaces() -> list[str]:
    """Every named network namespace on the machine."""
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def wait_inside(pid: int, netns: str, timeout: float = 10.0) -> None:
    """Return once process `pid` is inside `netns` (or has exited).

    `ip netns exec` enters the namespace after it was started, then execs the command: until
    then the process is still in ours, and a caller that looks at once may not find it there.
    """
    want = os.stat(NETNS_DIR / netns).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == want:
                return
        except FileNotFoundError:
            return  # exited: its log says why
        time.sleep(0.005)
    raise RuntimeError(f"process {pid} did not enter network namespace {netns} within {timeout:.0f}s")


def pids(netns: str) -> list[int]:
    """The processes inside a namespace (`ip netns pids`)."""
    out = run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in out.split()]


def kill_all(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process inside the namespace and wait (bounded) until none is left."""
    deadline = time.monotonic() + timeout
    # Never this process: a thread of ours may have entered the namespace (call_in).
    while (left := [p for p in pids(netns) if p != os.getpid()]) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete_netns(netns: str) -> None:
    """Kill what runs inside, then delete the namespace (and with it its links and qdiscs)."""
    if netns not in namespaces():
        return
    kill_all(netns)
    run("ip", "netns", "del", netns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(prefix: str | None = None) -> list[str]:
    """Delete leftovers: the namespaces of `prefix`, or of every lab whose maker is dead; their names."""
    gone = []
    for name in namespaces():
        match = _NAME.match(name)
        if not match:
            continue  # not ours
        if (prefix and name.startswith(prefix)) or (not prefix and not _alive(int(match.group(1)))):
            delete_netns(name)
            gone.append(name)
    return gone


_libc = ctypes.CDLL(None, use_errno=True)


def call_in(netns: str, fn, *args, timeout: float | None = None):
    """fn(*args) on a new thread that has entered the namespace: the sockets it opens live there.

    A network namespace is a per-thread attribute (setns(2)), so this process's other threads,
    and everything it started before, stay where they are."""
    result: dict = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"{getattr(fn, '__name__', fn)} inside {netns} did not finish within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")
