"""Frame-index sampling (DESIGN §2): the original's formulas, and the edge cases it got wrong."""
import random

import numpy as np
import pytest

from clipvip.data.sampling import middle_frame_index, sample_frame_indices


def test_uniform_eval_is_truncated_linspace():
    # linspace(0, 15, 8) = 0, 2.14, 4.29, 6.43, 8.57, 10.71, 12.86, 15 -> truncated, not rounded.
    assert sample_frame_indices(16, 1, 8) == [0, 2, 4, 6, 8, 10, 12, 15]
    assert sample_frame_indices(8, 1, 3) == [0, 3, 7]  # 3.5 -> 3
    for f, n_clips, num_frms in [(100, 1, 12), (37, 2, 6), (1000, 1, 32)]:
        expected = np.linspace(0, f - 1, n_clips * num_frms).astype(int).tolist()
        assert sample_frame_indices(f, n_clips, num_frms) == expected


def test_uniform_eval_ignores_rng_and_jitter():
    a = sample_frame_indices(50, 1, 12, training=False, jitter=True, rng=random.Random(1))
    b = sample_frame_indices(50, 1, 12, training=False, jitter=True, rng=random.Random(2))
    assert a == b == np.linspace(0, 49, 12).astype(int).tolist()


def test_training_without_jitter_is_uniform():
    assert sample_frame_indices(50, 1, 12, training=True, jitter=False) == sample_frame_indices(50, 1, 12)


def test_uniform_jitter_ranges_follow_the_original():
    f, n = 100, 12
    interval = int(f / (n - 1))  # 9
    rng = random.Random(0)
    starts, ends = set(), set()
    for _ in range(2000):
        idx = sample_frame_indices(f, 1, n, training=True, jitter=True, rng=rng)
        assert len(idx) == n
        assert idx == sorted(idx)
        starts.add(idx[0])
        ends.add(idx[-1])
        # Between the endpoints the indices are linspace(start, end, n) truncated.
        assert idx == np.linspace(idx[0], idx[-1], n).astype(int).tolist()
    assert starts == set(range(0, interval + 1))
    assert ends == set(range(f - 1 - interval, f))


def test_uniform_jitter_short_clips_stay_in_range_and_in_order():
    # n == 2: the original could draw start == F or end == -1; tiny F: start > end.
    for f in range(1, 8):
        for n in (2, 3, 8):
            rng = np.random.default_rng(f * 10 + n)
            for _ in range(200):
                idx = sample_frame_indices(f, 1, n, training=True, jitter=True, rng=rng)
                assert len(idx) == n
                assert all(0 <= i < f for i in idx)
                assert idx == sorted(idx)


def test_short_clip_single_frame_and_single_index():
    assert sample_frame_indices(3, 1, 8) == [0, 0, 0, 0, 1, 1, 1, 2]  # repeats frames
    assert sample_frame_indices(1, 2, 4) == [0] * 8
    assert sample_frame_indices(1, 1, 4, training=True, jitter=True) == [0] * 4
    assert sample_frame_indices(1, 1, 4, sample_rate=2, training=True, jitter=True) == [0] * 4
    assert sample_frame_indices(10, 1, 1) == [0]
    for _ in range(50):
        (i,) = sample_frame_indices(10, 1, 1, training=True, jitter=True)
        assert 0 <= i < 10


@pytest.mark.parametrize("make_rng", [lambda: random.Random(7), lambda: np.random.default_rng(7)])
def test_rng_types_are_reproducible(make_rng):
    a = [sample_frame_indices(200, 1, 12, training=True, jitter=True, rng=r)
         for r in [make_rng()] for _ in range(5)]
    b = [sample_frame_indices(200, 1, 12, training=True, jitter=True, rng=r)
         for r in [make_rng()] for _ in range(5)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1


def test_global_random_is_used_without_rng():
    random.seed(3)
    a = sample_frame_indices(200, 1, 12, training=True, jitter=True)
    random.seed(3)
    assert sample_frame_indices(200, 1, 12, training=True, jitter=True) == a


def test_sample_rate_test_mode_is_mmaction_test_offsets():
    # clip_len 8, interval 4 -> a clip spans 32 frames; F=100: avg = 69, offset int(34.5) = 34.
    assert sample_frame_indices(100, 1, 8, sample_rate=4) == list(range(34, 66, 4))
    # Three clips: avg = 23 -> offsets int(11.5), int(34.5), int(57.5).
    idx = sample_frame_indices(100, 3, 8, sample_rate=4)
    assert [idx[0], idx[8], idx[16]] == [11, 34, 57]
    assert idx[:8] == list(range(11, 43, 4))
    # Deterministic even when training-style arguments are given at evaluation.
    assert idx == sample_frame_indices(100, 3, 8, sample_rate=4, jitter=True, rng=random.Random(5))


def test_sample_rate_loops_out_of_bound_indices():
    # F=20 < span 32: offset 0, indices 0, 4, ..., 28 looped modulo 20.
    assert sample_frame_indices(20, 1, 8, sample_rate=4) == [0, 4, 8, 12, 16, 0, 4, 8]
    assert sample_frame_indices(5, 1, 4, sample_rate=3) == [0, 3, 1, 4]


def test_sample_rate_training_offsets_and_jitter():
    rng = random.Random(0)
    f, clip_len, interval, n_clips = 120, 4, 5, 2
    avg = (f - clip_len * interval + 1) // n_clips  # 50
    seen_offsets = set()
    for _ in range(300):
        idx = np.array(sample_frame_indices(f, n_clips, clip_len, sample_rate=interval,
                                            training=True, jitter=True, rng=rng)).reshape(n_clips, clip_len)
        for c in range(n_clips):
            grid = idx[c] - np.arange(clip_len) * interval  # clip offset + per-frame jitter
            assert ((grid - grid.min()) < interval).all()
            # Clip c starts somewhere in its own segment [c * avg, (c + 1) * avg).
            assert c * avg <= grid.min() < (c + 1) * avg + interval
            seen_offsets.add(int(grid.min()))
        assert idx.max() < f
    assert len(seen_offsets) > 20
    # Without jitter the frames of a clip are exactly `interval` apart.
    idx = np.array(sample_frame_indices(f, 1, clip_len, sample_rate=interval, training=True,
                                        jitter=False, rng=rng))
    assert (np.diff(idx) == interval).all()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        sample_frame_indices(0, 1, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 1, 8, sample_rate=-1)
    with pytest.raises(ValueError):
        middle_frame_index(0)


def test_middle_frame_index():
    assert middle_frame_index(16) == 8
    assert middle_frame_index(15) == 7  # int(15 / 2)
    assert middle_frame_index(1) == 0
