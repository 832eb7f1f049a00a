"""torch.distributed set-up for ``torchrun`` (nccl on CUDA, gloo on the CPU) and helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import DEVICE_SYNTAX
from .errors import ConfigError

__all__ = ["Dist", "init_distributed", "pick_device", "available_devices", "all_reduce_sum", "gather_objects", "barrier",
           "shutdown"]


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int) -> torch.device:
    """``auto | cpu | cuda | cuda:N | mps`` -> the device, or :class:`ConfigError` naming those this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if DEVICE_SYNTAX.fullmatch(device) is None:
        raise ConfigError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps; "
                          f"this machine has {available_devices()}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (it has "
                              f"{available_devices()}); use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: no GPU of index {dev.index} (process {local_rank} of this node); "
                              f"this machine has {available_devices()}")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"--device mps: Apple's MPS is not available on this machine (it has "
                          f"{available_devices()}); use --device cpu or auto")
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> str:
    """``"cpu, cuda:0, cuda:1"``: the devices of this machine, as ``--device`` spells them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return ", ".join(found)


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place); a no-op on one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
