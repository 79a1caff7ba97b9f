"""Deterministic, resumable, rank-aware batches.

Epoch e uses the permutation `randperm(n, seed=(seed, e))`. Global batch b is `perm[b*G:(b+1)*G]`
(G = batch_size x world_size, the last incomplete batch dropped) and rank r takes its r-th slice
of batch_size: every rank reads a disjoint part, and the union equals the single-process batch
of size G. Augmentation randomness is keyed by (seed, epoch, index), so it does not depend on the
number of workers, and the loader can resume at the exact batch it stopped at.
"""
from __future__ import annotations

import logging
import signal

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..seeding import mix_seed
from .decode import BadImage, decode_image

log = logging.getLogger("maskgen")


class AugmentedImages(Dataset):
    """`dataset[(epoch, index)]` → {"image": [3,S,S] in [0,1], "label": int, "index": int} (plus "image2", a
    second independent augmentation, when views=2) or {"bad": name, "reason": str, "index": int}."""

    def __init__(self, source, transform, seed: int, views: int = 1):
        self.source, self.transform, self.seed, self.views = source, transform, seed, views

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        sample = self.source[index]
        try:
            img = sample.data if not isinstance(sample.data, bytes) else decode_image(sample.data)
        except BadImage as e:
            return {"bad": sample.name, "reason": str(e), "index": index}
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        item = {"image": self.transform(img, g), "label": sample.label, "index": index}
        if self.views == 2:
            item["image2"] = self.transform(img, torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, 2)))
        return item


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which finishes its step and saves before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(items: list[dict]) -> dict:
    """Stack the fields of good samples ("image" or "tokens", "label", ...); bad ones are dropped and
    reported under "skipped" as (index, name, reason). A batch whose samples were all bad has only "skipped"."""
    good = [it for it in items if "bad" not in it]
    batch = {"skipped": [(it["index"], it["bad"], it["reason"]) for it in items if "bad" in it]}
    for key in (good[0] if good else {}):
        values = [it[key] for it in good]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)
    return batch


def subset(n: int, limit: int) -> list[int]:
    """The indices a run uses: all n, or a fixed random subset of `limit` (the same for every seed and run, so
    that a class-sorted source still gives every class)."""
    if not limit or limit >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(0x5B5E7)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


class ResumableLoader:
    """Infinite iterator over batches; `state_dict()` is the position of the next batch and the unreadable images
    met so far."""

    def __init__(self, dataset: AugmentedImages, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, limit: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.indices = subset(len(dataset), limit)
        self.num_samples = len(self.indices)
        global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(f"the data has {self.num_samples} images, fewer than one global batch of {global_batch} "
                            f"(train.batch_size={batch_size} x {world_size} processes): lower train.batch_size")
        self.epoch, self.batch = 0, 0
        self.bad: set[int] = set()  # source indices of the unreadable images met so far

    @property
    def skipped(self) -> int:
        """How many distinct images were unreadable (each counted once, however many epochs visit it)."""
        return len(self.bad)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "bad_indices": sorted(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; older states, which only counted visits ("skipped"), start an empty set."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.bad = {int(i) for i in state.get("bad_indices", ())}

    def epoch_keys(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of (epoch, index) keys for `epoch`."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        gb, b = self.batch_size * self.world_size, self.batch_size
        return [[(epoch, self.indices[i]) for i in perm[k * gb + self.rank * b: k * gb + (self.rank + 1) * b]]
                for k in range(self.batches_per_epoch)]

    def epoch_batches(self, epoch: int, start: int = 0):
        """This rank's collated batches of `epoch`, from batch number `start` on; an unreadable image is counted
        and logged the first time it is met."""
        keys = self.epoch_keys(epoch)[start:]
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers, collate_fn=collate,
                            worker_init_fn=_ignore_stop_signals, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None)
        for batch in loader:
            for index, name, reason in batch["skipped"]:
                if index not in self.bad:
                    self.bad.add(index)
                    log.warning("skipped unreadable image %s (%s) [%d skipped so far]", name, reason, self.skipped)
            yield batch

    def __iter__(self):
        """Batches from the saved position on, epoch after epoch (forever)."""
        while True:
            for batch in self.epoch_batches(self.epoch, self.batch):
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0
