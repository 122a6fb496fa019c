"""One rank of torch DDP (gloo) training what a Pangea sync job trains, stopping at a target.

    python -m benchmarks.ddp_rank CONFIG.json RANK

Started by benchmarks/lab.py on a lab host, one rank per worker host, so gloo's ring runs over
the same links Pangea's workers use.  CONFIG holds the TrainSettings fields, the world size, the
rendezvous address, the interface gloo binds to, the target and where rank 0 writes its result.

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


def main(config_path: str, rank: int) -> None:
    config = json.loads(Path(config_path).read_text())
    os.environ["GLOO_SOCKET_IFNAME"] = config["ifname"]  # the host's link, never another interface
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pangea.settings import TrainSettings
    from pangea.train import plans, server
    from pangea.train.data import steps_per_epoch
    from pangea.train.sources import load_data
    from pangea.train.tasks import get_task
    from pangea.train.training import evaluations_due, lr_at, make_optimizer, total_rounds

    settings = TrainSettings(**config["train"])
    k, target = config["world"], config["target"]
    torch.set_num_threads(config["threads"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{config['master']}:{config['port']}",
        rank=rank,
        world_size=k,
        timeout=timedelta(seconds=600),
    )
    task = get_task(settings.task)
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
    dist.barrier()
    start = time.perf_counter()
    for g in range(steps):
        shards = dict(plans.cut(n, size, range(g, g + 1), names))
        a, b = shards.get(str(rank), ((0, 0),))[0]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, g, steps)
        optimizer.zero_grad(set_to_none=True)
        batch_rows = sum(r[0][1] - r[0][0] for r in shards.values())
        if b > a:
            x, y = data.batch(settings.seed, size, g, a, b)
            loss = task.loss(ddp(torch.from_numpy(x)), torch.from_numpy(y)) * (k * (b - a) / batch_rows)
        else:  # more ranks than rows: contribute zeros to the all-reduce
            x, _ = data.batch(settings.seed, size, g, 0, 1)
            loss = ddp(torch.from_numpy(x)).sum() * 0.0
        loss.backward()
        if settings.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        if evaluations_due(range(g, g + 1), n, size, settings.eval_every) or g + 1 == steps:
            if rank == 0:
                figures = task.evaluate(model, data)
                evaluations.append((time.perf_counter() - start, {"step": g + 1, **figures}))
                stop[0] = float(_met(figures, target))
            dist.broadcast(stop, src=0)
            if stop[0]:
                break
    if rank == 0:
        result = {
            "evaluations": evaluations,
            "steps_per_epoch": steps_per_epoch(n, size),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        Path(config["out"]).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _met(figures: dict, target: dict) -> bool:
    value = figures.get(target["figure"])
    if value is None:
        return False
    return value >= target["value"] if target["higher"] else value <= target["value"]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
