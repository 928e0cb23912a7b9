"""Every loss against a direct, loop-written formula of the original CLIP-ViP math."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipvip.config import load_config
from clipvip.errors import ConfigError
from clipvip.loss import LOSSES, LossSettings, build_loss

B, P = 5, 8


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture
def outputs():
    return {"vis_features": unit(B, P, seed=0), "text_features": unit(B, P, seed=1),
            "img_features": unit(B, P, seed=2), "cap_features": unit(B, P, seed=3)}


LOGIT_SCALE = torch.tensor(math.log(20.0), dtype=torch.float64)  # s = 20: terms far from trivial
S = 20.0


def dot(a, b):
    return float((a * b).sum())


def ce(candidates, positive):
    """-log softmax(candidates)[positive], written out."""
    return -candidates[positive] + math.log(sum(math.exp(c) for c in candidates))


def nce(queries, keys):
    """Mean over queries i of CE(s * <q_i, k_j> over j, positive j = i)."""
    n = len(queries)
    return sum(ce([S * dot(queries[i], keys[j]) for j in range(n)], i) for i in range(n)) / n


def vsc_video_side(video, positive_src, sub, cap):
    """The original's layout: [positive, B-1 subtitle negatives, B-1 caption negatives], label 0."""
    n = len(video)
    total = 0.0
    for i in range(n):
        row = [S * dot(video[i], positive_src[i])]
        row += [S * dot(video[i], sub[j]) for j in range(n) if j != i]
        row += [S * dot(video[i], cap[j]) for j in range(n) if j != i]
        total += ce(row, 0)
    return total / n


def expected_terms(name, o):
    v, t, f, c = (o[k] for k in ("vis_features", "text_features", "img_features", "cap_features"))
    if name == "NCELearnableTempLoss":
        return {"v2t": nce(v, t), "t2v": nce(t, v)}
    if name == "NCELearnableTempDSLLoss":
        n = len(v)
        L = [[S * dot(v[i], t[j]) for j in range(n)] for i in range(n)]  # rows: videos
        v2t = t2v = 0.0
        for i in range(n):  # video i over texts j; prior: softmax over videos k of column j
            row = [L[i][j] * math.exp(L[i][j]) / sum(math.exp(L[k][j]) for k in range(n)) for j in range(n)]
            v2t += ce(row, i)
        for j in range(n):  # text j over videos i; prior: softmax over texts m of video i's row
            row = [L[i][j] * math.exp(L[i][j]) / sum(math.exp(L[i][m]) for m in range(n)) for i in range(n)]
            t2v += ce(row, j)
        return {"v2t": v2t / n, "t2v": t2v / n}
    vs = {"v2s": nce(v, t), "s2v": nce(t, v)}
    vc = {"v2c": nce(v, c), "c2v": nce(c, v)}
    fc = {"f2c": nce(f, c), "c2f": nce(c, f)}
    vsc = {"s2v": nce(t, v), "c2v": nce(c, v),
           "v2s": vsc_video_side(v, t, t, c), "v2c": vsc_video_side(v, c, t, c)}
    return {
        "VidImgDivideNCELearnableTempLoss": {**vs, **fc},
        "NCELearnableTempLoss_vs_vc": {**vs, **vc},
        "NCELearnableTempLoss_vs_vc_fc": {**vs, **vc, **fc},
        "NCELearnableTempLoss_vsc": vsc,
        "NCELearnableTempLoss_vsc_fc": {**vsc, **fc},
    }[name]


def test_registry_holds_the_original_names():
    assert set(LOSSES) == {
        "NCELearnableTempLoss", "NCELearnableTempDSLLoss", "VidImgDivideNCELearnableTempLoss",
        "NCELearnableTempLoss_vs_vc", "NCELearnableTempLoss_vs_vc_fc",
        "NCELearnableTempLoss_vsc", "NCELearnableTempLoss_vsc_fc",
    }


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_direct_formula(name, outputs):
    loss_fn = build_loss(LossSettings(name, gather=False))
    expected = expected_terms(name, outputs)
    terms = loss_fn.terms(outputs, LOGIT_SCALE)
    assert list(terms) == list(expected)  # names and order
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-9), key
    loss, returned_terms = loss_fn(outputs, LOGIT_SCALE)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(sum(expected.values()), rel=1e-9)  # plain sum of terms
    assert set(returned_terms) == set(expected)
    assert all(returned_terms[k].item() == pytest.approx(v, rel=1e-9) for k, v in expected.items())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_features_and_scale(name, outputs):
    feats = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    scale = LOGIT_SCALE.clone().requires_grad_(True)
    build_loss(LossSettings(name, gather=True))(feats, scale).total.backward()  # gather: identity here
    used = LOSSES[name].features
    for key, value in feats.items():
        assert (value.grad is not None) == (key in used), key
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_vsc_same_clip_texts_are_not_negatives(outputs):
    # Making the caption of clip i identical to its subtitle must not turn it into a hard
    # negative of the v2s term: only the other clips' texts are negatives.
    same = dict(outputs, cap_features=outputs["text_features"].clone())
    terms = build_loss(LossSettings("NCELearnableTempLoss_vsc", gather=False)).terms(same, LOGIT_SCALE)
    v, t = same["vis_features"], same["text_features"]
    n = len(v)
    direct = sum(ce([S * dot(v[i], t[i])] + [S * dot(v[i], t[j]) for j in range(n) if j != i] * 2, 0)
                 for i in range(n)) / n
    assert terms["v2s"].item() == pytest.approx(direct, rel=1e-9)
    assert terms["v2c"].item() == pytest.approx(direct, rel=1e-9)


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_loss(LossSettings("NCELoss", gather=True))
    message = str(err.value)
    assert "NCELoss" in message
    assert all(name in message for name in LOSSES)


def test_missing_feature_is_named(outputs):
    cfg = load_config({"loss_config": {"loss_name": "NCELearnableTempLoss_vsc_fc"}})
    loss_fn = build_loss(LossSettings.from_config(cfg))
    assert loss_fn.gather  # if_gather defaults to on, as in the configs
    with pytest.raises(KeyError, match="img_features"):
        loss_fn({k: v for k, v in outputs.items() if k != "img_features"}, LOGIT_SCALE)
