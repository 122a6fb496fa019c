"""Pangea on hosts and links: every role on its own host (a network namespace), rate-limited links,
partitions, lost hosts, sites behind NATS leaf nodes, a NATS cluster with a node per host.

The lab (tests/netlab) needs root, iproute2 and the tbf qdisc; without them every test here
skips and says what is missing.  Only the lab's own check runs by default; the deployments are
slow tests.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pangea.bus import subjects
from pangea.train import plans
from tests.cluster import _wait_for as wait_on_bus
from tests.cluster import metrics
from tests.netlab import Lab, LabError, kernel, unavailable
from tests.netlab import nats as labnats
from tests.netlab.roles import Job
from tests.yardstick import assert_exact, assert_verified, reference

LINK = "100mbit"
TTL, BEAT = 3.0, 0.5  # PANGEA_MEMBER_TTL and the heartbeat period of every lab job


@pytest.fixture
def needs_lab() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(f"no network lab on this machine: {reason}")


@pytest.fixture
def lab(needs_lab, tmp_path):
    with Lab(tmp_path / "lab") as lab:
        yield lab


@pytest.fixture
def job_name() -> str:
    return f"lab-{uuid.uuid4().hex[:8]}"


def wait_until(host, nats_url: str, job: str, condition, what: str, timeout: float = 240) -> int:
    """Block until the job's last finished round (as read by a client on `host`) meets `condition`."""
    return host.call(lambda: asyncio.run(wait_on_bus(nats_url, job, condition, what, timeout)), timeout=timeout + 30)


def finish(job: Job, timeout: float = 400) -> None:
    """Wait for the orchestrator to end the job; it and every other role must exit 0."""
    assert job.wait("orchestrator", timeout) == 0, job.roles["orchestrator"].log()[-3000:]
    for name in job.roles:
        code = job.wait(name, 60)
        assert code == 0, f"{name} exited {code}: {job.roles[name].log()[-3000:]}"


def deadline_waits(m: dict, worker: str | None = None) -> list[int]:
    """Rounds that waited out a deadline (for `worker`'s shard, when given): the orchestrator then
    quarantines the shard's owner, and re-issues the shard if another worker can take it."""

    def cites(e: dict) -> bool:
        if e["kind"] == "reassign":
            return f" of {worker or ''}" in e["detail"] and "(missed the deadline)" in e["detail"]
        return (
            e["kind"] == "quarantine" and e["detail"].startswith(worker or "") and "missed the deadline" in e["detail"]
        )

    return sorted({e["round"] for e in m["events"] if cites(e)})


def planned(worker: str):
    """A condition on a finished round: `worker` was planned into it (ready, beating, not quarantined)."""
    return lambda done: worker in set(done.workers) - set(done.excluded_workers)


# ---------------------------------------------------------------- the lab itself (default suite)


def _receive_then_echo(sock: socket.socket, size: int) -> None:
    """Take `size` bytes and answer b"k"; then echo every byte back."""
    conn, _ = sock.accept()
    with conn:
        got = 0
        while got < size and (data := conn.recv(1 << 16)):
            got += len(data)
        conn.sendall(b"k")
        while data := conn.recv(1):
            conn.sendall(data)


def test_the_lab_links_cuts_heals_kills_and_cleans_up(needs_lab, tmp_path):
    """Two hosts and a site: bytes cross the links and are counted by the kernel, a cut (or
    unplugged) link passes nothing either way and a healed one resumes the same TCP connection,
    killing a host ends its processes, and closing the lab leaves no namespace behind."""
    lab = Lab(tmp_path / "lab")
    try:
        hub, far = lab.host("hub"), lab.host("far", rate=LINK)
        near = lab.site("east", rate="50mbit").host("near")
        assert len({hub.address, far.address, near.address}) == 3
        listener = hub.call(lambda: socket.create_server((hub.address, 5000)))
        threading.Thread(target=_receive_then_echo, args=(listener, 1_000_000), daemon=True).start()
        before = lab.traffic()
        conn = far.call(lambda: socket.create_connection((hub.address, 5000), timeout=5))
        conn.sendall(b"x" * 1_000_000)
        assert conn.recv(1) == b"k"
        moved = lab.traffic()["far"] - before["far"]
        assert moved.up >= 1_000_000 and moved.down > 0, moved
        assert (lab.traffic()["site east"] - before["site east"]).total < 10_000  # a broadcast ARP, not ours

        far.cut()
        conn.settimeout(0.5)
        conn.sendall(b"y")
        with pytest.raises(TimeoutError):  # no echo: nothing crosses a cut link
            conn.recv(1)
        with pytest.raises(OSError):  # nor can a new connection be made
            far.call(lambda: socket.create_connection((hub.address, 5000), timeout=0.5))
        assert "NO-CARRIER" not in kernel.run("ip", "link", "show", "eth0", netns=far.netns)  # a silent partition
        far.heal()
        conn.settimeout(30)  # TCP retransmits what waited: the same connection carries on
        assert conn.recv(1) == b"y"
        far.link.unplug()  # a pulled cable: this time far's own kernel sees it
        assert "NO-CARRIER" in kernel.run("ip", "link", "show", "eth0", netns=far.netns)
        with pytest.raises(OSError):
            far.call(lambda: socket.create_connection((hub.address, 5000), timeout=0.5))
        far.heal()
        conn.sendall(b"z")
        assert conn.recv(1) == b"z"
        conn.close()
        # A site's host reaches the hub through the site's uplink, which counts it.
        site_before = lab.traffic()["site east"]
        with pytest.raises(OSError):  # refused: the server took its one connection
            near.call(lambda: socket.create_connection((hub.address, 5001), timeout=5))
        assert (lab.traffic()["site east"] - site_before).up > 0

        sleeper = near.spawn("sleep", [sys.executable, "-c", "import time; time.sleep(600)"])
        assert kernel.pids(near.netns) == [sleeper.pid]
        near.kill()
        assert not sleeper.alive and kernel.pids(near.netns) == []
    finally:
        lab.close()
    assert not [n for n in kernel.namespaces() if n.startswith(lab.prefix)]


def test_leftovers_of_a_dead_lab_are_swept_and_nobody_elses(needs_lab, tmp_path):
    """A namespace of a lab whose process is gone is removed by the next lab; one that is not a
    lab's (another prefix) is left alone, and so is the live lab's own."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{kernel.FAMILY}{int(dead.stdout)}x0dd000-w0"
    foreign = f"notpgl-{uuid.uuid4().hex[:6]}"
    for name in (stale, foreign):
        kernel.run("ip", "netns", "add", name)
    try:
        with Lab(tmp_path / "lab") as lab:
            lab.host("a")
            assert stale not in kernel.namespaces()
            assert foreign in kernel.namespaces()
            assert any(n.startswith(lab.prefix) for n in kernel.namespaces())
    finally:
        for name in (stale, foreign):
            if name in kernel.namespaces():
                kernel.run("ip", "netns", "del", name)


# ---------------------------------------------------------------- Pangea on hosts (slow)


@pytest.mark.slow
def test_four_workers_on_four_hosts_equal_the_reference(lab, job_name, tmp_path):
    """The hub host runs nats-server, the orchestrator and the preprocessor; four workers each on
    a host of their own behind a 100 Mbit/s link.  Parameters equal `pangea reference --workers 4`."""
    hub = lab.host("hub")
    workers = [lab.host(f"w{i}", rate=LINK) for i in range(4)]
    server = labnats.hub(hub).start()
    train = dict(epochs=2, batch_size=64, seed=5)
    job = Job(job_name, server.url, member_ttl=TTL, heartbeat_seconds=BEAT, torch_threads=1)
    for i, host in enumerate(workers):
        job.worker(host, f"w{i}")
    job.preprocessor(hub)
    out = tmp_path / "run"
    job.orchestrator(hub, "--workers", "4", "--out", str(out), *_flags(train))
    before = lab.traffic()
    finish(job)
    assert_exact(out, reference(tmp_path / "ref", workers=4, torch_threads=1, **train))
    for host in workers:  # each worker's gradients crossed its own link, and parameters came back
        moved = lab.traffic()[host.name] - before[host.name]
        assert moved.up > 0 and moved.down > 0, (host.name, moved)


@pytest.mark.slow
def test_a_worker_host_cut_off_for_twice_the_ttl_rejoins_after_the_heal(lab, job_name, tmp_path):
    """Three worker hosts on 100 Mbit/s links; w2's link is cut for 2x PANGEA_MEMBER_TTL, then
    healed.  Its shard is re-issued, it leaves and joins again with no restart, at most one round
    waits out a deadline for it, and the run verifies against its recorded plans."""
    hub = lab.host("hub")
    hosts = {f"w{i}": lab.host(f"w{i}", rate=LINK) for i in range(3)}
    server = labnats.hub(hub).start()
    job = Job(job_name, server.url, member_ttl=TTL, heartbeat_seconds=BEAT, torch_threads=1, test_delay=0.05)
    for name, host in hosts.items():
        job.worker(host, name)
    job.preprocessor(hub)
    out = tmp_path / "run"
    job.orchestrator(hub, "--workers", "3", "--out", str(out), "--epochs", "5", "--batch-size", "32", "--seed", "7")
    cut_at = wait_until(hub, server.url, job_name, lambda d: d.round >= 10, "round 10")
    hosts["w2"].cut()
    time.sleep(2 * TTL)
    hosts["w2"].heal()
    healed = time.monotonic()
    healed_at = wait_until(hub, server.url, job_name, lambda d: True, "a round")
    back_at = wait_until(hub, server.url, job_name, planned("w2"), "w2 planned again")
    back_after = time.monotonic() - healed
    finish(job)
    m = metrics(out)
    kinds = [(e["kind"], e["detail"]) for e in m["events"]]
    assert any(k == "reassign" and " of w2 (" in d for k, d in kinds), kinds
    assert any(k == "leave" and "w2" in d for k, d in kinds), kinds
    assert any(k == "join" and "w2" in d for k, d in kinds), kinds
    assert len(deadline_waits(m, "w2")) <= 1, kinds
    records = plans.read_jsonl(out / "plans.jsonl")
    with_w2 = [r.round for r in records if any("w2" in s.workers for s in r.shards)]
    assert with_w2[-1] > healed_at, "w2 was never planned in again after the heal"
    assert healed_at < len(records) - 5, "the run ended too soon after the heal to tell"
    assert_verified(out)
    print(
        f"cut at round {cut_at}, healed at round {healed_at}, w2 planned again in round {back_at}, "
        f"{back_after:.1f} s after the heal; rounds that waited a deadline for w2: {deadline_waits(m, 'w2')}; "
        f"events: {kinds}"
    )


@pytest.mark.slow
def test_the_preprocessor_host_cut_off_for_15s(lab, job_name, tmp_path):
    """The preprocessor on a host of its own; its link is cut for 15 s mid-run, then healed: the
    run carries on without a restart of anything and verifies against its recorded plans."""
    hub, data = lab.host("hub"), lab.host("data", rate=LINK)
    workers = [lab.host(f"w{i}", rate=LINK) for i in range(2)]
    server = labnats.hub(hub).start()
    job = Job(job_name, server.url, member_ttl=TTL, heartbeat_seconds=BEAT, torch_threads=1)
    for i, host in enumerate(workers):
        job.worker(host, f"w{i}")
    job.preprocessor(data)
    out = tmp_path / "run"
    job.orchestrator(hub, "--workers", "2", "--out", str(out), "--epochs", "3", "--batch-size", "32", "--seed", "8")
    cut_at = wait_until(hub, server.url, job_name, lambda d: d.round >= 10, "round 10")
    data.cut()
    time.sleep(15)
    data.heal()
    healed = time.monotonic()
    stalled_at = wait_until(hub, server.url, job_name, lambda d: True, "a round")
    resumed_at = wait_until(hub, server.url, job_name, lambda d: d.round > stalled_at, "a round after the heal")
    resumed_after = time.monotonic() - healed
    finish(job)
    m = metrics(out)
    assert len(deadline_waits(m)) <= 1, m["events"]
    assert sum(m["samples"]) == 3 * 1348
    assert_verified(out)
    print(
        f"cut at round {cut_at}; stalled at round {stalled_at}; round {resumed_at} done {resumed_after:.1f} s "
        f"after the heal; rounds that waited a deadline: {deadline_waits(m)}; events {m['events']}"
    )


@pytest.mark.slow
def test_two_sites_behind_leaf_nodes_equal_the_reference(lab, job_name, tmp_path):
    """Two sites, each a LAN behind one 100 Mbit/s link, with a NATS leaf node and two workers;
    the hub runs nats-server (JetStream), the orchestrator and the preprocessor.  The workers only
    know their site's leaf node.  Parameters equal `pangea reference --workers 4`."""
    hub = lab.host("hub")
    server = labnats.hub(hub, leafnodes=True).start()
    job = Job(job_name, server.url, member_ttl=TTL, heartbeat_seconds=BEAT, torch_threads=1)
    for site_name in ("east", "west"):
        site = lab.site(site_name, rate=LINK)
        leaf = labnats.leaf(site.host(f"{site_name}-leaf"), server).start()
        labnats.wait_for_jetstream(leaf.host, leaf.url)
        for i in range(2):
            job.worker(site.host(f"{site_name}-w{i}"), f"{site_name}{i}", nats_url=leaf.url)
    job.preprocessor(hub)
    out = tmp_path / "run"
    train = dict(epochs=2, batch_size=64, seed=6)
    before = lab.traffic()
    job.orchestrator(hub, "--workers", "4", "--out", str(out), *_flags(train))
    finish(job)
    assert_exact(out, reference(tmp_path / "ref", workers=4, torch_threads=1, **train))
    for site_name in ("east", "west"):
        moved = lab.traffic()[f"site {site_name}"] - before[f"site {site_name}"]
        assert moved.up > 0 and moved.down > 0, (site_name, moved)


@pytest.mark.slow
def test_a_cluster_node_per_host_survives_losing_the_batch_leaders_host(lab, job_name, tmp_path):
    """Three NATS nodes, each on its own host (PANGEA_REPLICAS=3); the orchestrator, the
    preprocessor and two workers on hosts of their own.  Mid-run the host of the batch stream's
    leader is killed (every process on it at once); the run ends and verifies."""
    node_hosts = [lab.host(f"n{i}", rate=LINK) for i in range(3)]
    nodes = [node.start() for node in labnats.cluster(node_hosts)]
    urls = ",".join(n.url for n in nodes)
    orch, data = lab.host("orch"), lab.host("data", rate=LINK)
    workers = [lab.host(f"w{i}", rate=LINK) for i in range(2)]
    labnats.wait_for_jetstream(orch, urls)
    job = Job(job_name, urls, member_ttl=5, heartbeat_seconds=BEAT, torch_threads=1, replicas=3)
    for i, host in enumerate(workers):
        job.worker(host, f"w{i}")
    job.preprocessor(data)
    out = tmp_path / "run"
    job.orchestrator(orch, "--workers", "2", "--out", str(out), "--epochs", "3", "--batch-size", "32", "--seed", "12")
    wait_until(orch, urls, job_name, lambda d: d.round >= 15, "round 15")
    leader = orch.call(lambda: asyncio.run(_stream_leader(urls, subjects.stream(job_name, "batches"))))
    victim = next(n for n in nodes if n.name == leader)
    victim.host.kill()
    finish(job, timeout=500)
    assert_verified(out)
    print(f"killed host {victim.host.name} ({leader}, the leader of the batch stream)")


async def _stream_leader(urls: str, stream: str) -> str:
    import nats

    nc = await nats.connect(urls.split(","))
    try:
        return (await nc.jetstream().stream_info(stream)).cluster.leader
    finally:
        await nc.close()


def _flags(train: dict) -> list[str]:
    return [arg for k, v in train.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def test_lab_errors_name_the_command(needs_lab):
    """A failing kernel command is one error naming the command and what it printed."""
    with pytest.raises(LabError, match="ip netns del"):
        kernel.run("ip", "netns", "del", f"{kernel.FAMILY}0x0-does-not-exist")
