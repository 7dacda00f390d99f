"""A training data loader whose position is part of the checkpoint, so that ``--resume`` continues
the same data order and the same augmentations.

Detectron2's ``build_detection_train_loader`` draws from a ``TrainingSampler`` stream that starts
again at its beginning in every process, and its augmentations draw from each worker's global
numpy RNG: a resumed run sees other images and other augmentations than the run it continues.
Here:

- the index stream is a function of (seed, position): epoch ``e`` is the permutation drawn from
  ``seed + e`` (or ``0..N-1`` without shuffling), and process ``r`` of ``W`` takes positions
  ``r, r + W, ...`` (as ``TrainingSampler`` does);
- batches are formed in the main process from indices only (aspect-ratio grouping like
  Detectron2's ``AspectRatioGroupedDataset``: landscape vs. portrait buckets, from the records'
  ``width``/``height``), so skipping ``n`` batches replays integers, not images;
- each sample is mapped with numpy's and Python's global RNGs seeded from (seed, position) and
  restored afterwards, so its augmentation does not depend on the worker count or on a restart;
  an unreadable image (the mapper returns None) is replaced by an index drawn from the same seed;
- ``state_dict()`` is ``{"batches_consumed", "seed"}``; ``load_state_dict`` before the first
  batch makes the loader continue after that many batches.

``LazyConfigTrainer`` builds this loader from a config's ``build_detection_train_loader``
arguments (``resumable_loader_from_config``).
"""
import contextlib
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

__all__ = ["ResumableBatchSampler", "ResumableTrainLoader", "build_resumable_train_loader",
           "resumable_loader_from_config"]

logger = logging.getLogger(__name__)
_MAX_RETRIES = 100


def _derived_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class ResumableBatchSampler:
    """Infinite stream of this process's batches, each a list of (dataset index, stream position).

    aspect_groups: per record 0 (width > height) or 1, or None for no grouping."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int,
                 aspect_groups: Optional[Sequence[int]] = None, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("the training dataset is empty")
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, int(seed)
        self.aspect_groups = None if aspect_groups is None else np.asarray(aspect_groups)
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0

    def _indices(self) -> Iterator[Tuple[int, int]]:
        position = self.rank
        epoch, order = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = (np.random.default_rng(self.seed + epoch).permutation(self.size)
                         if self.shuffle else np.arange(self.size))
            yield int(order[position % self.size]), position
            position += self.world_size

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        buckets: Dict[int, List[Tuple[int, int]]] = {}
        for item in self._indices():
            group = 0 if self.aspect_groups is None else int(self.aspect_groups[item[0]])
            bucket = buckets.setdefault(group, [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def __iter__(self):
        batches = self._batches()
        for _ in range(self.start_batch):  # replay indices only
            next(batches)
        yield from batches


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """numpy's and Python's global RNGs seeded with ``seed`` inside, restored afterwards
    (Detectron2's augmentations draw from them)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _SeededMapDataset(torchdata.Dataset):
    def __init__(self, records, mapper: Callable, seed: int):
        self.records, self.mapper, self.seed = records, mapper, seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item: Tuple[int, int]):
        index, position = item
        for attempt in range(_MAX_RETRIES):
            with _seeded_global_rngs(_derived_seed(self.seed, position, attempt)):
                out = self.mapper(self.records[index])
            if out is not None:
                return out
            index = int(np.random.default_rng(_derived_seed(self.seed, position, attempt, 1)).integers(len(self)))
        raise RuntimeError(f"{_MAX_RETRIES} images in a row could not be used for training "
                           f"(see the warnings above, which name them)")


def _list_batch(batch):
    return batch


class ResumableTrainLoader:
    """Iterable of per-process batches (lists of mapped dicts) with a resumable position."""

    def __init__(self, dataset: List[Dict], mapper: Callable, batch_size: int, *, shuffle: bool, seed: int,
                 aspect_ratio_grouping: bool, num_workers: int):
        groups = ([0 if r.get("width", 1) > r.get("height", 1) else 1 for r in dataset]
                  if aspect_ratio_grouping else None)
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed,
                                             aspect_groups=groups, rank=comm.get_rank(),
                                             world_size=comm.get_world_size())
        self.dataset = _SeededMapDataset(DatasetFromList(dataset, copy=False), mapper, seed)
        self.num_workers = num_workers
        self.batches_consumed = 0
        self._started = False

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __iter__(self):
        self._started = True
        self.sampler.start_batch = self.batches_consumed
        loader = torchdata.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
            collate_fn=_list_batch,
            # its own generator: starting the loader does not draw from the global torch RNG
            generator=torch.Generator().manual_seed(self.sampler.seed))
        for batch in loader:
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"batches_consumed": self.batches_consumed, "seed": self.sampler.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self._started:
            raise RuntimeError("ResumableTrainLoader.load_state_dict must be called before iterating")
        self.batches_consumed = int(state["batches_consumed"])
        self.sampler.seed = self.dataset.seed = int(state["seed"])


def build_resumable_train_loader(dataset: List[Dict], *, mapper: Callable, total_batch_size: int,
                                 aspect_ratio_grouping: bool = True, num_workers: int = 0,
                                 shuffle: bool = True, seed: Optional[int] = None) -> ResumableTrainLoader:
    """``build_detection_train_loader``'s arguments (dataset dicts, mapper, total batch, grouping,
    workers) with a resumable position. seed None: one random seed shared by all processes."""
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(f"dataloader.train.total_batch_size ({total_batch_size}) must be a positive "
                         f"multiple of the number of processes ({world_size})")
    if seed is None:
        seed = comm.shared_random_seed()
    return ResumableTrainLoader(list(dataset), mapper, total_batch_size // world_size, shuffle=shuffle,
                                seed=seed, aspect_ratio_grouping=aspect_ratio_grouping,
                                num_workers=num_workers)


_SUPPORTED = {"_target_", "dataset", "mapper", "total_batch_size", "aspect_ratio_grouping", "num_workers", "sampler"}


def resumable_loader_from_config(spec) -> Optional[ResumableTrainLoader]:
    """Build a ``ResumableTrainLoader`` from a LazyConfig node calling
    ``build_detection_train_loader`` (with no sampler or a ``TrainingSampler``). Returns None for
    other loaders and options (the caller builds those as they are, without an exact resume)."""
    target = spec.get("_target_")
    if target is not build_detection_train_loader or set(spec.keys()) - _SUPPORTED:
        return None
    sampler = spec.get("sampler")
    if sampler is not None and not (hasattr(sampler, "get") and sampler.get("_target_") is TrainingSampler):
        return None
    if spec.get("mapper") is None or isinstance(spec.get("dataset"), str):
        return None
    return build_resumable_train_loader(
        instantiate(spec.dataset), mapper=instantiate(spec.mapper), total_batch_size=spec.total_batch_size,
        aspect_ratio_grouping=spec.get("aspect_ratio_grouping", True), num_workers=spec.get("num_workers", 0),
        shuffle=sampler.get("shuffle", True) if sampler is not None else True,
        seed=sampler.get("seed", None) if sampler is not None else None)
