"""One rank of torch DDP (gloo) training what a Pangea sync job trains, stopping at a target.

    python -m benchmarks.ddp_rank CONFIG.json RANK                      # benchmarks.lab, benchmarks.tokens
    torchrun --standalone --nproc-per-node K --max-restarts N -m benchmarks.ddp_rank CONFIG.json

Started by benchmarks/lab.py on a lab host, one rank per worker host, so gloo's ring runs over
the same links Pangea's workers use; by benchmarks/tokens.py on loopback; by benchmarks/goodput.py
under torchrun, which restarts every rank when one dies.  CONFIG holds the TrainSettings fields,
the world size, the rendezvous address (absent under torchrun: its environment has it), the
interface gloo binds to, the target and where rank 0 writes its result (and, with `params`, its
final parameters as .npz); `delay` sleeps that many seconds before each backward pass (the modelled
link latency of benchmarks/train.py).

With `checkpoint` (a directory) in CONFIG, rank 0 stores the model, the optimizer, the next step,
and the evaluations so far after each evaluation (each epoch's end, every `eval_every` steps; with
`"checkpoint_every": "epoch"` only at each epoch's end), and a (re)started rank resumes from it: what torchrun's restart-all does with a job that checkpoints.
The clock then counts from the first start (rank 0 writes its wall time to `clock` there), so the
evaluations' seconds include every restart; each rank writes its pid to `rank<R>.pid` there for
whoever kills it.

The same computation as Pangea's sync rounds: the model of `pangea.train.models.build_model` with the
seed, global batch g of the data set's own order cut into the shards `pangea.train.plans.cut` gives K
workers, the optimizer and its schedule of `pangea.train.training` (warmup, cosine, clipping).  DDP
averages gradients equally over ranks while Pangea weights shards by samples, so each rank's
loss is scaled by K * shard / batch (1 for equal shards).  Rank 0 evaluates where Pangea's
orchestrator does (`evaluations_due`) while the other ranks wait; after each evaluation rank 0
broadcasts whether the target is met, and every rank stops there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


def main(config_path: str, rank: int | None) -> None:
    config = json.loads(Path(config_path).read_text())
    rank = int(os.environ["RANK"]) if rank is None else rank  # torchrun sets RANK
    os.environ["GLOO_SOCKET_IFNAME"] = config["ifname"]  # the host's link, never another interface
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pangea.settings import TrainSettings
    from pangea.train import plans, server
    from pangea.train.data import steps_per_epoch
    from pangea.train.sources import load_data
    from pangea.train.tasks import classify_loss, get_task, lm_loss
    from pangea.train.training import evaluations_due, lr_at, make_optimizer, total_rounds

    settings = TrainSettings(**config["train"])
    k, target = config["world"], config["target"]
    torch.set_num_threads(config["threads"])
    timeout = timedelta(seconds=600)
    if "master" in config:
        rendezvous = f"tcp://{config['master']}:{config['port']}"
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=k, timeout=timeout)
    else:
        dist.init_process_group("gloo", store=_attempt_store(k, timeout), rank=rank, world_size=k, timeout=timeout)
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    per_epoch = config.get("checkpoint_every", "evaluation") == "epoch"
    if checkpoint:
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / f"rank{rank}.pid").write_text(str(os.getpid()))
    task = get_task(settings.task)
    mean_loss = lm_loss if task.is_lm else classify_loss  # DDP averages per-rank means: the built-in tasks' means
    data = load_data(
        settings.task,
        settings.dataset,
        context=settings.context,
        vocab=settings.vocab,
        val_fraction=settings.val_fraction,
        eval_windows=settings.eval_windows,
    )
    model = server.build(settings, data)
    model.train()
    ddp = DistributedDataParallel(model)
    optimizer = make_optimizer(settings, ddp.parameters())
    n, size, steps = data.num_samples, settings.batch_size, total_rounds(settings, data)
    names = [str(i) for i in range(k)]
    evaluations: list[tuple[float, dict]] = []
    stop = torch.zeros(1)
    delay = float(config.get("delay", 0.0))
    first = 0
    if checkpoint and (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first, evaluations = state["step"], state["evaluations"]
        if evaluations and _met(evaluations[-1][1], target):
            first = steps  # killed between meeting the target and stopping: nothing is left to do
    dist.barrier()
    start = time.perf_counter() - _since_first_start(checkpoint) if checkpoint and rank == 0 else time.perf_counter()
    for g in range(first, steps):
        shards = dict(plans.cut(n, size, range(g, g + 1), names))
        a, b = shards.get(str(rank), ((0, 0),))[0]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, g, steps)
        optimizer.zero_grad(set_to_none=True)
        batch_rows = sum(r[0][1] - r[0][0] for r in shards.values())
        if b > a:
            x, y = data.batch(settings.seed, size, g, a, b)
            loss = mean_loss(ddp(torch.from_numpy(x)), torch.from_numpy(y)) * (k * (b - a) / batch_rows)
        else:  # more ranks than rows: contribute zeros to the all-reduce
            x, _ = data.batch(settings.seed, size, g, 0, 1)
            loss = ddp(torch.from_numpy(x)).sum() * 0.0
        if delay:  # a modelled link latency, before the backward pass (where the all-reduce happens)
            time.sleep(delay)
        loss.backward()
        if settings.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        if evaluations_due(range(g, g + 1), n, size, settings.eval_every) or g + 1 == steps:
            if rank == 0:
                figures = task.evaluate(model, data)
                evaluations.append((time.perf_counter() - start, {"step": g + 1, **figures}))
                stop[0] = float(_met(figures, target))
                if checkpoint and not per_epoch:
                    _store(checkpoint, model, optimizer, g + 1, evaluations)
            dist.broadcast(stop, src=0)
            if stop[0]:
                break
        if checkpoint and per_epoch and rank == 0 and (g + 1) % steps_per_epoch(n, size) == 0:
            _store(checkpoint, model, optimizer, g + 1, evaluations)
    if rank == 0:
        result = {
            "evaluations": evaluations,
            "steps_per_epoch": steps_per_epoch(n, size),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        Path(config["out"]).write_text(json.dumps(result))
        if config.get("params"):
            import numpy as np

            np.savez(config["params"], **{name: p.detach().numpy() for name, p in model.named_parameters()})
    dist.barrier()
    dist.destroy_process_group()


def _attempt_store(world: int, timeout: timedelta):
    """torchrun's agent store under a prefix of its own per restart.  The agent keeps one store
    for the whole job, and plain env:// reads the previous attempt's gloo addresses from it: on
    this torch (2.13) a restarted group then fails with "connectFullMesh ... Connection refused"
    (and restarts again) or hangs in ProcessGroupGloo for the whole timeout."""
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _since_first_start(where: Path) -> float:
    """Seconds since the first start's barrier: its wall time is in `clock`, written then."""
    clock = where / "clock"
    if not clock.exists():
        clock.write_text(repr(time.time()))
        return 0.0
    return time.time() - float(clock.read_text())


def _store(where: Path, model, optimizer, step: int, evaluations: list) -> None:
    """The state a restarted rank resumes from, replaced atomically (a kill may land mid-write)."""
    import torch

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "evaluations": evaluations}
    torch.save(state, where / "state.tmp")
    os.replace(where / "state.tmp", where / "state.pt")


def _met(figures: dict, target: dict) -> bool:
    value = figures.get(target["figure"])
    if value is None:
        return False
    return value >= target["value"] if target["higher"] else value <= target["value"]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
