"""An in-memory loader: the whole dataset lives in one tensor on the device, batches are index slices,
and augmentation is applied to whole batches with tensor ops (no per-sample Python, no workers).

Shuffling is seeded by ``(seed, epoch)``, so an epoch's batches are a pure function of those two
numbers: a resumed run sees exactly the batches an uninterrupted run would. Under data parallelism
each of ``world_size`` ranks takes its contiguous share of every *global* batch, so N processes see
together exactly the batches one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Batched augmentation: random crop after padding, and random flip of the last axis.

    Attributes:
        crop_padding: pixels of padding on each side before a random crop back to the input size
            (0 = no crop). The standard CIFAR recipe is 4.
        padding_mode: ``"reflect"`` or ``"zeros"``.
        flip: probability of flipping the last (width) axis of each sample.
    """

    crop_padding: int = 0
    padding_mode: str = "reflect"
    flip: float = 0.0

    def __post_init__(self):
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.padding_mode not in ("reflect", "zeros"):
            raise ValueError(
                f"padding_mode must be 'reflect' or 'zeros', got {self.padding_mode!r}"
            )
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {self.flip}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``(N, C, *spatial)``; the random draws come from ``generator`` (CPU)."""
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, self.padding_mode, generator)
        if self.flip > 0:
            x = random_flip(x, self.flip, generator)
        return x


def random_crop(
    x: torch.Tensor, padding: int, mode: str, generator: torch.Generator
) -> torch.Tensor:
    """Pad the spatial axes of ``x`` by ``padding`` and crop each sample back at a random offset
    (uniform over the ``2 * padding + 1`` positions per axis)."""
    n, spatial = x.shape[0], x.shape[2:]
    pad = [padding] * (2 * len(spatial))
    if mode == "reflect":
        if any(s <= padding for s in spatial):
            raise ValueError(
                f"reflect padding {padding} needs every spatial size > it, got {spatial}"
            )
        padded = F.pad(x, pad, mode="reflect")
    else:
        padded = F.pad(x, pad)
    out = padded
    # Crop one axis at a time with a per-sample gather along that axis.
    for axis, size in enumerate(spatial, start=2):
        offsets = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        index = offsets[:, None] + torch.arange(size, device=x.device)[None, :]  # (N, size)
        shape = [n] + [1] * (out.ndim - 1)
        shape[axis] = size
        expand = list(out.shape)
        expand[axis] = size
        out = out.gather(axis, index.view(shape).expand(expand))
    return out


def random_flip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Flip the last axis of each sample with probability ``p``."""
    mask = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


class InMemoryLoader:
    """Iterate over ``(x, y)`` batches of tensors that are already in memory.

    Args:
        x, y: inputs ``(N, ...)`` and labels ``(N,)``; moved to ``device`` once.
        batch_size: the global batch size (split across ranks under data parallelism).
        shuffle: draw a new permutation each epoch (seeded by ``seed`` and the epoch).
        drop_last: drop a last batch smaller than ``batch_size``.
        augment: batched augmentation applied to training batches, or None.
        rank, world_size: this process's share of each global batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the global batch_size {batch_size} must be divisible by the {world_size} processes"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augment = augment if augment is not None and augment.active else None
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation draws the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def global_batch_size(self, index: int) -> int:
        """The number of samples (over all ranks) in batch ``index`` of an epoch."""
        return min(self.batch_size, self.x.shape[0] - index * self.batch_size)

    def _generator(self, stream: int) -> torch.Generator:
        g = torch.Generator()
        # Distinct, reproducible streams per (seed, epoch, purpose); the rank is not mixed in, so all
        # ranks draw the same global permutation and augmentation and just slice it differently.
        g.manual_seed((self.seed * 1_000_003 + self.epoch) * 4 + stream)
        return g

    def __iter__(self):
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(0)).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        augment_generator = self._generator(1)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            x, y = self.x[index], self.y[index]
            if self.augment is not None:
                x = self.augment(x, augment_generator)
            if self.world_size > 1:
                share = -(-index.shape[0] // self.world_size)
                x = x[self.rank * share : (self.rank + 1) * share]
                y = y[self.rank * share : (self.rank + 1) * share]
            yield x, y
