"""A data loader over tensors that already sit on the training device (as airbench does).

The whole split is one uint8 tensor (and its targets) on the device; an epoch is a seeded
permutation of its indices, sharded across ranks, cut into batches that are gathered by
indexing and then prepared (augmented and normalised) as whole batches on the device:

    loader = DeviceLoader(images, labels, batch_size=128, shuffle=True, seed=0,
                          prepare=lambda seed: BatchAugment(..., seed=seed))
    loader.set_epoch(epoch)
    for x, y in loader:
        ...

There are no worker processes and no per-image Python: indexing a device tensor is the
fastest way to form a batch that exists, and the per-batch augmentation runs where the
model does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def buffered_shuffle(order: torch.Tensor, buffer_size: int, generator: torch.Generator) -> torch.Tensor:
    """``order`` shuffled as tf.data's ``Dataset.shuffle(buffer_size)`` shuffles a stream.

    A buffer holds the next ``buffer_size`` elements of the stream; each output is drawn
    uniformly from the buffer and the stream's next element takes its place; once the stream
    ends the buffer drains the same way. An element can therefore come out at most
    ``buffer_size - 1`` places before its position in ``order``: a small buffer keeps each
    epoch close to the stored order (Keras recipes shuffle with ``batch_size * 10``), which a
    full permutation does not reproduce. ``buffer_size >= len(order)`` is a full shuffle.
    """
    n = len(order)
    stream = order.tolist()
    draws = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    buffer, nxt, out = stream[:buffer_size], min(buffer_size, n), []
    for u in draws:
        j = int(u * len(buffer))
        out.append(buffer[j])
        if nxt < n:
            buffer[j] = stream[nxt]
            nxt += 1
        else:  # the stream has ended: the buffer shrinks
            buffer[j] = buffer[-1]
            buffer.pop()
    return torch.tensor(out, dtype=order.dtype)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: every random draw of an epoch (order, augmentation,
    dropout) derives from it, so a run resumed at epoch e draws what an uninterrupted run draws."""
    return (int(seed) * 1_000_003 + epoch * 9_176 + rank * 7_919) % (2**62)


class DeviceLoader:
    """Batches of ``tensors`` (indexed together along dimension 0).

    ``shuffle``: a new permutation each epoch, seeded by (seed, epoch) alone so that every
    rank draws the same one and takes its own shard (``rank::world_size``). Every rank runs
    the same number of steps (DDP needs it): ``(n // world_size) // batch_size`` with
    ``drop_last``, else ``ceil((n // world_size) / batch_size)``; without shuffling (evaluation)
    a rank runs through its whole shard.

    ``shuffle_buffer``: shuffle as tf.data does with a buffer of this many elements
    (:func:`buffered_shuffle`) instead of a full permutation. The stream it shuffles is the
    same every epoch: the tensors' own order where ``stored_order`` (they are in a release's
    stored order, as Keras' arrays are), else one fixed seeded order, the stand-in for such an
    order (an image-folder tree is sorted by class, which no small buffer could mix).

    ``prepare``: a factory called at :meth:`set_epoch` with the epoch's seed (rank-specific),
    returning the function that turns a gathered batch into the model's inputs and targets
    (augmentation for training, normalisation for evaluation). Without it batches are yielded
    as gathered.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 prepare: Callable[[int], Callable] | None = None, shuffle_buffer: int | None = None,
                 stored_order: bool = False):
        if not tensors:
            raise ValueError("DeviceLoader needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f"DeviceLoader's tensors differ in length: {[len(t) for t in tensors]}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
        self.tensors, self.batch_size = tensors, int(batch_size)
        if shuffle_buffer is not None and int(shuffle_buffer) < 1:
            raise ValueError(f"shuffle_buffer must be 1 or more (or None for a full shuffle), got {shuffle_buffer}")
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.shuffle_buffer = None if shuffle_buffer is None else int(shuffle_buffer)
        self.stored_order = bool(stored_order)
        self.rank, self.world_size = rank, world_size
        self.prepare_factory = prepare
        self.epoch = 0
        self._prepare = None

    def __len__(self) -> int:
        n = len(self.tensors[0])
        if not self.shuffle:  # evaluation: this rank's whole shard
            return math.ceil(len(range(self.rank, n, self.world_size)) / self.batch_size)
        per_rank = n // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.tensors[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._prepare = (self.prepare_factory(epoch_seed(self.seed, epoch, self.rank))
                         if self.prepare_factory is not None else None)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order."""
        n = len(self.tensors[0])
        if self.shuffle and self.shuffle_buffer is not None:
            # a seeded stream is drawn from the run's seed alone (epoch -1 is no real epoch)
            stream = torch.arange(n) if self.stored_order else torch.randperm(
                n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, -1, 0)))
            order = buffered_shuffle(stream, self.shuffle_buffer,
                                     torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 0)))
        elif self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 0)))
        else:
            order = torch.arange(n)
        return order[self.rank::self.world_size]

    def __iter__(self):
        if self.prepare_factory is not None and self._prepare is None:
            self.set_epoch(self.epoch)
        order, device = self.indices(), self.tensors[0].device
        for i in range(len(self)):
            b = order[i * self.batch_size:(i + 1) * self.batch_size].to(device)
            batch = tuple(t[b] for t in self.tensors)
            yield self._prepare(*batch) if self._prepare is not None else batch
