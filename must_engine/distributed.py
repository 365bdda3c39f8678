"""One adaptation on several processes (ranks): what runs inside each rank under torchrun.

Launching the ranks is must_engine/launch.py's job; the process group is torch.distributed's own (env://
rendezvous set up by torch elastic), gradients are all-reduced by DistributedDataParallel, NCCL on GPUs,
gloo on CPU. The split is chosen so that N ranks compute what one process computes on the same global
batch and seed, to fp32 round-off:

- data: each global micro-batch of the single-process stream (ResumableSampler) is cut into N consecutive
  slices, one per rank (ShardedSampler); a step's images, and a resumed run's position, do not depend on N;
- losses: a mean over the micro-batch is the global sum over the global count (GlobalBatch.mean), and the
  fairness term averages the predictions of the whole global micro-batch, gathered with their gradient
  (the reference's all-gather with grad);
- the EMA teacher: every rank applies the same update to the same (all-reduced) student;
- side effects: only rank 0 reports progress and writes checkpoints and the artifact; whether to stop is
  rank 0's decision, broadcast every step, so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from must_engine.config import ConfigError
from must_engine.data import ResumableSampler
from must_engine.models import MustModel


class LocalBatch:
    """Statistics of the micro-batch this process holds; with one process, the whole micro-batch."""

    def mean(self, total: torch.Tensor, count: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
        """total / count (count at least `floor`): the micro-batch mean of a per-sample sum."""
        return total / count.clamp(min=floor)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample rows (B, ...) of the whole micro-batch."""
        return values


LOCAL_BATCH = LocalBatch()


class GlobalBatch(LocalBatch):
    """Statistics of the global micro-batch, split over the ranks of `group`.

    `mean` returns this rank's share: world_size x its sum / the global count, so that DDP's average of the
    ranks' gradients is the gradient of the global mean (a plain per-rank mean would weight a rank with few
    confident pseudo-labels or masked patches like one with many). `rows` gathers every rank's rows with
    their gradient: autograd's backward is a reduce-scatter of the sum, which DDP's average then cancels.
    """

    def __init__(self, group: dist.ProcessGroup, world_size: int) -> None:
        self.group = group
        self.world_size = world_size

    def mean(self, total: torch.Tensor, count: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
        count = count.detach().float().clone()
        dist.all_reduce(count, group=self.group)
        return self.world_size * total / count.clamp(min=floor)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        # The functional collective carries the gradient (torch.distributed.nn.functional.all_gather is its
        # deprecated twin); gathered along dim 0, in rank order. Its name before torch 2.14: *_tensor_*.
        from torch.distributed import _functional_collectives as collectives

        gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
        return gather(values.contiguous(), 0, self.group)


class ShardedSampler(Sampler[tuple[int, int]]):
    """This rank's keys of the single-process stream: slice `rank` of every global micro-batch.

    The stream is ResumableSampler's (a seeded permutation per epoch, from `start` images into the run);
    position p belongs to rank (p // micro_batch) % world_size, so rank r's k-th micro-batch is the r-th
    slice of the k-th global micro-batch of world_size x micro_batch images.
    """

    def __init__(self, num_items: int, *, seed: int, total: int, start: int, rank: int, world_size: int,
                 micro_batch: int) -> None:
        if (total - start) % (micro_batch * world_size):
            raise ValueError("the stream must hold whole global micro-batches")
        self.stream = ResumableSampler(num_items, seed=seed, total=total, start=start)
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, key in enumerate(self.stream):
            if (position // self.micro_batch) % self.world_size == self.rank:
                yield key

    def __len__(self) -> int:
        return len(self.stream) // self.world_size


class _Passes(nn.Module):
    """The student's two forward passes behind one forward(), so that DDP prepares the backward of both."""

    def __init__(self, student: MustModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        return self.student(images) if mask is None else self.student.forward_masked(images, mask)


@dataclass
class Replica:
    """How MustStep runs the student: its own forward passes, or DDP's, and DDP's gradient sync."""

    plain: Callable[[torch.Tensor], torch.Tensor]
    masked: Callable[[torch.Tensor, torch.Tensor], Any]
    ddp: DistributedDataParallel | None = None

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: all-reduce the gradients only on the step's last."""
        if self.ddp is None or sync:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


@dataclass
class Ranks:
    """This process's place in the run: rank 0 of 1 unless torchrun started it as one of several."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    # Loss statistics and the stop flag travel apart from DDP's gradient buckets, so their order never
    # interleaves with the buckets' asynchronous all-reduces.
    group: dist.ProcessGroup | None = field(default=None, repr=False)
    launcher_pid: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self, device: torch.device) -> str:
        return f"{self.world_size} x {device.type} ({self.backend})" if self.distributed else str(device)

    def place(self, device: torch.device) -> torch.device:
        """Rank r of a GPU run uses the node's GPU r."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def split_batch(self, batch_size: int, micro_batch_size: int, default: Callable[[int], int]) -> tuple[int, int]:
        """(images per forward pass on this rank, micro-batches per optimizer step).

        micro_batch_size stays what one device holds, so a global micro-batch is world_size of them.
        """
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of the {self.world_size} processes",
                              field="batch_size")
        micro = micro_batch_size or default(batch_size // self.world_size)
        if batch_size % (micro * self.world_size):
            raise ConfigError(
                f"batch_size {batch_size} must be a multiple of micro_batch_size x processes "
                f"({micro} x {self.world_size})", field="micro_batch_size",
            )
        return micro, batch_size // (micro * self.world_size)

    def sampler(self, num_items: int, *, seed: int, total: int, start: int,
                micro_batch: int) -> Sampler[tuple[int, int]]:
        if not self.distributed:
            return ResumableSampler(num_items, seed=seed, total=total, start=start)
        return ShardedSampler(num_items, seed=seed, total=total, start=start, rank=self.rank,
                              world_size=self.world_size, micro_batch=micro_batch)

    def batch(self) -> LocalBatch:
        return GlobalBatch(self._group(), self.world_size) if self.distributed else LOCAL_BATCH

    def replicate(self, student: MustModel, *, every_parameter_used: bool) -> Replica:
        """The student's passes; under DDP (which broadcasts rank 0's weights once) when distributed."""
        if not self.distributed:
            return Replica(plain=student, masked=student.forward_masked)
        device = next(student.parameters()).device
        ddp = DistributedDataParallel(
            _Passes(student), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not every_parameter_used,  # self-training only leaves the decoder idle
        )
        return Replica(plain=lambda images: ddp(images), masked=lambda images, mask: ddp(images, mask), ddp=ddp)

    def merge_meter(self, sums: dict[str, torch.Tensor], histogram: torch.Tensor | None) -> None:
        """Average the ranks' metric sums (equal micro-batches) and add their histograms, in place; one
        all-reduce per report."""
        if not self.distributed or not sums:
            return
        names = sorted(sums)
        parts = [sums[name].reshape(1) for name in names] + ([histogram] if histogram is not None else [])
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self._group())
        for index, name in enumerate(names):
            sums[name] = flat[index] / self.world_size
        if histogram is not None:
            histogram.copy_(flat[len(names):])

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's (n_r, K) CPU rows, in rank order, on every rank (n_r may differ: rows are padded)."""
        if not self.distributed:
            return rows
        count = torch.tensor([rows.shape[0]])
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self._group())
        padded = rows.new_zeros(max(int(n) for n in counts), *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self._group())
        return torch.cat([part[: int(n)] for part, n in zip(gathered, counts, strict=True)])

    def should_stop(self, asked: Callable[[], bool]) -> bool:
        """Rank 0's answer, on every rank. Rank 0 also stops when its launcher is gone (killed outright),
        rather than train on as an orphan whose progress nobody records."""
        if not self.distributed:
            return asked()
        flag = torch.tensor([self.is_main and (asked() or os.getppid() != self.launcher_pid)])
        dist.broadcast(flag, src=0, group=self._group())
        return bool(flag)

    def main_only(self, callback: Callable[[Any], None] | None) -> Callable[[Any], None]:
        return callback if callback is not None and self.is_main else (lambda _: None)

    def _group(self) -> dist.ProcessGroup:
        assert self.group is not None, "a distributed Ranks needs its process group"
        return self.group


SINGLE_PROCESS = Ranks()
_current: Ranks = SINGLE_PROCESS


def launched_as_rank() -> bool:
    """Whether torchrun (or torch elastic's launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def init_process_group(device: str = "auto") -> Ranks:
    """Join the run torch elastic started (env:// rendezvous); once per process. Single process: a no-op."""
    global _current
    if _current.distributed or not launched_as_rank():
        return _current
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and not device.startswith("mps") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)
    group = dist.new_group()
    assert isinstance(group, dist.ProcessGroup)  # this process is a member of the world group
    _current = Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     backend="nccl" if cuda else "gloo", group=group, launcher_pid=os.getppid())
    return _current


def current() -> Ranks:
    """The ranks adapt() trains over: those init_process_group joined, else this process alone."""
    return _current


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = SINGLE_PROCESS
