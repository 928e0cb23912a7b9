"""The one distributed module: who am I, how many are we, and the few collectives we need.

Launchers are recognised from the environment, in this order:

- ``backend="horovod"`` passed explicitly: horovod (``horovodrun``), through
  :mod:`clipvip.horovod_adapter`, the only place that imports horovod (when first used);
- ``RANK`` + ``WORLD_SIZE`` (``torchrun``, ``accelerate launch``; ``LOCAL_RANK`` if set);
- ``HOROVOD_RANK`` / ``OMPI_COMM_WORLD_RANK`` (``horovodrun``, ``mpirun``): horovod, unless a
  torch backend (``"nccl"``/``"gloo"``) is named, then torch.distributed with those ranks;
- ``SLURM_PROCID`` + ``SLURM_NTASKS`` (``srun``; ``SLURM_LOCALID`` for the local rank);
- nothing: one process. No env var and no ``init_process_group`` is needed for that.

Launchers other than torchrun/accelerate need ``MASTER_ADDR`` and ``MASTER_PORT`` for torch's
``env://`` rendezvous.

Gradient convention of :func:`all_gather_with_grad` (the one the losses rely on): the backward
pass **sums** the gradients of the gathered tensor over all ranks, then hands each rank its own
rows. Every rank computes the same loss on the global batch, so a rank's local features get
``world_size x`` the single-process gradient; DDP then *averages* the parameter gradients over
ranks, and the model's gradient equals the single-process gradient on the global batch. A
parameter used directly by the loss (``logit_scale``) gets the full gradient on every rank and its
average is that full gradient too. (open_clip uses the same convention. The original CLIP-ViP
used ``hvd.allgather``, whose backward averages in horovod >= 0.20: with horovod's averaging
optimizer its encoders got ``1/world_size`` of the global-batch gradient while ``logit_scale`` got
all of it. Here the horovod backend follows the convention above as well: there is no DDP there,
so the training loop averages the parameter gradients itself with :func:`all_reduce_mean_`.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from clipvip import horovod_adapter
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger, set_rank

LOGGER = get_logger("distributed")

TORCH_BACKENDS = ("nccl", "gloo")
BACKENDS = TORCH_BACKENDS + ("horovod",)


@dataclass
class DistEnv:
    """Where this process stands. ``backend`` is None for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None  # set by init_distributed(), cleared by cleanup()
_OWNS_GROUP = False  # True when init_distributed() created the torch process group


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        raise ConfigError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect_launcher(environ: Mapping[str, str] | None = None) -> tuple[str, int, int, int]:
    """``(launcher, rank, world_size, local_rank)`` read from ``environ`` (default ``os.environ``).

    ``launcher`` is ``"torchrun"``, ``"horovod"``, ``"slurm"`` or ``"single"``. Pure: starts nothing.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    if "HOROVOD_RANK" in env:
        return ("horovod", _int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE", 1),
                _int(env, "HOROVOD_LOCAL_RANK"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return ("horovod", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE", 1),
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
    return "single", 0, 1, 0


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this run on this machine, from the launcher's environment (1 without one).

    ``LOCAL_WORLD_SIZE`` (torchrun), ``HOROVOD_LOCAL_SIZE`` / ``OMPI_COMM_WORLD_LOCAL_SIZE``
    (horovodrun, mpirun), ``SLURM_NTASKS_PER_NODE`` (srun with ``--ntasks-per-node``; "4(x2)" reads
    as 4). Pure, like :func:`detect_launcher`: the data loaders share the machine's CPUs by it.
    """
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        digits = env.get(key, "").split("(")[0].split(",")[0].strip()
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def _default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str | None = None, device: str | None = None) -> DistEnv:
    """Join the job this process was launched in and return where it stands.

    ``backend``: ``"nccl"``, ``"gloo"``, ``"horovod"`` or None (nccl when CUDA is available,
    gloo otherwise; horovod when launched by horovodrun/mpirun). ``device``: None picks
    ``cuda:<local_rank>`` when CUDA is available, else ``"cpu"``. Idempotent: a second call returns
    the first result. A process group created by someone else (accelerate) is adopted as is.
    A single process (world size 1) creates no process group.
    """
    global _ENV, _OWNS_GROUP
    if _ENV is not None:
        if backend is not None and _ENV.backend is not None and backend != _ENV.backend:
            LOGGER.warning("init_distributed(%r) ignored: already initialised with %r", backend, _ENV.backend)
        return _ENV
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}; valid: {', '.join(BACKENDS)}")

    if dist.is_available() and dist.is_initialized():
        # Someone (accelerate, a test harness) already made the group: adopt it, never destroy it.
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = detect_launcher()[3]
        _ENV = DistEnv(rank, world, local_rank, str(dist.get_backend()), device or _default_device(local_rank))
        _set_cuda_device(_ENV.device)
        set_rank(rank)
        return _ENV

    launcher, rank, world, local_rank = detect_launcher()
    if backend == "horovod" or (backend is None and launcher == "horovod"):
        rank, world, local_rank = horovod_adapter.init()
        _ENV = DistEnv(rank, world, local_rank, "horovod", device or _default_device(local_rank))
        _set_cuda_device(_ENV.device)
        set_rank(rank)  # the other ranks say warnings and errors only, naming their rank
        LOGGER.info("horovod: rank %d of %d (local %d) on %s", rank, world, local_rank, _ENV.device)
        return _ENV

    device = device or _default_device(local_rank)
    if world <= 1:
        _ENV = DistEnv(0, 1, 0, None, device)
        return _ENV

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(f"{launcher} launch with {world} processes: set {key} (torch env:// rendezvous)")
    _set_cuda_device(device)  # nccl needs the device chosen before the group is made
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and restart != "0":
        # A group restarted by torchrun (--max-restarts): env:// rendezvous would read the keys the
        # previous attempt left in torchrun's store, and gloo then connects to the dead processes'
        # ports and fails ("connectFullMesh ... Connection refused", torch 2.13). Each attempt gets
        # its own key space in the same store instead.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"clipvip/attempt_{restart}", store),
                                rank=rank, world_size=world)
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    _OWNS_GROUP = True
    _ENV = DistEnv(rank, world, local_rank, backend, device)
    set_rank(rank)
    LOGGER.info("%s/%s: rank %d of %d (local %d) on %s", launcher, backend, rank, world, local_rank, device)
    return _ENV


def _set_cuda_device(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))


def get_env() -> DistEnv:
    """The result of :func:`init_distributed`; before it, what the environment says (no group).

    Collectives refuse to run before :func:`init_distributed` when the world is larger than one.
    """
    if _ENV is not None:
        return _ENV
    _, rank, world, local_rank = detect_launcher()
    return DistEnv(rank, world, local_rank, None, _default_device(local_rank))


def is_main_process() -> bool:
    return get_env().rank == 0


def _active_backend() -> str | None:
    """The backend to talk through, or None when there is nobody else to talk to."""
    env = get_env()
    if env.world_size <= 1:
        return None
    if _ENV is None:
        raise RuntimeError("clipvip.distributed: call init_distributed() before using collectives")
    return env.backend


def barrier() -> None:
    backend = _active_backend()
    if backend == "horovod":
        horovod_adapter.barrier()
    elif backend is not None:
        dist.barrier()


def cleanup() -> None:
    """Leave the job: destroy the process group this module created (or shut horovod down).

    No barrier first: cleanup often runs in a ``finally`` after one rank failed, and a barrier
    would then wait for peers that never come. Call :func:`barrier` first on the success path.
    """
    global _ENV, _OWNS_GROUP
    if _ENV is not None and _ENV.backend == "horovod":
        horovod_adapter.shutdown()
    elif _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _ENV, _OWNS_GROUP = None, False


# ----------------------------------------------------------------------------------------------
# Raw collectives (no autograd), dispatched on the backend
# ----------------------------------------------------------------------------------------------
def _all_reduce_sum(x: torch.Tensor, backend: str) -> torch.Tensor:
    """A new tensor: the sum of ``x`` over ranks."""
    if backend == "horovod":
        return horovod_adapter.allreduce_sum(x)
    out = x.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _gather_sizes(n: int, device: torch.device, backend: str) -> list[int]:
    """First-dim size of every rank, in rank order (a collective, and a host sync to read it)."""
    size = torch.tensor([n], dtype=torch.long, device=device)
    if backend == "horovod":
        return [int(s) for s in horovod_adapter.allgather(size)]
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


# torch >= 2.12 names the single-tensor collectives *_single; older releases *_into_tensor / *_tensor.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_cat(x: torch.Tensor, backend: str, world: int,
                    equal_sizes: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` [n_r, ...] of every one of the ``world`` ranks along dim 0 in rank order.

    ``equal_sizes``: the caller guarantees the same n on every rank (training batches), so the
    sizes are not exchanged: one collective into one buffer and no host sync. Otherwise n_r may
    differ and the sizes travel first.
    """
    x = x.detach().contiguous()
    if equal_sizes:
        sizes = [x.shape[0]] * world
        if backend == "horovod":
            return horovod_adapter.allgather(x), sizes
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _ALL_GATHER_SINGLE(out, x)
        return out, sizes
    sizes = _gather_sizes(x.shape[0], x.device, backend)
    if backend == "horovod":
        return horovod_adapter.allgather(x), sizes  # horovod takes uneven first dims itself
    # torch's all_gather wants equal shapes: pad every rank to the largest, gather, trim.
    longest = max(max(sizes), 1)  # an empty collective is a corner some backends trip on
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, env: DistEnv, equal_sizes: bool) -> torch.Tensor:
        backend, rank = env.backend, env.rank
        gathered, sizes = _all_gather_cat(x, backend, env.world_size, equal_sizes)  # [sum(n_r), ...]
        ctx.start, ctx.stop, ctx.backend = sum(sizes[:rank]), sum(sizes[: rank + 1]), backend
        ctx.equal_sizes = equal_sizes
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on every rank's rows: the gradient of our rows is the sum of
        # what all ranks computed for them (see the module docstring for the scaling this implies).
        if ctx.equal_sizes and ctx.backend != "horovod":
            # The sum of our rows only: half the traffic of an all-reduce of the whole gradient.
            grad = grad.contiguous()
            mine = grad.new_empty((ctx.stop - ctx.start, *grad.shape[1:]))
            _REDUCE_SCATTER_SINGLE(mine, grad)
            return mine, None, None
        grad = _all_reduce_sum(grad, ctx.backend)
        return grad[ctx.start: ctx.stop], None, None


# ----------------------------------------------------------------------------------------------
# Public collectives
# ----------------------------------------------------------------------------------------------
def all_gather_with_grad(x: torch.Tensor, env: DistEnv, equal_sizes: bool = False) -> torch.Tensor:
    """[B_r, ...] on each rank of ``env`` -> [sum_r B_r, ...] on every rank, in rank order, with gradient.

    ``env`` is the job to gather over, passed in rather than read from this module's state, so
    that a loss built for a job (:class:`FeatureGather`) says which one it gathers over.

    Uneven batch sizes are fine: the sizes are exchanged first (a collective and a host sync).
    ``equal_sizes=True`` promises the same B on every rank (what training batches are) and skips
    that: one all-gather forward, one reduce-scatter backward, no host sync. A broken promise is
    an error or a hang in the collective, so pass it only where the sampler guarantees it. Every
    rank must backpropagate through the result (the backward is a collective). Gradient
    convention: module docstring. Identity in a single process.
    """
    if env.world_size <= 1:
        return x
    if env.backend is None:  # what get_env() says before init_distributed(): ranks known, no group
        raise RuntimeError("clipvip.distributed: call init_distributed() before using collectives")
    return _AllGatherWithGrad.apply(x, env, bool(equal_sizes))


@dataclass(frozen=True)
class FeatureGather:
    """``x -> all_gather_with_grad(x, env, equal_sizes)``: what a loss is given to see the global batch.

    ``equal_sizes`` (default True: training batches are full batches on every rank,
    :class:`clipvip.data.loader.ResumableSampler`) spares a size exchange and a host sync per
    feature; pass False for batches that may differ.
    """

    env: DistEnv
    equal_sizes: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_with_grad(x, self.env, self.equal_sizes)


@torch.no_grad()
def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """[B_r, ...] on each rank -> [sum_r B_r, ...] in rank order, no gradient (evaluation).

    Ranks may hold different first dims (the last batch; none at all). Identity in one process.
    """
    backend = _active_backend()
    if backend is None:
        return x.detach()
    return _all_gather_cat(x, backend, get_env().world_size)[0]


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """The mean of ``x`` over ranks, as a new tensor (a float for a float); ``x`` is not modified."""
    backend = _active_backend()
    if not isinstance(x, torch.Tensor):
        if backend is None:
            return float(x)
        return float(all_reduce_mean(torch.tensor([float(x)], device=get_env().device)).item())
    if backend is None:
        return x.detach().clone()
    total = _all_reduce_sum(x.detach().to(torch.float64 if not x.is_floating_point() else x.dtype), backend)
    return total / get_env().world_size


_MEAN_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per collective: bounds the extra memory


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each floating-point tensor of ``tensors`` in place by its mean over ranks.

    What the training loop does to the parameter gradients where no DDP does it (horovod). The
    tensors travel flattened into a few large buffers (per device and dtype, up to
    ``_MEAN_BUCKET_ELEMENTS`` each): one collective per buffer, not one per tensor, which with
    horovod's per-operation negotiation is the difference between milliseconds and seconds per
    step. Every rank must pass tensors of the same shapes in the same order. No-op in one process.
    """
    backend = _active_backend()
    if backend is None or not tensors:
        return
    world = get_env().world_size
    open_buckets: dict[tuple, list[torch.Tensor]] = {}  # (device, dtype) -> the bucket being filled
    buckets: list[list[torch.Tensor]] = []  # in the same order on every rank
    for t in tensors:
        key = (t.device, t.dtype)
        bucket = open_buckets.get(key)
        if bucket is None or sum(x.numel() for x in bucket) + t.numel() > _MEAN_BUCKET_ELEMENTS:
            bucket = open_buckets[key] = []
            buckets.append(bucket)
        bucket.append(t)
    for bucket in buckets:
        total = _all_reduce_sum(torch.cat([t.reshape(-1) for t in bucket]), backend)
        total /= world
        offset = 0
        for t in bucket:
            t.copy_(total[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src``, returned on every rank (picklable objects)."""
    backend = _active_backend()
    if backend is None:
        return obj
    if backend == "horovod":
        return horovod_adapter.broadcast_object(obj, src)
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, returned on every rank (picklable objects)."""
    backend = _active_backend()
    if backend is None:
        return [obj]
    if backend == "horovod":
        return list(horovod_adapter.allgather_object(obj))
    out: list = [None] * get_env().world_size
    dist.all_gather_object(out, obj)
    return out
