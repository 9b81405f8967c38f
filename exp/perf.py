"""Model FLOPs utilisation: the model's training FLOPs per token x tokens/s over the devices' peak FLOP/s.

The definition is PaLM's (Chowdhery et al. 2022, appendix B), as nanoGPT's `estimate_mfu` computes it: training
FLOPs per token = 6 N + 12 n_layer d_model seq_len (N: the weights used in matmuls; exp.model.protocol.
flops_per_token, which a model may declare itself), achieved FLOP/s = that x tokens/s, MFU = achieved / peak. Peak is
the dense (no sparsity) tensor-core figure of the device for the training dtype, from the vendor's datasheet below,
or `hardware.peak_flops` (FLOP/s of one device: needed on a CPU, where there is no table; without it no MFU is
logged, and nothing fails).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: exp.rundir reads mfu() in processes that never load torch (the MLflow worker)
    import torch

TF = 1e12
# (name fragment of torch.cuda.get_device_name, {precision: dense FLOP/s}), the first fragment found wins: the more
# specific names come first ("H100 PCIe" before "H100", "L40S" before "L4"). Sources: NVIDIA's datasheets, the dense
# figures (the sparse ones are twice these). bf16 and fp16 run at the same rate on all of them; tf32 is float32 under
# torch.set_float32_matmul_precision("high"/"medium"), fp32 under "highest".
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.4 * TF, "tf32": 494.7 * TF, "fp32": 66.9 * TF}),  # GH200 Grace Hopper datasheet
    ("H200", {"bf16": 989.4 * TF, "tf32": 494.7 * TF, "fp32": 66.9 * TF}),  # H200 SXM datasheet (2024)
    ("H100 PCIe", {"bf16": 756.0 * TF, "tf32": 378.0 * TF, "fp32": 51.2 * TF}),  # H100 datasheet, PCIe column
    ("H100 NVL", {"bf16": 835.5 * TF, "tf32": 417.5 * TF, "fp32": 60.0 * TF}),  # H100 NVL datasheet, per GPU
    ("H100", {"bf16": 989.4 * TF, "tf32": 494.7 * TF, "fp32": 66.9 * TF}),  # H100 datasheet, SXM column (HBM3)
    ("B200", {"bf16": 2250.0 * TF, "tf32": 1100.0 * TF, "fp32": 75.0 * TF}),  # DGX B200 / HGX B200 datasheet, per GPU
    ("A100", {"bf16": 312.0 * TF, "tf32": 156.0 * TF, "fp32": 19.5 * TF}),  # A100 datasheet (SXM and PCIe alike)
    ("L40S", {"bf16": 362.05 * TF, "tf32": 183.0 * TF, "fp32": 91.6 * TF}),  # L40S datasheet
    ("L4", {"bf16": 121.0 * TF, "tf32": 60.0 * TF, "fp32": 30.3 * TF}),  # L4 datasheet
    ("A10", {"bf16": 125.0 * TF, "tf32": 62.5 * TF, "fp32": 31.2 * TF}),  # A10 datasheet (A10G: the same chip)
    ("V100", {"bf16": 125.0 * TF, "tf32": 15.7 * TF, "fp32": 15.7 * TF}),  # V100 SXM2: fp16 tensor cores, no bf16/tf32
)


def precision(dtype: torch.dtype) -> str:
    """The table's column for a training dtype: bf16 for half types, tf32 or fp32 for float32 by matmul precision."""
    import torch

    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_peak(name: str, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of a device by its name (torch.cuda.get_device_name) and training dtype; None: unknown."""
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return peaks[precision(dtype)]
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device: hardware.peak_flops when set, else the table's figure for a known GPU, else None."""
    if configured is not None:
        return float(configured)
    if device.type == "cuda":
        import torch

        return device_peak(torch.cuda.get_device_name(device), dtype)
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation of `num_devices` devices processing tokens_per_s together; None without a peak."""
    if not peak or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * num_devices)
