"""CompactCache storage: appends, masks, eviction flags, compaction and the bytes it holds."""

from __future__ import annotations

import pytest
import torch

from kvzap_lab.cache import CompactCache

B, H, D = 2, 3, 8


def feed(cache: CompactCache, t: int, valid: torch.Tensor | None = None, seed: int = 0):
    """Announce and append ``t`` tokens to every layer (random keys/values); return the keys written."""
    cache.begin_step(cache.next_positions(B, t, valid), valid)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, t, D, generator=gen)
    for idx in range(len(cache.layers)):
        cache.update(keys, -keys, idx)
    return keys


def test_append_reports_true_length_and_positions_skip_left_padding():
    cache = CompactCache(n_layers=2)
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    feed(cache, 4, valid)
    assert cache.step.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    cache.end_step()
    assert cache.get_seq_length() == 4 and cache.get_mask_sizes(1, 0) == (5, 0)
    assert cache.real_seen.tolist() == [2, 4]
    feed(cache, 1)
    assert cache.step.positions.tolist() == [[2], [4]]
    layer = cache.layers[0]
    assert layer.alive[0, 0, : layer.used].tolist() == [False, False, True, True, True]


def test_mask_is_causal_by_position_and_hides_evicted_pairs():
    cache = CompactCache(n_layers=1)
    feed(cache, 5)
    cache.end_step()
    layer = cache.layers[0]
    layer.drop(torch.zeros(B, H, 5, dtype=torch.bool).index_fill_(2, torch.tensor([1]), True))
    feed(cache, 3)
    mask = layer.mask(cache.step.positions)
    assert mask.shape == (B, H, 3, 8)
    expected = [[1, 0, 1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1, 1]]
    assert mask[1, 2].int().tolist() == expected
    # sliding-window layers only see the last `sliding_window` positions
    windowed = layer.mask(cache.step.positions, sliding_window=3)
    assert windowed[0, 0, 2].int().tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # a single decode token sees every held pair
    cache.end_step()
    feed(cache, 1)
    assert layer.mask(cache.step.positions)[0, 0, 0].int().tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1]


def test_evictable_spares_sinks_and_window():
    cache = CompactCache(n_layers=1)
    feed(cache, 12)
    layer = cache.layers[0]
    candidates = layer.evictable(cache.step.positions[:, -1], window=4, sinks=2)
    assert candidates[0, 0].nonzero().flatten().tolist() == list(range(2, 8))


def test_compaction_keeps_order_and_trims_storage_to_the_longest_row():
    cache = CompactCache(n_layers=1)
    keys = feed(cache, 20)
    cache.end_step()
    layer = cache.layers[0]
    gen = torch.Generator().manual_seed(1)
    evict = torch.rand(B, H, 20, generator=gen) < 0.6
    evict[0, 0] = True  # one row loses everything
    layer.drop(evict)
    before = layer.bytes_held()
    cache.compact()
    kept = ~evict
    assert layer.used == layer.capacity == int(kept.sum(-1).max())
    assert layer.bytes_held() < before
    assert layer.stored == layer.keys.shape[0] == layer.values.shape[0] == int(kept.sum())  # pairs packed
    held_keys, held_values = layer.gather(0, layer.used)
    for b in range(B):
        for h in range(H):
            n = int(kept[b, h].sum())
            assert layer.alive[b, h].tolist() == [True] * n + [False] * (layer.used - n)
            torch.testing.assert_close(held_keys[b, h, :n], keys[b, h, kept[b, h]])
            torch.testing.assert_close(held_values[b, h, :n], -keys[b, h, kept[b, h]])
            assert layer.positions[b, h, :n].tolist() == kept[b, h].nonzero().flatten().tolist()
    # appending after compaction continues at the true positions
    feed(cache, 1)
    assert layer.positions[1, 1, layer.used - 1].item() == 20


@pytest.mark.parametrize("headroom", [0, 8])
def test_appends_of_any_chunking_gather_each_rows_pairs_in_order(headroom):
    """Chunks of 3, 1, 1 (left padding in the first), a compaction, then 5 and 9 single tokens: every row gathers
    exactly the pairs it was fed and kept, in order, with their positions. Without headroom the slots grow at the
    first append after the compaction; with room for 8 tokens the first 8 tokens fit, and the storage grows
    later."""
    cache = CompactCache(n_layers=1)
    layer = cache.layers[0]
    fed = [[[] for _ in range(H)] for _ in range(B)]  # (key, position) per row
    valid = torch.tensor([[False, True, True], [True, True, True]])

    def append(t, valid=None, seed=0):
        keys = feed(cache, t, valid, seed)
        for b in range(B):
            for h in range(H):
                for j in range(t):
                    if valid is None or valid[b, j]:
                        fed[b][h].append((keys[b, h, j], cache.step.positions[b, j].item()))
        cache.end_step()

    append(3, valid, seed=1)
    append(1, seed=2)
    append(1, seed=3)
    evict = torch.zeros(B, H, layer.used, dtype=torch.bool)
    evict[0, 1, 2], evict[1, 2, :2] = True, True
    layer.drop(evict)
    for b, h, slot in evict.nonzero().tolist():
        position = layer.positions[b, h, slot].item()
        fed[b][h] = [(k, p) for k, p in fed[b][h] if p != position]
    layer.compact(headroom)
    assert layer.keys.shape[0] == layer.stored + headroom * B * H
    storage = (layer.keys, layer.values, layer.index, layer.positions, layer.scores, layer.alive)
    append(5, seed=4)
    for i in range(9):
        append(1, seed=5 + i)
        if i == 2:  # 8 tokens since the compaction
            grown = [a is not b for a, b in zip(storage, (layer.keys, layer.values, layer.index, layer.positions, layer.scores, layer.alive))]
            assert grown == [headroom == 0] * 6
    assert layer.capacity >= layer.used == 5 + 14  # the longest rows kept all of their 5 slots
    keys, values = layer.gather(0, layer.used)
    for b in range(B):
        for h in range(H):
            alive = layer.alive[b, h, : layer.used]
            assert int(alive.sum()) == len(fed[b][h])
            torch.testing.assert_close(keys[b, h][alive], torch.stack([k for k, _ in fed[b][h]]))
            torch.testing.assert_close(values[b, h][alive], -torch.stack([k for k, _ in fed[b][h]]))
            assert layer.positions[b, h, : layer.used][alive].tolist() == [p for _, p in fed[b][h]]


def test_the_room_a_compaction_leaves_is_at_most_a_32nd_of_the_tokens_seen():
    cache = CompactCache(n_layers=1)
    layer = cache.layers[0]
    for seen, room in ((100, 3), (1100, 32)):
        feed(cache, seen - cache.seen)
        cache.end_step()
        cache.compact(headroom=32)
        assert layer.keys.shape[0] - layer.stored == room * B * H
        assert layer.capacity >= layer.used + room


def test_bytes_held_follow_the_pairs_kept():
    """Heads evict 50 %, 75 % and 95 % of their tokens as they stream in, compacting every 16 steps. Slots held
    beyond the longest row are bounded (evicted-but-not-compacted slots plus geometric headroom) and the short
    heads' padding slots hold no keys or values, so from a few hundred tokens on the bytes held stay within
    (1 - c) + 10 % of a full cache."""
    cache = CompactCache(n_layers=2)
    gen = torch.Generator().manual_seed(0)
    excess = []
    for step in range(600):
        keys = torch.randn(B, H, 1, 64, generator=gen)
        cache.begin_step(cache.next_positions(B, 1))
        for idx in range(2):
            cache.update(keys, keys, idx)
        for layer in cache.layers:
            newest = layer.positions[:, :, : layer.used] == step
            old = layer.positions[:, :, : layer.used] == step - 8  # decided 8 tokens later (window)
            rate = torch.tensor([0.5, 0.75, 0.95])[None, :, None]
            layer.drop(old & (torch.rand(old.shape, generator=gen) < rate) & ~newest)
        cache.end_step()
        if step % 16 == 15:
            cache.compact()
        layer = cache.layers[0]
        assert layer.capacity - int(layer.kept().max()) <= 16 + max(8, layer.capacity // 16) + 8
        if step >= 400:
            excess.append(cache.bytes_held() / cache.full_bytes() - (1 - cache.compression().overall))
    c = cache.compression().overall
    assert 0.7 < c < 0.76
    assert max(excess) <= 0.10
    assert cache.compression().per_row.shape == (B,)


def test_update_outside_the_engine_is_refused():
    cache = CompactCache(n_layers=1)
    with pytest.raises(RuntimeError, match="evicting"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)


def test_restart_row_empties_one_row_and_restarts_its_positions():
    cache = CompactCache(n_layers=2)
    feed(cache, 5)
    cache.end_step()
    cache.restart_row(0)
    assert cache.real_seen.tolist() == [0, 5]
    assert [layer.kept().tolist() for layer in cache.layers] == [[[0] * H, [5] * H]] * 2
    cache.compact()
    assert cache.layers[0].used == 5 and cache.layers[0].stored == H * 5  # row 0's pairs are gone
    feed(cache, 2)
    assert cache.step.positions.tolist() == [[0, 1], [5, 6]]
