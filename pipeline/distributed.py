"""Process-group set-up for `torchrun` and SLURM `srun`, and the few collectives the stages use.

Rank, world size and local rank come from torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK) or, under `srun`, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
MASTER_ADDR/MASTER_PORT must be exported by the launcher (the sbatch templates in this
folder do it). A plain `python` process is a world of one and needs no process group.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_launcher(environ=None) -> DistEnv:
    """Read rank/world/local rank from torchrun's or SLURM's variables (torchrun wins)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", 1)) > 1:
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)))
    return DistEnv()


def init(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on CPUs); return env and device."""
    env = env_from_launcher()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    torch_device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if env.distributed and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"{name} is not set: launch with torchrun, or export it in the sbatch script")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
        )
    return env, torch_device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (every rank gets the same answer)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (`value` itself without a process group)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def sum_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `[n_r, ...]` tensors from every rank along dim 0, in rank order (sizes may differ)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
