"""The frozen text tower's cache (model/text_cache.py): the same features as the tower, never stale."""
import copy

import pytest
import torch

import clipvip
from clipvip.model.text_cache import FrozenTextCache

from tiny_models import EOS, random_text, tiny_cfg, write_hf_clip


@pytest.fixture
def frozen_pair(tmp_path):
    """(model with a 64-entry cache, the same model without), both with the text tower frozen."""
    folder = str(tmp_path / "clip")
    write_hf_clip(folder)
    torch.manual_seed(0)
    model = clipvip.build_model(tiny_cfg(folder)).eval()
    reference = copy.deepcopy(model)
    model.freeze_text_encoder(cache_entries=64)
    reference.freeze_text_encoder()
    assert reference.text_cache is None
    return model, reference


def padded(ids, mask, length):
    """The same captions padded (with EOS, as the tokenizer pads) to ``length`` tokens."""
    extra = length - ids.shape[1]
    return (torch.cat([ids, torch.full((ids.shape[0], extra), EOS)], dim=1),
            torch.cat([mask, torch.zeros(ids.shape[0], extra, dtype=mask.dtype)], dim=1))


def test_cached_features_are_the_towers(frozen_pair):
    model, reference = frozen_pair
    ids, mask = random_text(6, 10, lengths=[10, 4, 7, 9, 5, 3], seed=1)
    first = model.encode_text(ids, mask)  # all new: the whole batch through the tower
    assert (model.text_cache.misses, model.text_cache.hits, len(model.text_cache)) == (6, 0, 6)
    # Bit-equal: the same batch through the same tower and projection, cache or not.
    torch.testing.assert_close(first, reference.encode_text(ids, mask), rtol=0, atol=0)
    with torch.no_grad():
        pooled = reference.clipmodel.text_model(ids, mask)  # (6, D): what the cache stored

    # Three known captions (one padded to 16 tokens: the same entry) and three new ones.
    new_ids, new_mask = random_text(3, 10, lengths=[6, 8, 10], seed=2)
    mixed_ids, mixed_mask = padded(torch.cat([ids[[4, 0, 4]], new_ids]), torch.cat([mask[[4, 0, 4]], new_mask]), 16)
    mixed = model.encode_text(mixed_ids, mixed_mask)
    assert (model.text_cache.misses, model.text_cache.hits, len(model.text_cache)) == (9, 3, 9)
    torch.testing.assert_close(mixed, reference.encode_text(mixed_ids, mixed_mask), rtol=1e-5, atol=1e-6)

    # All known: the stored states come back as they were stored (bit-equal: nothing recomputed) ...
    stored = model.text_cache(model.clipmodel.text_model, mixed_ids[:3, :10], mixed_mask[:3, :10])
    assert torch.equal(stored, pooled[[4, 0, 4]])
    again = model.encode_text(mixed_ids[:3, :10], mixed_mask[:3, :10])
    assert model.text_cache.hits == 9
    # ... and are projected as a batch of 3, not 6: CPU kernels may round that differently (6e-8
    # on an AVX2 EPYC), so the features agree to float32 rounding.
    torch.testing.assert_close(again, first[[4, 0, 4]], rtol=1e-5, atol=1e-6)


def test_training_features_keep_their_gradient_through_the_projection(frozen_pair):
    model, reference = frozen_pair
    ids, mask = random_text(4, 10, seed=3)
    model.encode_text(ids, mask)
    features = model.encode_text(ids, mask)  # from the cache
    assert model.text_cache.hits == 4 and features.requires_grad  # text_projection still learns
    features.sum().backward()
    reference.encode_text(ids, mask).sum().backward()
    torch.testing.assert_close(model.clipmodel.text_projection.weight.grad,
                               reference.clipmodel.text_projection.weight.grad, rtol=1e-5, atol=1e-7)


def test_new_weights_empty_the_cache(frozen_pair):
    model, reference = frozen_pair
    ids, mask = random_text(4, 10, seed=4)
    model.encode_text(ids, mask)
    with torch.no_grad():
        for p in reference.clipmodel.text_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.load_state_dict(reference.state_dict())  # in place: every version counter moves on
    # Bit-equal: recomputed as one batch, the same computation as the uncached tower's.
    torch.testing.assert_close(model.encode_text(ids, mask), reference.encode_text(ids, mask), rtol=0, atol=0)
    assert model.text_cache.hits == 0 and len(model.text_cache) == 4


def test_a_tower_that_learns_is_never_cached(frozen_pair):
    model, _ = frozen_pair
    for p in model.clipmodel.text_model.parameters():
        p.requires_grad_(True)
    ids, mask = random_text(4, 10, seed=5)
    for _ in range(2):
        model.encode_text(ids, mask).sum().backward()
    assert model.text_cache.hits == 0 and len(model.text_cache) == 0
    assert model.clipmodel.text_model.embeddings.token_embedding.weight.grad is not None


def test_the_cache_keeps_its_first_entries_only():
    cache = FrozenTextCache(max_entries=3)
    tower = torch.nn.Embedding(50, 4).eval().requires_grad_(False)
    text_model = lambda ids, mask: tower(ids).sum(1)  # noqa: E731  (B, S) -> (B, D)
    text_model.training, text_model.parameters = False, tower.parameters
    ids = torch.arange(10).reshape(5, 2)
    out = cache(text_model, ids, torch.ones_like(ids))
    assert len(cache) == 3
    # Bit-equal: three stored rows, and two recomputed by a lookup and a sum that do not depend on the batch.
    torch.testing.assert_close(cache(text_model, ids, torch.ones_like(ids)), out, rtol=0, atol=0)
    assert cache.hits == 3 and cache.misses == 7
    with pytest.raises(ValueError, match="max_entries"):
        FrozenTextCache(0)


def test_config_turns_it_on_with_the_frozen_tower(tmp_path):
    from clipvip.engine.step import StepSettings, train_mode

    folder = str(tmp_path / "clip")
    write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--freeze_text_encoder", "1", "--frozen_text_cache", "100")
    model = clipvip.build_model(cfg)
    train_mode(model, StepSettings.from_config(cfg))
    cache = model.text_cache
    assert cache is not None and cache.max_entries == 100
    train_mode(model, StepSettings.from_config(cfg))  # after a validation: the same cache, kept
    assert model.text_cache is cache
