"""The floor of a round: one round of `pangea run` on a tiny model vs two bare JetStream hops.

    python -m benchmarks.latency            # 3 of each, interleaved, ~1.5 min on 2 cores
    python -m benchmarks.latency --runs 1   # a smoke test

A synchronous round cannot be shorter than a gradient hop (worker -> orchestrator) plus a
parameter hop (orchestrator -> worker).  `bare_two_hops_s` is exactly that with nothing of
Pangea: on a fresh nats-server, this process publishes a small message to a file-stored
stream (waiting for its ack, as Pangea's publishes do); an echo process, waiting in a pull
fetch, acknowledges it and publishes it to a second stream; this process pull-fetches it
there.  Median of 300 round trips.  `pangea_round_s` is `benchmarks.round`'s figure (the
median time between round-done events) for K=2 workers and a ~20k-parameter MLP, whose
forward and backward take well under a millisecond: what is left is the talk.  `msgs_in` and
`msgs_out`: messages into and out of the server per round (its /varz), the round's talk counted.

Each run starts its own server; the two kinds of run alternate (bare, pangea, bare, ...) and
the table gives the median of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, record
from benchmarks.round import Config, RunResult, hidden_for, numel, pangea_round, write_dataset

TRIPS = 300
TINY = 20_000  # parameters of the tiny model
ROUNDS = 21  # digits has 21 global batches of 64: one epoch, 19 timed rounds


async def _connect(url: str):
    import nats

    nc = await nats.connect(url)
    return nc, nc.jetstream()


async def _echo(url: str) -> None:
    nc, js = await _connect(url)
    sub = await js.pull_subscribe("lat.a", durable="echo", stream="LAT_A")
    try:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5.0)
            except Exception:  # noqa: BLE001 - the timeout of an idle fetch: the bench is over
                return
            for msg in msgs:
                await msg.ack()
                await js.publish("lat.b", msg.data)
    finally:
        await nc.close()


def _echo_process(url: str) -> None:
    asyncio.run(_echo(url))


async def _trips(url: str, trips: int) -> float:
    from nats.js import api

    nc, js = await _connect(url)
    for name, subject in (("LAT_A", "lat.a"), ("LAT_B", "lat.b")):
        await js.add_stream(api.StreamConfig(name=name, subjects=[subject], storage=api.StorageType.FILE))
    sub = await js.pull_subscribe("lat.b", durable="main", stream="LAT_B")
    echo = multiprocessing.get_context("spawn").Process(target=_echo_process, args=(url,), daemon=True)
    echo.start()
    payload = os.urandom(256)
    times = []
    try:
        for i in range(trips + 20):  # the first 20 warm up the consumers
            start = time.perf_counter()
            await js.publish("lat.a", payload)
            msgs = await sub.fetch(1, timeout=10.0)
            await msgs[0].ack()
            if i >= 20:
                times.append(time.perf_counter() - start)
    finally:
        await nc.close()
        echo.join(10)
        if echo.is_alive():
            echo.kill()
    return statistics.median(times)


def bare_two_hops(trips: int = TRIPS) -> float:
    from pangea.bus.server import EmbeddedServer

    with EmbeddedServer() as server:
        return asyncio.run(_trips(server.url, trips))


def tiny_round(workdir: Path) -> RunResult:
    hidden = hidden_for(TINY)
    result = asyncio.run(pangea_round(Config(2, numel(hidden)), hidden, workdir / "digits-cut.npz", workdir))
    if result.error:
        raise SystemExit(f"pangea run failed: {result.error}")
    return result


def run(runs: int = 3, trips: int = TRIPS) -> list[dict]:
    """One row: the medians of `runs` interleaved runs of each kind, and their ratio."""
    workdir = Path(tempfile.mkdtemp(prefix="pangea-bench-latency-"))
    bare, pangea = [], []
    try:
        write_dataset(workdir / "digits-cut.npz", ROUNDS)
        for i in range(runs):
            bare.append(bare_two_hops(trips))
            pangea.append(tiny_round(workdir))
            print(
                f"run {i + 1}: two bare hops {bare[-1] * 1e3:.2f} ms, pangea round {pangea[-1].round_s * 1e3:.2f} ms "
                f"({pangea[-1].msgs_in:.0f} messages into the server and {pangea[-1].msgs_out:.0f} out per round)",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row = {
        "K": 2,
        "P": numel(hidden_for(TINY)),
        "bare_two_hops_s": statistics.median(bare),
        "pangea_round_s": statistics.median(r.round_s for r in pangea),
        "msgs_in": statistics.median(r.msgs_in for r in pangea),
        "msgs_out": statistics.median(r.msgs_out for r in pangea),
    }
    row["pangea / two hops"] = row["pangea_round_s"] / row["bare_two_hops_s"]
    return [row]


def goal_line(rows: list[dict]) -> str:
    return f"tiny-model round / two bare JetStream hops: {rows[0]['pangea / two hops']:.3g}x (goal <= 2x)"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind, interleaved (default 3)")
    args = parser.parse_args()
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = run(args.runs)
    record("latency", rows)
    print(goal_line(rows))


if __name__ == "__main__":
    main()
