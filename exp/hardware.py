"""Device, precision, autocast, compile and matmul settings for one process."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

import torch

from exp.perf import peak_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class Hardware:
    """The `hardware` group: where and in what precision one process trains."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    matmul_precision: str = "high"  # highest | high | medium (torch.set_float32_matmul_precision)
    num_threads: int | None = None
    distributed: str = "none"  # none | ddp | fsdp: several processes from torchrun or SLURM tasks
    peak_flops: float | None = None  # one device's peak FLOP/s for perf/mfu; None: known GPUs' datasheet figure

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"hardware.dtype={self.dtype!r} must be one of auto, {', '.join(DTYPES)}")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(f"hardware.matmul_precision={self.matmul_precision!r} must be highest, high or medium")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"hardware.num_threads={self.num_threads} must be >= 1")
        parse_device(self.device)  # whether the device exists is the node's business: check_node()
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"hardware.distributed={self.distributed!r} must be none, ddp or fsdp")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"hardware.peak_flops={self.peak_flops!r} must be > 0 (FLOP/s of one device) or null")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, name: str | None = None) -> torch.dtype:
        """The training dtype for `name` (a stage's dtype; `auto` picks the best this device has)."""
        return resolve_dtype(name or self.dtype, self.torch_device())

    def check_node(self, dtype: str | None = None) -> None:
        """Raise ValueError when this machine lacks the device or the dtype asked for.

        A property of the node a job runs on, not of the config: a SLURM sweep submitted from a login node
        without a GPU is checked here when each job starts, on its GPU node.
        """
        self.torch_dtype(dtype)


def parse_device(name: str) -> torch.device | None:
    """The device a name stands for (None for auto), without asking whether this machine has it."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"hardware.device={name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"hardware.device={name!r}: only cpu, cuda and mps are supported")
    return device


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; anything asked for that is not here raises."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"on {socket.gethostname()}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"hardware.device={name} but no CUDA device is available {where} (use hardware=cpu or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"hardware.device={name} but only {torch.cuda.device_count()} CUDA devices exist {where}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"hardware.device={name} but MPS is not available {where}")
    return device


def check_dtype_name(name: str) -> None:
    """A dtype name exp knows (auto, float32, bfloat16, float16), whatever the device."""
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"stage.dtype={name!r} must be one of auto, {', '.join(DTYPES)}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch, refusing a half type the device cannot run."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"stage.dtype={name!r} must be one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"stage.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16 support")
    if dtype is torch.float16 and device.type == "mps":
        raise ValueError("stage.dtype=float16 is not supported on mps; use float32")
    return dtype


@dataclass
class Runtime:
    """What the loop needs to know about the hardware, resolved once."""

    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    peak_flops: float | None = None  # one device's, for perf/mfu (exp.perf); None: unknown, no MFU

    def autocast(self):
        """Mixed-precision context for forward passes; a no-op in float32."""
        if self.dtype is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """float16 needs loss scaling; bfloat16 and float32 do not."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory, or the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def setup(hw: Hardware, dtype: str, local_rank: int = 0) -> Runtime:
    """Apply process-wide settings and return the resolved runtime (one GPU per local rank)."""
    device = hw.torch_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if hw.num_threads is not None:
        torch.set_num_threads(hw.num_threads)
    torch.set_float32_matmul_precision(hw.matmul_precision)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = hw.torch_dtype(dtype)
    return Runtime(device=device, dtype=dtype, compile=hw.compile, peak_flops=peak_flops(device, dtype, hw.peak_flops))
