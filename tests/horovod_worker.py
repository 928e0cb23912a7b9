"""Run by tests/test_horovod.py under ``horovodrun -np 2 -H localhost:2 --gloo``; not a test module.

Checks the horovod backend of :mod:`clipvip.distributed` the way tests/test_distributed.py checks
the gloo one: launcher detection, gathers in rank order (uneven, empty, non-contiguous), the
gradient convention of ``all_gather_with_grad`` and, with the averaging the training loop does for
``backend == "horovod"`` (no DDP there), parameter gradients equal to the single-process gradient
of the global batch. Exits non-zero (an AssertionError) on the first mismatch.
"""
import copy
import os
import sys

import torch

import clipvip.distributed as D
from clipvip.loss import LossSettings, build_loss

from dual_encoder import B, P, P_IN, WORLD, TinyDualEncoder, assert_close, check_gather_and_loss_gradient  # noqa: E402,E501


def check_launcher(rank):
    launcher, r, world, local = D.detect_launcher()
    assert (launcher, r, world, local) == ("horovod", rank, WORLD, rank), (launcher, r, world, local)
    env = D.init_distributed()
    assert (env.rank, env.world_size, env.local_rank, env.backend) == (rank, WORLD, rank, "horovod"), env
    assert D.init_distributed() is env and D.is_main_process() == (rank == 0)


def check_averaged_gradients_match_single_process(rank, loss_name):
    torch.manual_seed(1)
    model = TinyDualEncoder().double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(WORLD * B, P_IN, generator=g, dtype=torch.float64) for _ in range(4)]
    mine = slice(rank * B, (rank + 1) * B)
    out = model(*(x[mine] for x in inputs))
    build_loss(LossSettings(loss_name, gather=True), D.get_env())(out, out["logit_scale"]).total.backward()
    D.all_reduce_mean_([p.grad for p in model.parameters()])  # what the engine's OptimizerStep does for horovod
    ref_out = reference(*inputs)
    build_loss(LossSettings(loss_name, gather=False))(ref_out, ref_out["logit_scale"]).total.backward()
    for (name, p), ref_p in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, ref_p.grad, f"{loss_name}: averaged gradient of {name}")


def check_uneven_empty_and_strided(rank):
    sizes = [2, 4]
    full = torch.arange(sum(sizes) * P, dtype=torch.float64).reshape(sum(sizes), P)
    start = sum(sizes[:rank])
    x = full[start: start + sizes[rank]].clone().requires_grad_()
    gathered = D.all_gather_with_grad(x, D.get_env())
    assert_close(gathered, full, "uneven gather with grad")
    weights = torch.linspace(-1, 1, full.numel(), dtype=torch.float64).reshape(full.shape)
    (gathered * weights).sum().backward()
    assert_close(x.grad, WORLD * weights[start: start + sizes[rank]], "uneven gather gradient")

    for sizes in ([3, 1], [0, 2], [2, 0]):  # the last batch; a rank with nothing left
        start = sum(sizes[:rank])
        got = D.all_gather_variable(full[start: start + sizes[rank]])
        assert_close(got, full[: sum(sizes)], f"all_gather_variable {sizes}")
    # what evaluate.encode_in_order sends for a rank with an empty block: [0, width] features
    local = full[:0] if rank == 0 else full[:2]
    assert_close(D.all_gather_variable(local), full[:2], "empty block on rank 0")
    ints = torch.arange(4)[rank * 2: rank * 2 + 2]
    assert torch.equal(D.all_gather_variable(ints), torch.arange(4)), "long tensors"

    # non-contiguous inputs and gradients (a transposed view; an expanded gradient)
    base = torch.arange(2 * P, dtype=torch.float64).reshape(P, 2) + 100 * rank
    got = D.all_gather_variable(base.t())
    assert_close(got, torch.cat([base.t(), base.t() + 100]) if rank == 0 else torch.cat([base.t() - 100, base.t()]),
          "non-contiguous gather")
    y = base.t().clone().requires_grad_()
    D.all_gather_with_grad(y, D.get_env()).sum().backward()  # sum's gradient is an expanded (stride-0) tensor
    assert_close(y.grad, torch.full_like(y, float(WORLD)), "gradient through an expanded grad")
    summed = D.all_reduce_mean(base.t())
    assert_close(summed, base.t() + 50 - 100 * rank, "all_reduce_mean of a non-contiguous tensor")


def check_all_reduce_mean_in_place(rank):
    small, D._MEAN_BUCKET_ELEMENTS = D._MEAN_BUCKET_ELEMENTS, 10  # several buckets, one tensor over the cap
    try:
        tensors = [torch.full((3,), 1.0 + rank), torch.full((2, 2), 10.0 * rank, dtype=torch.float64),
                   torch.full((12,), -2.0 * rank), torch.full((4,), 3.0 + 2 * rank), torch.ones(2, 3).t()]
        D.all_reduce_mean_(tensors)
        expected = [torch.full((3,), 1.5), torch.full((2, 2), 5.0, dtype=torch.float64),
                    torch.full((12,), -1.0), torch.full((4,), 4.0), torch.ones(3, 2)]
        for got, want in zip(tensors, expected):
            assert got.dtype == want.dtype and torch.equal(got, want), (got, want)
    finally:
        D._MEAN_BUCKET_ELEMENTS = small


def check_objects(rank):
    assert D.all_reduce_mean(torch.tensor([rank + 1.0])).item() == 1.5
    assert D.all_reduce_mean(float(rank)) == 0.5
    assert D.broadcast_object({"from": rank}, src=1) == {"from": 1}
    assert D.broadcast_object([rank], src=0) == [0]
    assert D.gather_objects(f"r{rank}") == ["r0", "r1"]
    D.barrier()


def main():
    torch.set_num_threads(1)
    rank = int(os.environ["HOROVOD_RANK"])
    try:
        check_launcher(rank)
        check_gather_and_loss_gradient(rank)
        check_averaged_gradients_match_single_process(rank, "NCELearnableTempLoss")
        check_averaged_gradients_match_single_process(rank, "NCELearnableTempLoss_vsc_fc")
        check_uneven_empty_and_strided(rank)
        check_all_reduce_mean_in_place(rank)
        check_objects(rank)
    finally:
        D.cleanup()
    print(f"rank {rank}: horovod checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
