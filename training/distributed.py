"""The processes of one training run: torch.distributed set up from the launcher's environment.

A run is one process, or ``WORLD_SIZE`` processes started by ``torchrun --nproc_per_node N`` (or
``accelerate launch --multi_gpu --num_processes N``, which runs torchrun), each reading ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``. The default process group is always gloo, so
the small CPU messages (the device check, metrics, the stop flag) work whatever the device; on GPUs a second,
NCCL group carries the gradients and parameter broadcasts.

Devices: ``auto`` is ``cuda:LOCAL_RANK`` where that GPU exists, else the CPU; ``cuda`` is ``cuda:LOCAL_RANK``.
Every rank's device is gathered before any work, and ranks that resolved to different kinds of device (two
processes on a one-GPU machine with ``device: auto``: rank 0 on the GPU, rank 1 on the CPU) are refused with
an error naming each rank's device, instead of training two different things.

Sharding (``sharding: fsdp``): torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) on every block of the backbone
(the classes its diffusers model lists in ``_no_split_modules``: SD3's joint blocks, FLUX's double and single
blocks, a UNet's resnet/transformer blocks) and then on the whole backbone, over all processes: each holds 1/N of
every parameter, gradient and AdamW moment; a block's parameters are gathered for its forward and again for its
recomputation in the backward pass, and its gradients reduce-scattered (averaged) after it. Every process must
therefore make the same backbone calls in the same order. Checkpoints hold the gathered full state (the same
tensors as an unsharded run's), written by rank 0; each process loads its shard from that full state.

``accelerate launch --num_processes N --cpu`` does NOT start N processes: accelerate's simple launcher runs one
(its CPU multi-process mode goes through mpirun and a hostfile). It leaves ``MASTER_ADDR`` set and no
``WORLD_SIZE``; :func:`init_processes` recognises that and refuses, pointing at torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from diffsteer.guidance.errors import InvalidInput

# Longest wait of one collective: evaluation runs on the main process while the others wait at a barrier.
TIMEOUT = timedelta(hours=2)
BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most this many elements


def resolve_device(requested: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process for the config's ``device`` (see the module docstring)."""
    if requested == "auto":
        if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise InvalidInput("device", f"unknown device {requested!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput("device", f"unsupported device {requested!r}; accepted: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput("device", f"{requested!r} requested but CUDA is not available here; use cpu or auto")
        if device.index is not None and world_size > 1:
            raise InvalidInput(
                "device",
                f"{requested!r} names one GPU for {world_size} processes; use cuda "
                "(each process takes the GPU of its LOCAL_RANK)",
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise InvalidInput(
                "device",
                f"process {local_rank} on this node needs cuda:{index} but "
                f"{torch.cuda.device_count()} GPU(s) are visible; start fewer processes",
            )
        device = torch.device("cuda", index)
    return device


def check_devices_agree(devices: list[str]) -> None:
    """Refuse ranks on different kinds of device (``devices[r]`` is rank r's, e.g. ``cuda:0`` or ``cpu``)."""
    kinds = {torch.device(d).type for d in devices}
    if len(kinds) > 1:
        listing = ", ".join(f"rank {r}: {d}" for r, d in enumerate(devices))
        raise InvalidInput(
            "device",
            f"the processes disagree on the device ({listing}); set device: cpu, or "
            "device: cuda with one GPU per process",
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def refuse_single_process_launch() -> None:
    """``accelerate launch --num_processes N --cpu`` (N > 1) silently runs one process: say so and stop."""
    if "WORLD_SIZE" in os.environ:
        return
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        raise InvalidInput(
            "launcher",
            "`accelerate launch --num_processes N --cpu` starts a single process (accelerate runs several CPU "
            "processes only through mpirun), so this would not be a multi-process run; start N CPU processes with "
            "`torchrun --nproc_per_node N -m training.METHOD --config ...`, or drop --num_processes",
        )


@dataclass
class Processes:
    """This process's place in the run and the collectives the trainer needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensor_group: Any = None  # the group for device tensors: NCCL on GPUs, the default gloo group on CPUs
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values (in place)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in tensors:
                buffer = t.detach().contiguous()
                torch.distributed.broadcast(buffer, src=0, group=self.tensor_group)
                if buffer.data_ptr() != t.data_ptr():
                    t.copy_(buffer)

    def average_gradients_(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the processes. A parameter without a gradient in one process
        counts as zero there; one without a gradient in every process keeps none (as in a single process, where
        the optimiser then skips it)."""
        if not self.distributed:
            return
        has_grad = torch.tensor([int(p.grad is not None) for p in params])
        torch.distributed.all_reduce(has_grad, op=torch.distributed.ReduceOp.MAX)
        used = [p for p, flag in zip(params, has_grad.tolist()) if flag]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in used:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for g in grads + [None]:
                if g is None or (bucket and size + g.numel() > BUCKET_ELEMENTS):
                    if bucket:
                        flat = torch.cat([b.reshape(-1) for b in bucket])
                        torch.distributed.all_reduce(flat, group=self.tensor_group)
                        flat /= self.world_size
                        offset = 0
                        for b in bucket:
                            b.copy_(flat[offset : offset + b.numel()].view_as(b))
                            offset += b.numel()
                    bucket, size = [], 0
                if g is not None:
                    bucket.append(g)
                    size += g.numel()

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes (every process must report the same names)."""
        if not self.distributed:
            return metrics
        names = sorted(metrics)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, names)
        if any(g != names for g in gathered):
            raise RuntimeError(f"processes report different metrics: {gathered}")
        values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return {n: float(v) / self.world_size for n, v in zip(names, values.tolist())}

    def share_work(self, n_items: int, compute: Callable[[int], Any]) -> list[Any]:
        """``[compute(i) for i in range(n_items)]`` on every process, each item computed once, by process
        ``i % world_size``, and sent from there to the others (over the default gloo group: keep results on the
        CPU). The results equal one process's when ``compute(i)`` depends only on ``i``."""
        if not self.distributed:
            return [compute(i) for i in range(n_items)]
        results: list[Any] = []
        for i in range(n_items):
            box = [compute(i) if i % self.world_size == self.rank else None]
            torch.distributed.broadcast_object_list(box, src=i % self.world_size)
            results.append(box[0])
        return results

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_processes(requested_device: str, group_for_one: bool = False) -> Processes:
    """Join the launcher's process group (if any), resolve and check the device; see the module docstring.
    ``group_for_one``: a single process gets a process group of its own too (FSDP2 shards over a group, here of
    one, so that a sharded run on one device is the same code as on several)."""
    refuse_single_process_launch()
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(requested_device, local_rank, world_size)
    dist = torch.distributed
    if world_size <= 1 and not group_for_one:
        return Processes(device=device)
    owns = not dist.is_initialized()
    if owns and world_size <= 1:  # no launcher: an in-memory rendezvous of one
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT)
    elif owns:
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"the process group ({dist.get_rank()}/{dist.get_world_size()}) does not match "
            f"RANK={rank} WORLD_SIZE={world_size}"
        )
    devices: list[Any] = [None] * world_size
    dist.all_gather_object(devices, str(device))
    try:
        check_devices_agree(devices)
    except InvalidInput:
        if owns:  # leave the group before refusing: a live gloo group at exit can abort the interpreter
            dist.destroy_process_group()
        raise
    tensor_group = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tensor_group = dist.new_group(backend="nccl", timeout=TIMEOUT)
    return Processes(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tensor_group=tensor_group,
        owns_group=owns,
    )


# -- sharding (FSDP2) ---------------------------------------------------------------------------------------------

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full state, on rank 0 only
FROM_FULL = StateDictOptions(full_state_dict=True)  # every process passes the full state and keeps its shard


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one, innermost first: the submodules whose class the diffusers model names in
    ``_no_split_modules``, else the entries of its top-level ``ModuleList``s."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    if not units:
        units = [block for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    order = {id(m): i for i, m in enumerate(module.modules())}
    return sorted(units, key=lambda m: -order[id(m)])  # post-order: a nested block before its parent


def shard_module(module: torch.nn.Module, processes: Processes) -> torch.nn.Module:
    """Shard ``module`` in place over every process (see the module docstring), after making its weights rank
    0's; its parameters become DTensors (build the optimiser over them afterwards)."""
    processes.broadcast_([t for _, t in sorted(module.state_dict(keep_vars=True).items())])
    group = processes.tensor_group or torch.distributed.group.WORLD
    mesh = DeviceMesh.from_group(group, processes.device.type)
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded module's full state_dict on the CPU of rank 0 (empty elsewhere); every process must call it."""
    return get_model_state_dict(module, options=GATHERED)


def load_gathered_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Each process keeps its shard of the full ``state``."""
    set_model_state_dict(module, state, options=FROM_FULL)


def gathered_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full state keyed by parameter names, on rank 0 (empty elsewhere); every process calls it."""
    return get_optimizer_state_dict(module, optimizer, options=GATHERED)


def load_gathered_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=FROM_FULL)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` (this process's shard where ``like`` is a DTensor; no communication)."""
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full
