"""DeviceLoader's orders: the full permutation and tf.data's buffered shuffle."""
from __future__ import annotations

import pytest
import torch

from mixlab.data.loader import DeviceLoader, buffered_shuffle, epoch_seed


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_buffered_shuffle_is_a_permutation_that_never_runs_ahead_of_its_buffer():
    order = torch.randperm(1000, generator=_gen(3))
    position = {int(v): i for i, v in enumerate(order)}
    for buffer in (1, 7, 128, 999, 1000, 5000):
        out = buffered_shuffle(order, buffer, _gen(buffer))
        assert sorted(out.tolist()) == sorted(order.tolist())
        # the element emitted at step i was in the buffer then: at most buffer - 1 places ahead
        assert all(position[int(v)] <= i + buffer - 1 for i, v in enumerate(out))
    assert torch.equal(buffered_shuffle(order, 1, _gen(0)), order)  # a buffer of one keeps the stream


def test_buffered_shuffle_follows_tf_data_distribution():
    # With a buffer of 2 over 6 elements, the first element stays in the buffer until a fair
    # coin picks it: it comes out at step k with probability 2^-(k+1) (k < 5), at the last step
    # with 2^-5. A full shuffle would put it at each step with probability 1/6.
    n, trials = 6, 20_000
    counts = torch.zeros(n)
    g = _gen(11)
    for _ in range(trials):
        out = buffered_shuffle(torch.arange(n), 2, g)
        counts[out.tolist().index(0)] += 1
    expected = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
    assert torch.allclose(counts / trials, expected, atol=0.012), (counts / trials).tolist()


def test_loader_with_buffer_shuffles_one_fixed_stream_anew_each_epoch():
    x = torch.arange(500)
    loader = DeviceLoader(x, batch_size=50, shuffle=True, seed=5, shuffle_buffer=40)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        orders.append(torch.cat([b for (b,) in loader]))
    assert all(sorted(o.tolist()) == list(range(500)) for o in orders)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # the stream is the same every epoch: each epoch stays within a buffer of it, so two
    # epochs put any element at most (buffer - 1) places earlier than the stream, and the
    # epochs' positions of an element are strongly correlated (a full shuffle: near 0)
    pos = [torch.empty(500, dtype=torch.long).scatter_(0, o, torch.arange(500)) for o in orders]
    corr = torch.corrcoef(torch.stack([pos[0].double(), pos[1].double()]))[0, 1]
    assert corr > 0.85
    again = DeviceLoader(x, batch_size=50, shuffle=True, seed=5, shuffle_buffer=40)
    again.set_epoch(1)  # resumed at epoch 1: the same order as the uninterrupted run
    assert torch.equal(torch.cat([b for (b,) in again]), orders[1])
    full = DeviceLoader(x, batch_size=50, shuffle=True, seed=5)
    full.set_epoch(0)
    full_pos = torch.empty(500, dtype=torch.long).scatter_(0, torch.cat([b for (b,) in full]), torch.arange(500))
    assert abs(torch.corrcoef(torch.stack([full_pos.double(), pos[0].double()]))[0, 1]) < 0.2


def test_loader_with_buffer_over_the_stored_order_equals_buffered_shuffle_of_arange():
    x = torch.arange(300)
    loader = DeviceLoader(x, batch_size=32, shuffle=True, seed=3, shuffle_buffer=20, stored_order=True)
    loader.set_epoch(2)
    got = torch.cat([b for (b,) in loader])
    # the stream is the tensors' own order: tf.data's buffer over 0..299, the epoch's own draws
    want = buffered_shuffle(torch.arange(300), 20, torch.Generator().manual_seed(epoch_seed(3, 2, 0)))
    assert torch.equal(got, want)
    # so no element leaves more than buffer-1 places before its stored position
    pos = torch.empty(300, dtype=torch.long).scatter_(0, got, torch.arange(300))
    assert (torch.arange(300) - pos).max() <= 19
    seeded = DeviceLoader(x, batch_size=32, shuffle=True, seed=3, shuffle_buffer=20)
    seeded.set_epoch(2)
    assert not torch.equal(torch.cat([b for (b,) in seeded]), got)


def test_loader_rejects_an_empty_buffer():
    with pytest.raises(ValueError, match="shuffle_buffer must be 1 or more"):
        DeviceLoader(torch.arange(4), batch_size=2, shuffle=True, shuffle_buffer=0)


def test_buffered_order_is_the_same_on_every_rank_and_split_between_them():
    x = torch.arange(101)
    shards = []
    for rank in range(3):
        loader = DeviceLoader(x, batch_size=10, shuffle=True, seed=2, shuffle_buffer=16, rank=rank, world_size=3)
        loader.set_epoch(4)
        shards.append(torch.cat([b for (b,) in loader]))
    whole = DeviceLoader(x, batch_size=10, shuffle=True, seed=2, shuffle_buffer=16)
    whole.set_epoch(4)
    order = whole.indices()
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, order[rank::3])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
