"""Cost of the loss's feature all-gather (forward + backward), general path against the
equal-size path training uses. Run under a launcher, one process per device:

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/bench_gather.py \
        [--batch 32] [--dim 512] [--features 2] [--repeats 200]

``general``: sizes exchanged first (a collective + host sync), padded ``all_gather`` into a list,
``cat``; backward an all-reduce of the whole gathered gradient. ``equal``: one
``all_gather_single`` into one buffer; backward a reduce-scatter. Rank 0 prints one JSON line.
"""
import argparse
import json
import statistics
import time

import torch

import clipvip.distributed as D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="rows per process")
    p.add_argument("--dim", type=int, default=512, help="feature width")
    p.add_argument("--features", type=int, default=2, help="gathered features per step (2 fine-tuning, 4 pretraining)")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    env = D.init_distributed()
    device = torch.device(env.device)
    feats = [torch.randn(args.batch, args.dim, device=device, requires_grad=True) for _ in range(args.features)]

    def step(equal: bool) -> None:
        gathered = [D.all_gather_with_grad(f, env, equal_sizes=equal) for f in feats]
        torch.stack([g.sum() for g in gathered]).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict = {"general": [], "equal": []}
    for _ in range(10):  # warm-up: connections, allocator
        step(False)
        step(True)
    for _ in range(args.repeats):
        for name, equal in (("general", False), ("equal", True)):  # alternating: load falls on both
            D.barrier()
            start = time.perf_counter()
            step(equal)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    if env.is_main:
        print(json.dumps({"world_size": env.world_size, "backend": env.backend, "device": str(device),
                          "batch": args.batch, "dim": args.dim, "features": args.features,
                          "ms_per_step": {k: round(v, 3) for k, v in medians.items()},
                          "speedup": round(medians["general"] / medians["equal"], 2)}))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
