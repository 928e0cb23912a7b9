"""Retrieval metrics: hand-computed cases, pessimistic ties, DSL, multi-caption, vs a naive loop."""
import numpy as np
import pytest
import torch

from clipvip.metrics import (dsl, evaluate_retrieval, metrics_from_ranks, retrieval_metrics,
                             retrieval_ranks, similarity_chunked, video_to_text_targets)


def naive_ranks(sim, targets):
    """Loop reference: 1 + number of wrong gallery items scoring >= the best target."""
    ranks = []
    for q, row in enumerate(sim):
        good = [targets[q]] if np.isscalar(targets[q]) else list(targets[q])
        best = max(row[g] for g in good)
        ranks.append(1 + sum(1 for j, value in enumerate(row) if j not in good and value >= best))
    return np.array(ranks)


def naive_metrics(ranks):
    ranks = sorted(ranks)
    n = len(ranks)
    mid = (ranks[(n - 1) // 2] + ranks[n // 2]) / 2
    return {"R1": 100 * sum(r <= 1 for r in ranks) / n, "R5": 100 * sum(r <= 5 for r in ranks) / n,
            "R10": 100 * sum(r <= 10 for r in ranks) / n, "MdR": mid, "MnR": sum(ranks) / n}


def test_hand_computed_ranks():
    sim = np.array([[0.9, 0.1, 0.2],   # target 0 is best -> 1
                    [0.5, 0.4, 0.6],   # target 1 is beaten by two -> 3
                    [0.1, 0.3, 0.2]])  # target 2 is beaten by one -> 2
    assert retrieval_ranks(sim, [0, 1, 2]).tolist() == [1, 3, 2]
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m == pytest.approx({"R1": 100 / 3, "R5": 100.0, "R10": 100.0, "MdR": 2.0, "MnR": 2.0})


def test_ties_are_pessimistic():
    # Two identical videos: neither text can tell them apart, so neither gets credit for R@1.
    videos = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = evaluate_retrieval(texts, videos, [0, 1, 2])
    assert retrieval_ranks(texts @ videos.T, [0, 1, 2]).tolist() == [2, 2, 1]
    assert out["t2v"]["R1"] == pytest.approx(100 / 3)
    assert out["v2t"]["R1"] == pytest.approx(100 / 3)
    # a tie with a target of the same query is not a competitor
    assert retrieval_ranks(np.array([[0.5, 0.5, 0.1]]), [[0, 1]]).tolist() == [1]


def test_multi_caption_protocol():
    # texts 0, 1 describe video 0; text 2 describes video 1.
    sim = np.array([[0.2, 0.9],    # text 0: its video ranked 2nd
                    [0.8, 0.1],    # text 1: 1st
                    [0.3, 0.7]])   # text 2: 1st
    assert video_to_text_targets([0, 0, 1], 2) == [[0, 1], [2]]
    t2v = retrieval_metrics(sim, [0, 0, 1])
    assert t2v["R1"] == pytest.approx(200 / 3)
    # v2t, video 0 over texts [0.2, 0.8, 0.3]: its best caption (text 1) is first -> rank 1.
    # video 1 over texts [0.9, 0.1, 0.7]: its caption (text 2) is beaten by text 0 -> rank 2.
    assert retrieval_ranks(sim.T, [[0, 1], [2]]).tolist() == [1, 2]
    # evaluate_retrieval goes from features to the same numbers
    out = evaluate_retrieval(sim, np.eye(2), [0, 0, 1])
    assert out["t2v"] == pytest.approx(t2v)
    assert out["v2t"] == pytest.approx(metrics_from_ranks([1, 2]))


def test_dsl_formula_and_axes():
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1, 1, size=(4, 3)).astype(np.float32)
    out = dsl(sim)
    for i in range(4):
        for j in range(3):
            column = np.exp(100 * sim[:, j].astype(np.float64))
            assert out[i, j] == pytest.approx(sim[i, j] * column[i] / column.sum(), rel=1e-4, abs=1e-7)
    assert dsl(sim, axis=1) == pytest.approx(dsl(sim.T, axis=0).T, rel=1e-5, abs=1e-7)


def test_dsl_demotes_a_hub_video():
    # Video 0 is close to every text (a hub); text 1 prefers it slightly over its own video 1.
    sim = np.array([[0.90, 0.10, 0.10],
                    [0.62, 0.60, 0.10],
                    [0.61, 0.10, 0.60]], dtype=np.float32)
    assert retrieval_ranks(sim, [0, 1, 2]).tolist() == [1, 2, 2]
    # The prior over texts says video 0 belongs to text 0: texts 1 and 2 then find their own.
    assert retrieval_ranks(dsl(sim), [0, 1, 2]).tolist() == [1, 1, 1]


def test_evaluate_retrieval_dsl_is_the_originals_one_matrix():
    rng = np.random.default_rng(1)
    texts, videos = rng.normal(size=(7, 4)), rng.normal(size=(3, 4))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)  # unit features, as the model gives
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    text_to_video = [0, 1, 2, 0, 1, 2, 2]
    out = evaluate_retrieval(texts, videos, text_to_video)
    sim = (texts @ videos.T).astype(np.float64)
    t2v_prior = np.exp(100 * sim) / np.exp(100 * sim).sum(axis=0, keepdims=True)  # over texts
    v2t_prior = np.exp(100 * sim.T) / np.exp(100 * sim.T).sum(axis=0, keepdims=True)  # over videos
    groups = video_to_text_targets(text_to_video, 3)
    assert out["t2v_dsl"] == pytest.approx(naive_metrics(naive_ranks(sim * t2v_prior, text_to_video)))
    # video-to-text ranks the same text-normalised matrix, transposed, as the original does ...
    assert out["v2t_dsl"] == pytest.approx(naive_metrics(naive_ranks((sim * t2v_prior).T, groups)))
    # ... which on this data differs from a prior normalised over videos
    assert out["v2t_dsl"] != pytest.approx(naive_metrics(naive_ranks(sim.T * v2t_prior, groups)))
    assert set(out) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    assert set(out["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"}


def test_similarity_chunked_equals_full():
    rng = np.random.default_rng(2)
    texts, videos = rng.normal(size=(11, 6)), rng.normal(size=(9, 6))
    full = texts @ videos.T
    for chunk in (1, 3, 11, 4096):
        out = similarity_chunked(texts, videos, chunk=chunk)
        assert out.dtype == np.float32 and out.shape == (11, 9)
        np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    out = similarity_chunked(torch.tensor(texts, dtype=torch.float16), torch.tensor(videos), chunk=4)
    np.testing.assert_allclose(out, full, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError):
        similarity_chunked(texts, videos[:, :5])


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g = 23, 17
    sim = rng.integers(0, 6, size=(n_q, n_g)).astype(np.float32) / 5  # coarse values: many ties
    single = rng.integers(0, n_g, size=n_q)
    multi = [rng.choice(n_g, size=rng.integers(1, 4), replace=False) for _ in range(n_q)]
    for targets in (single, list(single), multi):
        expected = naive_ranks(sim, targets)
        for chunk in (1, 5, 4096):
            np.testing.assert_array_equal(retrieval_ranks(sim, targets, chunk=chunk), expected)
        assert retrieval_metrics(sim, targets) == pytest.approx(naive_metrics(expected))


def test_bad_targets_are_errors():
    sim = np.zeros((2, 3))
    with pytest.raises(ValueError):
        retrieval_ranks(sim, [0])  # one target for two queries
    with pytest.raises(ValueError):
        retrieval_ranks(sim, [0, 3])  # outside the gallery
    with pytest.raises(ValueError, match="points at video 2"):
        video_to_text_targets([0, 2], 2)
