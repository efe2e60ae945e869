"""DataLoaders for a task: the training order, evaluation loaders, and the loaders of one run.

The training order depends only on (seed, epoch) through `EpochSampler`, so every DDP rank and every
resumed run draws the same batches; accelerate shards them across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .task import Task
from .transforms import make_transform


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): every DDP rank and every resumed run agree."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def build_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and worker seeds (hence augmentation) follow `seed`.

    Decoding and transforms run in `num_workers` processes (0: in this one). Workers persist across
    epochs, so their start-up (a fork plus each worker's own file handles) is paid once.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)  # torch derives each worker's torch / random / numpy seed from it
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


@dataclass
class RunLoaders:
    """What the training loop reads: shuffled train batches (and their sampler), val and test loaders."""

    train: torch.utils.data.DataLoader
    sampler: EpochSampler
    val: torch.utils.data.DataLoader | None = None
    test: torch.utils.data.DataLoader | None = None


def run_loaders(
    task: Task,
    model: torch.nn.Module,
    *,
    train_split: str,
    val_split: str | None,
    test_split: str | None,
    batch_size: int,
    num_workers: int,
    seed: int,
    resize: str,
    augment: bool = False,
) -> RunLoaders:
    """Loaders of one run. Without augmentation, training images get the evaluation transform."""
    eval_tf = make_transform(model, train=False, resize=resize)
    train_tf = make_transform(model, train=True) if augment else eval_tf
    train_ds = task.dataset(train_split, train_tf)
    sampler = EpochSampler(len(train_ds), seed)
    train = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers)

    def evaluation(split: str | None) -> Any:
        if not split:
            return None
        return build_loader(task.dataset(split, eval_tf), batch_size=batch_size, num_workers=num_workers)

    return RunLoaders(train, sampler, evaluation(val_split), evaluation(test_split))
