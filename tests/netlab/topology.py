"""Hosts, links and sites as a deployment draws them, built from network namespaces on this machine.

    with Lab(tmp_path) as lab:
        hub = lab.host("hub")                          # in the data centre: no limit
        w0 = lab.host("w0", rate="100mbit")            # a worker host behind a 100 Mbit/s link
        east = lab.site("east", rate="50mbit")         # a site: its own LAN behind one 50 Mbit/s link
        leaf, w1 = east.host("leaf"), east.host("w1")
        proc = w0.spawn("worker", [sys.executable, "-m", "pangea", "worker"], env)
        w0.cut(); w0.heal(); w0.kill()                 # a partition, its end, the host's loss
        w0.link.unplug(); w0.heal()                    # a pulled cable: w0's kernel sees it
        lab.traffic()["w0"].up                         # bytes the kernel counted on w0's link

How it is made: the hub is a switch (a Linux bridge in a namespace of its own).  Every host is a
namespace whose `eth0` is one end of a veth pair; the other end is a port of the switch.  A site
is a second switch whose uplink is a veth pair into the hub's switch, its hosts on its own
ports.  All hosts share one private subnet (10.99.0.0/24) that exists only inside these
namespaces: no host has a default route, and nothing here is connected to the machine's own
network, so no packet can leave the lab.

A link's rate is a `tbf` qdisc on both of its ends (each limits the direction it sends), so it
holds for any TCP traffic (nats-server's, gloo's).  A cut is a partition: the switch drops every
frame the link would carry, either way (an nftables set in the bridge family), so both ends keep
their carrier, their addresses and their sockets, and learn of nothing but silence, as when a
WAN fails in the middle; a heal empties the set and TCP retransmits what was waiting, at its
next backed-off timer.  `unplug()` instead takes the hub-side end down: the far end's carrier
drops, which its own kernel notices.  Latency is
not modelled (this kernel has no netem).  Byte counts are the kernel's counters of the hub-side
end (`ip -s link`): what actually crossed the link, Ethernet headers included.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.netlab import kernel

CUT_RULES = """
table bridge lab {
    set cut { type ifname; }
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname @cut drop
        oifname @cut drop
    }
}
"""
SUBNET = "10.99.0"  # /24, private, inside the lab's namespaces only
TBF_LATENCY = "50ms"  # the queue a rate limit keeps before it drops: a router's buffer
HZ = 250  # this kernel's timer frequency: tbf needs a bucket of at least rate/HZ to reach its rate


@dataclass(frozen=True)
class Traffic:
    """Bytes that crossed a link: `up` from the host (or site) to the hub, `down` back."""

    up: int
    down: int

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.up - other.up, self.down - other.down)

    @property
    def total(self) -> int:
        return self.up + self.down


def rate_bits(rate: str) -> int:
    """'100mbit', '1gbit', '512kbit' -> bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not match:
        raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 50mbit or 1gbit")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)])


class Link:
    """One veth pair: `near` is the end in the hub's switch, `far` the host's (or site's) end."""

    def __init__(self, name: str, near: tuple[str, str], far: tuple[str, str], rate: str | None) -> None:
        self.name, self.near, self.far = name, near, far
        self.rate: str | None = None
        self.is_cut = False
        if rate:
            self.limit(rate)

    def limit(self, rate: str) -> None:
        """Cap both directions at `rate` (tc syntax: 50mbit, 1gbit)."""
        burst = max(rate_bits(rate) // 8 // HZ, 64 * 1024)  # at least one GSO segment
        for netns, dev in (self.near, self.far):
            kernel.run(
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                TBF_LATENCY,
                netns=netns,
            )
        self.rate = rate

    def cut(self) -> None:
        """Partition: every frame either way is dropped inside the switch, silently, as on a WAN
        that fails somewhere in the middle: both ends keep their carrier, and their TCP backs off."""
        kernel.run("nft", "add", "element", "bridge", "lab", "cut", f'{{ "{self.near[1]}" }}', netns=self.near[0])
        self.is_cut = True

    def unplug(self) -> None:
        """Pull the far end's cable: its carrier drops, so its own kernel knows (and keeps retrying
        every half second instead of backing off); nothing crosses either way."""
        kernel.run("ip", "link", "set", "dev", self.near[1], "down", netns=self.near[0])
        self.is_cut = True

    def heal(self) -> None:
        """Undo a cut or an unplug."""
        netns, dev = self.near
        kernel.run("nft", "delete", "element", "bridge", "lab", "cut", f'{{ "{dev}" }}', netns=netns, check=False)
        kernel.run("ip", "link", "set", "dev", dev, "up", netns=netns)
        self.is_cut = False

    def traffic(self) -> Traffic:
        """The kernel's byte counters of the link so far."""
        netns, dev = self.near
        stats = json.loads(kernel.run("ip", "-s", "-j", "link", "show", "dev", dev, netns=netns))[0]["stats64"]
        return Traffic(up=stats["rx"]["bytes"], down=stats["tx"]["bytes"])


class Process:
    """A process started on a host (`ip netns exec`, which execs: the pid is the program's)."""

    def __init__(self, host: Host, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.host, self.name, self.popen, self.log_path = host, name, popen, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Host:
    """A machine: its own network namespace, one address, one link (`eth0`) to its switch."""

    ifname = "eth0"

    def __init__(self, lab: Lab, name: str, address: str, netns: str, link: Link) -> None:
        self.lab, self.name, self.address, self.netns, self.link = lab, name, address, netns, link
        self.processes: list[Process] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Process:
        """Start argv on this host (inside its namespace when this returns); stdout and stderr go
        to <lab dir>/<host>-<name>.log."""
        log = self.lab.dir / f"{self.name}-{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        kernel.wait_inside(popen.pid, self.netns)  # on this host once spawn returns
        proc = Process(self, name, popen, log)
        self.processes.append(proc)
        return proc

    def call(self, fn, *args, timeout: float | None = 120):
        """fn(*args) in this process, on a thread inside this host's network (its sockets are here)."""
        return kernel.call_in(self.netns, fn, *args, timeout=timeout)

    def cut(self) -> None:
        self.link.cut()

    def heal(self) -> None:
        self.link.heal()

    def kill(self) -> None:
        """Lose the host: SIGKILL every process on it at once (its link stays as it is)."""
        kernel.kill_all(self.netns)
        for proc in self.processes:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __repr__(self) -> str:
        return f"Host({self.name} {self.address}, link {self.link.rate or 'unlimited'})"


class Switch:
    """A Linux bridge in a namespace of its own: what hosts and sites plug into."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._ports = 0
        kernel.add_netns(netns)
        kernel.run("ip", "link", "add", "br0", "type", "bridge", netns=netns)
        kernel.run("ip", "link", "set", "br0", "up", netns=netns)
        # Cut links are the ports in the set `cut`: the bridge drops what they send or would receive.
        kernel.run("nft", "-f", "-", netns=netns, stdin=CUT_RULES)

    def plug(self, name: str, far_netns: str, far_dev: str, rate: str | None) -> Link:
        """A new port, wired by a veth pair to `far_dev` in `far_netns`; the Link."""
        port = f"p{self._ports}"
        self._ports += 1
        kernel.run(
            "ip", "link", "add", port, "type", "veth", "peer", "name", far_dev, "netns", far_netns, netns=self.netns
        )
        kernel.run("ip", "link", "set", port, "master", "br0", "up", netns=self.netns)
        kernel.run("ip", "link", "set", far_dev, "up", netns=far_netns)
        return Link(name, (self.netns, port), (far_netns, far_dev), rate)


class Site:
    """A site: its own switch (its LAN), joined to the hub's switch by one link (its WAN)."""

    def __init__(self, lab: Lab, name: str, link: Link, switch: Switch) -> None:
        self.lab, self.name, self.link, self.switch = lab, name, link, switch

    def host(self, name: str, rate: str | None = None) -> Host:
        """A host on the site's LAN (`rate`: its own LAN link; none by default)."""
        return self.lab._add_host(name, self.switch, rate)

    def cut(self) -> None:
        self.link.cut()

    def heal(self) -> None:
        self.link.heal()


class Lab:
    """Every host, switch and site of one test or benchmark; `close()` removes all of it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = kernel.new_prefix()
        kernel.sweep()  # namespaces left by labs whose process died before cleaning up
        self.hosts: dict[str, Host] = {}
        self.sites: dict[str, Site] = {}
        self._next_address = 1
        try:
            self.hub = Switch(self.prefix + "sw-hub")
        except BaseException:
            self.close()
            raise

    def host(self, name: str, rate: str | None = None) -> Host:
        """A host on the hub's switch, behind a link of `rate` (None: no limit)."""
        return self._add_host(name, self.hub, rate)

    def site(self, name: str, rate: str | None = None) -> Site:
        """A site whose LAN reaches the hub through one link of `rate`."""
        if name in self.sites:
            raise ValueError(f"site {name} exists")
        switch = Switch(self.prefix + f"sw-{name}")
        link = self.hub.plug(f"site {name}", switch.netns, "up0", rate)
        kernel.run("ip", "link", "set", "up0", "master", "br0", netns=switch.netns)
        self.sites[name] = site = Site(self, name, link, switch)
        return site

    def _add_host(self, name: str, switch: Switch, rate: str | None) -> Host:
        if name in self.hosts or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name) or name.startswith("sw-"):
            raise ValueError(f"host name {name!r}: taken, not [a-z0-9-], or a switch's (sw-*)")
        if self._next_address > 254:
            raise ValueError("the lab's /24 is full")
        netns = self.prefix + name
        kernel.add_netns(netns)
        kernel.run("ip", "link", "set", "lo", "up", netns=netns)
        link = switch.plug(name, netns, Host.ifname, rate)
        address = f"{SUBNET}.{self._next_address}"
        self._next_address += 1
        kernel.run("ip", "addr", "add", f"{address}/24", "dev", Host.ifname, netns=netns)
        self.hosts[name] = host = Host(self, name, address, netns, link)
        return host

    def links(self) -> dict[str, Link]:
        """Every link by name: a host's is its name, a site's uplink `site <name>`."""
        return {
            **{h.link.name: h.link for h in self.hosts.values()},
            **{s.link.name: s.link for s in self.sites.values()},
        }

    def traffic(self) -> dict[str, Traffic]:
        """Every link's byte counters now (subtract two of these for what a run sent)."""
        return {name: link.traffic() for name, link in self.links().items()}

    def close(self) -> None:
        """Kill every process of the lab and delete every namespace it made, with their links."""
        for host in self.hosts.values():
            host.kill()
        kernel.sweep(self.prefix)
        left = [n for n in kernel.namespaces() if n.startswith(self.prefix)]
        if left:
            raise kernel.LabError(f"namespaces left behind: {', '.join(left)}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
