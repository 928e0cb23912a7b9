"""Contrastive losses of CLIP-ViP, by their original names (DESIGN §3).

Every loss takes the model's feature dict (L2-normalised ``[B, P]`` tensors) and the learnable
log-temperature, and returns a :class:`LossOutput`: ``total``, the plain sum of its cross-entropy
terms, and the ``terms`` themselves, each the mean over its queries (``F.cross_entropy``'s
default). The scale is ``s = exp(logit_scale)``. The terms travel with the total, so whoever logs
them (the training step) gets them from the call that computed them, not from the loss object.

    loss_fn = build_loss(LossSettings.from_config(cfg), env)
    total, terms = loss_fn(model(**batch), model.logit_scale)  # scalar, {"s2v": tensor(..), ...}
    terms = loss_fn.terms(outputs, logit_scale)                 # the terms alone, with gradient

Feature keys (the names the model returns, as the original ``VidCLIP``), letters used below:
``vis_features`` V (the video), ``text_features`` S (the clip's text: the caption in retrieval
fine-tuning, the subtitle in pretraining with ``vid_txt="subtitle"``), ``img_features`` F (the
middle frame encoded as a one-frame clip), ``cap_features`` C (the auxiliary OFA caption of that
frame). Term names read "query2candidates": ``"v2s"`` is each video against all subtitles.

With a ``gather`` (``if_gather``: a :class:`clipvip.distributed.FeatureGather` over the job's
:class:`~clipvip.distributed.DistEnv`, given at construction) every feature is first gathered from
all processes, so each process computes the loss of the global batch; see
:mod:`clipvip.distributed` for the gradient scaling (the DDP-averaged gradient equals the
single-process gradient on the global batch) and for the equal-batch assumption that spares a
host sync per feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipvip.distributed import DistEnv, FeatureGather
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger("loss")

VIDEO, TEXT, FRAME, CAPTION = "vis_features", "text_features", "img_features", "cap_features"


def _ce_diag(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, N] with query i's positive in column i, mean over queries."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def _symmetric(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a2b: str, b2a: str) -> dict:
    """InfoNCE both ways between paired rows of ``a`` and ``b`` [B, P]."""
    logits = scale * a @ b.t()  # [B, B]: row i = a_i against every b
    return {a2b: _ce_diag(logits), b2a: _ce_diag(logits.t())}


class LossOutput(NamedTuple):
    """What a loss returns: the scalar to backpropagate and its terms by name (with gradient)."""

    total: torch.Tensor  # [] the plain sum of the terms
    terms: dict[str, torch.Tensor]  # each [], in the loss's fixed order


@dataclass(frozen=True)
class LossSettings:
    """The config's ``loss_config``: which loss, and whether it sees the global batch."""

    name: str  # a key of LOSSES
    gather: bool  # if_gather: all-gather the features (with gradient) over the job first

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        return cls(name=cfg.loss_config["loss_name"], gather=bool(cfg.loss_config["if_gather"]))


Gather = Callable[[torch.Tensor], torch.Tensor]  # [B_r, P] -> [sum_r B_r, P], with gradient


class ContrastiveLoss(nn.Module):
    """Base: gathers the features it needs, returns its terms and their sum.

    ``gather``: None for this process's batch alone, else the callable that collects a feature
    from every process (:class:`clipvip.distributed.FeatureGather`). Subclasses set ``features``
    (the keys they read) and implement ``_terms``.
    """

    features: tuple[str, ...] = (VIDEO, TEXT)

    def __init__(self, gather: Optional[Gather] = None):
        super().__init__()
        self.gather = gather

    def _terms(self, feats: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def terms(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each cross-entropy term (a scalar with gradient), by name, in a fixed order."""
        missing = [key for key in self.features if outputs.get(key) is None]
        if missing:
            raise KeyError(f"{type(self).__name__} needs features {list(self.features)}; missing {missing}")
        feats = {key: outputs[key] for key in self.features}
        if self.gather is not None:
            feats = {key: self.gather(value) for key, value in feats.items()}  # [world*B, P]
        return self._terms(feats, logit_scale.exp())

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor) -> LossOutput:
        """:meth:`terms` and their plain sum."""
        terms = self.terms(outputs, logit_scale)
        return LossOutput(torch.stack(list(terms.values())).sum(), terms)

    def extra_repr(self) -> str:
        return f"gather={self.gather}"


class NCELearnableTempLoss(ContrastiveLoss):
    """Symmetric InfoNCE between videos V and their texts S (``text_features``).

    ``v2t``: CE(s·V·Sᵀ, diag); ``t2v``: CE(s·S·Vᵀ, diag). Retrieval fine-tuning and plain
    video-subtitle pretraining.
    """

    def _terms(self, feats, scale):
        return _symmetric(feats[VIDEO], feats[TEXT], scale, "v2t", "t2v")


class NCELearnableTempDSLLoss(ContrastiveLoss):
    """InfoNCE with the dual-softmax prior: each logit times its softmax over the query axis.

    With ``L = s·V·Sᵀ`` [B_v, B_t] (rows: videos) the ``v2t`` term is CE(L ⊙ softmax(L, dim=0),
    diag) and the ``t2v`` term CE(Lᵀ ⊙ softmax(Lᵀ, dim=0), diag): the softmax runs over the
    queries (down each column) at the learned temperature ``s`` (the scaled logits go in, as in
    the original), not at the fixed 100 of DSL evaluation.
    """

    def _terms(self, feats, scale):
        logits = scale * feats[VIDEO] @ feats[TEXT].t()  # [B, B]: row i = video i vs all texts
        by_text = logits.t()  # [B, B]: row j = text j vs all videos
        return {
            "v2t": _ce_diag(logits * F.softmax(logits, dim=0)),
            "t2v": _ce_diag(by_text * F.softmax(by_text, dim=0)),
        }


class VidImgDivideNCELearnableTempLoss(ContrastiveLoss):
    """V↔S + F↔C: video-subtitle and middle-frame-caption InfoNCE, each in its own batch.

    Terms ``v2s``, ``s2v`` (``vis_features`` vs ``text_features``) and ``f2c``, ``c2f``
    (``img_features`` vs ``cap_features``).
    """

    features = (VIDEO, TEXT, FRAME, CAPTION)

    def _terms(self, feats, scale):
        return {**_symmetric(feats[VIDEO], feats[TEXT], scale, "v2s", "s2v"),
                **_symmetric(feats[FRAME], feats[CAPTION], scale, "f2c", "c2f")}


class NCELearnableTempLoss_vs_vc(ContrastiveLoss):  # noqa: N801 (the original name)
    """V↔S + V↔C: the video against its subtitle and, separately, against its frame caption.

    Terms ``v2s``, ``s2v`` (``vis_features`` vs ``text_features``) and ``v2c``, ``c2v``
    (``vis_features`` vs ``cap_features``). ``img_features`` is not used.
    """

    features = (VIDEO, TEXT, CAPTION)

    def _terms(self, feats, scale):
        return {**_symmetric(feats[VIDEO], feats[TEXT], scale, "v2s", "s2v"),
                **_symmetric(feats[VIDEO], feats[CAPTION], scale, "v2c", "c2v")}


class NCELearnableTempLoss_vs_vc_fc(ContrastiveLoss):  # noqa: N801
    """V↔S + V↔C + F↔C: terms ``v2s``, ``s2v``, ``v2c``, ``c2v``, ``f2c``, ``c2f``.

    S = ``text_features``, C = ``cap_features``, V = ``vis_features``, F = ``img_features``.
    """

    features = (VIDEO, TEXT, FRAME, CAPTION)

    def _terms(self, feats, scale):
        return {**_symmetric(feats[VIDEO], feats[TEXT], scale, "v2s", "s2v"),
                **_symmetric(feats[VIDEO], feats[CAPTION], scale, "v2c", "c2v"),
                **_symmetric(feats[FRAME], feats[CAPTION], scale, "f2c", "c2f")}


def _vsc_terms(video: torch.Tensor, sub: torch.Tensor, cap: torch.Tensor, scale: torch.Tensor) -> dict:
    """V↔(S,C): each text source retrieves among videos; each video retrieves its subtitle (and,
    in a second term, its caption) among its positive plus the negatives of *both* sources.

    The original lays a video's candidates out as ``[positive, B-1 subtitle negatives, B-1 caption
    negatives]``; a cross-entropy does not depend on the order of its candidates, so here the
    positive stays in place and the other source's positive is masked out with -inf:
    row i of ``[vs | vc]`` with ``vc[i, i] = -inf`` is exactly that candidate set (2B - 1 logits).
    """
    vs = scale * video @ sub.t()  # [B, B]: video i vs subtitle j
    vc = scale * video @ cap.t()  # [B, B]: video i vs caption j
    if vs.shape != vc.shape:
        raise ValueError(f"vsc losses need one subtitle and one caption per video; got {vs.shape} and {vc.shape}")
    own = torch.eye(vs.shape[0], dtype=torch.bool, device=vs.device)
    n = vs.shape[0]
    return {
        "s2v": _ce_diag(vs.t()),
        "c2v": _ce_diag(vc.t()),
        # [B, 2B]: positive S_i in column i; the caption of the same clip is not a negative.
        "v2s": _ce_diag(torch.cat([vs, vc.masked_fill(own, float("-inf"))], dim=1)),
        # [B, 2B]: positive C_i in column B + i; the subtitle of the same clip is not a negative.
        "v2c": F.cross_entropy(torch.cat([vs.masked_fill(own, float("-inf")), vc], dim=1),
                               torch.arange(n, 2 * n, device=vs.device)),
    }


class NCELearnableTempLoss_vsc(ContrastiveLoss):  # noqa: N801
    """V↔(S,C): terms ``s2v``, ``c2v``, ``v2s``, ``v2c`` (see ``_vsc_terms`` for the negatives).

    S = ``text_features``, C = ``cap_features``, V = ``vis_features``; ``img_features`` unused.
    """

    features = (VIDEO, TEXT, CAPTION)

    def _terms(self, feats, scale):
        return _vsc_terms(feats[VIDEO], feats[TEXT], feats[CAPTION], scale)


class NCELearnableTempLoss_vsc_fc(ContrastiveLoss):  # noqa: N801
    """V↔(S,C) + F↔C, the paper's best (the pretrain configs): terms ``s2v``, ``c2v``, ``v2s``,
    ``v2c`` as :class:`NCELearnableTempLoss_vsc`, then ``f2c``, ``c2f``
    (``img_features`` vs ``cap_features``).
    """

    features = (VIDEO, TEXT, FRAME, CAPTION)

    def _terms(self, feats, scale):
        return {**_vsc_terms(feats[VIDEO], feats[TEXT], feats[CAPTION], scale),
                **_symmetric(feats[FRAME], feats[CAPTION], scale, "f2c", "c2f")}


LOSSES: dict[str, type[ContrastiveLoss]] = {
    cls.__name__: cls
    for cls in (
        NCELearnableTempLoss,
        NCELearnableTempDSLLoss,
        VidImgDivideNCELearnableTempLoss,
        NCELearnableTempLoss_vs_vc,
        NCELearnableTempLoss_vs_vc_fc,
        NCELearnableTempLoss_vsc,
        NCELearnableTempLoss_vsc_fc,
    )
}


def build_loss(settings: LossSettings, env: Optional[DistEnv] = None) -> ContrastiveLoss:
    """The loss ``settings.name``; with ``settings.gather`` it gathers over ``env`` (None: this
    process alone, where the gather is the identity)."""
    if settings.name not in LOSSES:
        raise ConfigError(f"loss_config.loss_name: unknown loss {settings.name!r}; valid: {', '.join(LOSSES)}")
    gather = FeatureGather(env if env is not None else DistEnv()) if settings.gather else None
    return LOSSES[settings.name](gather=gather)
