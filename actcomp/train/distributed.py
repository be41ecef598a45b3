"""One process or many (torchrun): the device, the process group, and samplers that split epochs between processes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..devices import parse_device
from ..errors import ActcompError, one_line
from .config import TrainError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call joined the group, so it also leaves it

    @property
    def main(self) -> bool:
        return self.rank == 0


def train_device(spec: str) -> torch.device:
    """``auto`` (CUDA where there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return parse_device(spec, ("cpu", "cuda"))
    except ActcompError as e:
        raise TrainError(one_line(e)) from None


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = train_device(device)
    if world <= 1:
        return Dist(device=dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


class EpochSampler(Sampler):
    """Epochs shorter (or longer) than the dataset, for evaluating more often than once per pass.

    The training stream is the endless concatenation of permutations of the whole set, pass ``p`` shuffled by a
    generator seeded from ``(seed, p)``; epoch ``e`` is samples ``[e*k, (e+1)*k)`` of that stream, so every
    sample is seen once per pass and the order is a pure function of (seed, epoch): the same for every preset
    and after a resume. Under DDP each process takes every ``world``-th sample of the epoch.
    """

    def __init__(self, n: int, k: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.k, self.seed, self.rank, self.world, self.epoch = n, k, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _perm(self, p: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p)).tolist()

    def __iter__(self):
        idx, pos = [], self.epoch * self.k
        while len(idx) < self.k:
            p, off = divmod(pos + len(idx), self.n)
            idx += self._perm(p)[off: off + self.k - len(idx)]
        return iter(idx[self.rank:: self.world][: len(self)])

    def __len__(self) -> int:
        return self.k // self.world


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: each val sample is evaluated exactly once across processes
    (DistributedSampler would pad with duplicates and bias the metrics)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def all_sum(values: list[float], d: Dist) -> list[float]:
    """``values`` summed over all processes (as they are with one)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_rng_states(state: dict, d: Dist) -> list[dict]:
    """Every process's RNG state (``state`` is this one's), so that a resumed DDP run continues every stream."""
    if d.world == 1:
        return [state]
    states = [None] * d.world
    dist.all_gather_object(states, state)
    return states


__all__ = ["Dist", "EpochSampler", "ShardSampler", "all_rng_states", "all_sum", "init_distributed", "train_device"]
