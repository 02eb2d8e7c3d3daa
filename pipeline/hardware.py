"""What this machine offers the stages: CPU share for data loading, native bf16. Imports no torch at
module level, so the CLIs' --help stays fast."""
import os
from agmae.errors import UserError


def default_workers(device: str = "cpu", limit: int = 8) -> int:
    """DataLoader workers per process, from the CPUs this process may use, shared among the node's ranks
    when torchrun starts several (LOCAL_WORLD_SIZE), less one for the process itself, at least 1.

    On a CPU the compute threads need those cores, so at most `limit` (on 2 cores, a second worker slowed the
    demo's training: docs/PERFORMANCE.md#training). On CUDA ("cuda", "cuda:N", or "auto" where CUDA is present)
    the process mostly waits on the GPU and decoding is the limit, so the whole share."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    on_cuda = device.startswith("cuda")
    if device == "auto":
        import torch

        on_cuda = torch.cuda.is_available()
    return max(1, share - 1 if on_cuda else min(limit, share - 1))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls and convolutions natively (AVX512-BF16 or AMX): there
    bf16 autocast roughly halves an MAE step and a CNN forward, elsewhere it is emulated and slower."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


PRECISIONS = ("auto", "native", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "native", "fp32", "bf16")


def resolve_precision(precision: str, device, training: bool = False) -> str:
    """The one place a --precision becomes "fp32", "bf16" or "fp16" (autocast dtype), for every stage.

    auto: bf16 on CUDA (when training on a GPU without bf16: fp16, with loss scaling), fp32 on a CPU,
    which keeps exact parity with reference implementations; native: as auto, but bf16 also on a CPU
    that computes it natively (AVX512-BF16/AMX), where it runs a ViT about 2x and a CNN about 3x faster.
    bf16 needs native support; fp16 is for training on CUDA only. device: a torch.device."""
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    on_cuda = device.type == "cuda"
    bf16_native = torch.cuda.is_bf16_supported() if on_cuda else cpu_has_native_bf16()
    if precision in ("auto", "native"):
        if on_cuda:
            return "bf16" if bf16_native else ("fp16" if training else "fp32")
        return "bf16" if precision == "native" and bf16_native else "fp32"
    if precision == "bf16" and not bf16_native:
        raise UserError(f"precision bf16: this {device.type.upper()} has no native bf16 support; use fp32")
    if precision == "fp16" and not (on_cuda and training):
        raise UserError("precision fp16 is for training on a CUDA device (CPU autocast and feature "
                         "extraction support bf16 only); use bf16 or fp32")
    return precision


def autocast_dtype(resolved: str):
    """The torch autocast dtype of a resolved precision ("fp32", "bf16", "fp16"); None for fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]
