"""What this machine offers the stages: CPU share for data loading, native bf16. Imports no torch at
module level, so the CLIs' --help stays fast."""
import os


def default_workers(limit: int = 8) -> int:
    """DataLoader workers per process: the CPUs this process may use less one for the process itself,
    at least 1, at most `limit`. Measured on a 2-core machine: 2 workers beside the 2 compute threads
    trained the demo MAE 15 % slower than 1 worker (252 vs 297 images/s), as the workers pre-empt
    threads that the others then wait for."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cpus - 1))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls and convolutions natively (AVX512-BF16 or AMX): there
    bf16 autocast roughly halves an MAE step and a CNN forward, elsewhere it is emulated and slower."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision, device) -> str:
    """Inference autocast, "bf16" or "fp32". auto: bf16 on CUDA, fp32 on CPU (exact parity with reference
    implementations); bf16 on a CPU needs native support (AVX512-BF16/AMX), where it runs a CNN about 3x
    and a ViT about 2x faster. device: a torch.device."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise ValueError("precision bf16: this CPU has no native bf16 support; use fp32")
    return precision
