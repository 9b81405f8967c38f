"""torch.distributed for one run: process group from torchrun or SLURM tasks, DDP/FSDP wrapping, rank agreement."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in the job; a single process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: stop decisions must agree or a rank hangs."""
        return self.any_each(flag)[0]

    def any_each(self, *flags: bool) -> tuple[bool, ...]:
        """`any` of several flags in one collective (the loop's stop and save-now decisions, every step)."""
        if not self.enabled:
            return flags
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_collective_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks."""
        if not self.enabled:
            return values
        out = values.detach().clone().to(_collective_device())
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(values.device)

    def max(self, value: int) -> int:
        """The largest of an integer over ranks (how many batches every rank must run when forwards are collective)."""
        if not self.enabled:
            return int(value)
        t = torch.tensor([int(value)], device=_collective_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj, dst: int = 0) -> list | None:
        """Every rank's picklable obj, in rank order, on rank dst (None elsewhere); [obj] in one process.
        Only for what exp's own ranks made (never data from outside)."""
        if not self.enabled:
            return [obj]
        parts = [None] * self.world_size if self.rank == dst else None
        tdist.gather_object(obj, parts, dst=dst)
        return parts

    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (same shape everywhere), flattened and concatenated in rank order."""
        if not self.enabled:
            return tensor
        local = tensor.detach().to(_collective_device())
        parts = [torch.zeros_like(local) for _ in range(self.world_size)]
        tdist.all_gather(parts, local)
        return torch.cat([p.reshape(-1) for p in parts]).to(tensor.device)

    def broadcast_str(self, text: str) -> str:
        """Rank 0's string on every rank."""
        if not self.enabled:
            return text
        box = [text]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def _collective_device() -> torch.device:
    backend = tdist.get_backend() if tdist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def launched_ranks() -> int:
    """How many processes the launcher started: torchrun's WORLD_SIZE, or SLURM's task count."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("SLURM_NTASKS", "1"))


def check_launch(strategy: str) -> None:
    """hardware.distributed=ddp|fsdp needs several processes started by torchrun or SLURM, or torchrun's one (a job
    resumed on one rank trains as a single process); say how."""
    if strategy not in STRATEGIES:
        raise ValueError(f"hardware.distributed={strategy!r} must be one of {', '.join(STRATEGIES)}")
    if strategy != "none" and launched_ranks() < 2 and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"hardware.distributed={strategy} needs several processes: start it with "
            f"`torchrun --nproc_per_node=N train.py hardware={strategy} ...`, or on SLURM with "
            "`python train.py -m hardware=slurm_ddp hydra.launcher.tasks_per_node=N ...`"
        )


def init(strategy: str, device_type: str) -> Dist:
    """Join the process group (nccl on GPUs, gloo on CPU); a no-op without a distributed strategy."""
    if strategy == "none" or launched_ranks() < 2:
        return Dist()
    if "RANK" not in os.environ:  # SLURM tasks: submitit derives RANK, WORLD_SIZE, MASTER_ADDR/PORT from SLURM_*
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, strategy)


def wrap(model: torch.nn.Module, dist: Dist, param_dtype: torch.dtype) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per block, then the root) with a mixed-precision policy from the stage dtype."""
    if dist.strategy == "ddp" and dist.enabled:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # the only buffers (RoPE tables) are computed alike on every rank: nothing to broadcast each forward
        # (the keyword is forward_sync_buffers since torch 2.13, where broadcast_buffers warns as deprecated)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    if dist.strategy == "fsdp" and dist.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean ending the ranks leave together: a gloo rank that tears its group
    down while a peer is still busy (rank 0 writing the summary and sample) can abort at exit (SIGABRT) and fail
    a job that finished. After an error no barrier: the peer may be gone."""
    if not tdist.is_initialized():
        return
    if clean:
        try:
            tdist.barrier()
        except Exception:  # a peer that died at its very end: leaving is all that is left to do
            pass
    tdist.destroy_process_group()
