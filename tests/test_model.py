"""The CLIP-ViP model against transformers.CLIPModel and against the original eager formulation."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

import clipvip
from clipvip.model import attention, layers
from clipvip.model.layers import ProxyLayout, proxy_guided_attention
from tiny_models import hf_features, random_text, tiny_cfg, write_hf_clip

ATOL = 1e-5


def eager_proxy_attention(q, k, v, layout, dropout_p=0.0):
    """The original formulation: per-frame copies of the proxy keys/values, bmm + softmax.

    q, k, v: (B, H, S, hd) -> (B, H, S, hd). Written independently of the SDPA version.
    """
    B, H, S, hd = q.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    scale = hd ** -0.5
    q, k, v = (x.reshape(B * H, S, hd) for x in (q, k, v))
    # patch queries: one group per frame, keys = proxies + that frame's patches
    qp = q[:, M:].reshape(B * H * T, L, hd)
    kp = torch.cat([k[:, :M].repeat(1, T, 1).reshape(B * H * T, M, hd), k[:, M:].reshape(B * H * T, L, hd)], 1)
    vp = torch.cat([v[:, :M].repeat(1, T, 1).reshape(B * H * T, M, hd), v[:, M:].reshape(B * H * T, L, hd)], 1)
    out_patch = torch.bmm(torch.softmax(torch.bmm(qp * scale, kp.transpose(1, 2)), -1), vp)
    out_patch = out_patch.reshape(B * H, T * L, hd)
    # proxy queries: all tokens
    out_cls = torch.bmm(torch.softmax(torch.bmm(q[:, :M] * scale, k.transpose(1, 2)), -1), v)
    return torch.cat([out_cls, out_patch], 1).reshape(B, H, S, hd)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip") / "tiny")
    write_hf_clip(folder)
    return folder


@pytest.fixture(scope="module")
def hf_clip(clip_folder):
    return CLIPModel.from_pretrained(clip_folder).eval()


def build(clip_folder, **extra):
    torch.manual_seed(0)
    return clipvip.build_model(tiny_cfg(clip_folder, **extra)).eval()


def test_sdpa_matches_eager_formulation():
    torch.manual_seed(0)
    layout = ProxyLayout(num_proxies=4, num_frames=3, patches_per_frame=5)
    q, k, v = (torch.randn(2, 4, 4 + 15, 8) for _ in range(3))
    assert torch.allclose(proxy_guided_attention(q, k, v, layout), eager_proxy_attention(q, k, v, layout), atol=ATOL)


def test_whole_video_tower_matches_eager(clip_folder, monkeypatch):
    model = build(clip_folder)
    with torch.no_grad():
        model.clipmodel.vision_model.embeddings.temporal_embedding.normal_()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        fast = model.encode_video(video)
        monkeypatch.setattr(attention, "proxy_guided_attention", eager_proxy_attention)
        slow = model.encode_video(video)
    assert torch.allclose(fast, slow, atol=ATOL)


def test_proxy_attention_is_local_for_patches():
    """A patch of frame 0 must not see frame 1's patches; a proxy sees everything."""
    torch.manual_seed(0)
    layout = ProxyLayout(2, 2, 3)
    q, k, v = (torch.randn(1, 1, 8, 4) for _ in range(3))
    out = proxy_guided_attention(q, k, v, layout)
    v2 = v.clone()
    v2[:, :, 2 + 3:] += 10.0  # change frame 1's patch values only
    out2 = proxy_guided_attention(q, k, v2, layout)
    assert torch.allclose(out[:, :, 2:5], out2[:, :, 2:5])  # frame 0 patches unchanged
    assert not torch.allclose(out[:, :, :2], out2[:, :, :2])  # proxies changed


def test_image_clip_equivalence(clip_folder, hf_clip):
    """add_cls_num=0, T=1, no temporal embedding: exactly image CLIP."""
    model = build(clip_folder, add_cls_num=0, if_use_temporal_embed=0)
    images = torch.randn(3, 3, 32, 32)
    ids, mask = random_text(4, 12, lengths=[12, 5, 2, 8])
    with torch.no_grad():
        ours_v = model.clipmodel.get_video_features(images[:, None])
        ours_t = model.clipmodel.get_text_features(ids, mask)
        ref_v = hf_features(hf_clip.get_image_features(pixel_values=images))
        ref_t = hf_features(hf_clip.get_text_features(input_ids=ids, attention_mask=mask))
        enc_v = model.encode_video(images[:, None])
    assert torch.allclose(ours_v, ref_v, atol=ATOL), (ours_v - ref_v).abs().max()
    assert torch.allclose(ours_t, ref_t, atol=ATOL), (ours_t - ref_t).abs().max()
    assert torch.allclose(enc_v, F.normalize(ref_v, dim=-1), atol=ATOL)
    assert torch.allclose(enc_v.norm(dim=-1), torch.ones(3))


def test_meanpool_baseline_is_framewise_image_clip(clip_folder, hf_clip):
    model = build(clip_folder, type="meanpool")
    names = set(model.state_dict())
    assert not any("added_cls" in n or "temporal_embedding" in n for n in names)
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode_video(video)
        frames = F.normalize(hf_features(hf_clip.get_image_features(pixel_values=video.reshape(6, 3, 32, 32))), dim=-1)
    ref = F.normalize(frames.reshape(2, 3, -1).mean(1), dim=-1)
    assert torch.allclose(ours, ref, atol=ATOL)
    # frame order cannot matter to a mean
    with torch.no_grad():
        assert torch.allclose(model.encode_video(video.flip(1)), ours, atol=ATOL)


def test_vip_sees_frame_order(clip_folder):
    model = build(clip_folder)
    with torch.no_grad():
        model.clipmodel.vision_model.embeddings.temporal_embedding.normal_()
        video = torch.randn(1, 4, 3, 32, 32)
        assert not torch.allclose(model.encode_video(video), model.encode_video(video.flip(1)), atol=1e-4)


def linear_resample(table, size):
    """Direct formula of linear interpolation with align_corners=False: (S, D) -> (size, D)."""
    S = table.shape[0]
    rows = []
    for t in range(size):
        x = min(max((t + 0.5) * S / size - 0.5, 0.0), S - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, S - 1)
        w = x - lo
        rows.append(table[lo] * (1 - w) + table[hi] * w)
    return torch.stack(rows)


@pytest.mark.parametrize("frames", [4, 2, 7, 32])
def test_temporal_interpolation(clip_folder, frames):
    model = build(clip_folder, temporal_size=4)
    emb = model.clipmodel.vision_model.embeddings
    with torch.no_grad():
        emb.temporal_embedding.normal_()
        got = emb.temporal_embed_for(frames)[0]
        table = emb.temporal_embedding[0].clone()
        expected = table if frames == 4 else linear_resample(table, frames)
        assert torch.allclose(got, expected, atol=1e-6)
        # and the embedding is what the patches of frame t receive
        video = torch.randn(1, frames, 3, 32, 32)
        tokens, layout = emb(video)
        emb.temporal_embedding.zero_()
        tokens0, _ = emb(video)
    M, L = layout.num_proxies, layout.patches_per_frame
    diff = (tokens - tokens0)[0, M:].reshape(frames, L, -1)
    assert torch.allclose(diff, expected[:, None].expand_as(diff), atol=1e-5)
    assert torch.allclose(tokens[0, :M], tokens0[0, :M])  # proxies get no temporal embedding


def test_token_layout(clip_folder):
    model = build(clip_folder, add_cls_num=3)
    tokens, layout = model.clipmodel.vision_model.embeddings(torch.randn(2, 5, 3, 32, 32))
    assert layout == ProxyLayout(4, 5, 16)
    assert tokens.shape == (2, 4 + 5 * 16, 32)


def test_every_parameter_gets_a_gradient(clip_folder):
    model = build(clip_folder).train()
    ids, mask = random_text(2, 10)
    out = model(torch.randn(2, 3, 3, 32, 32), ids, mask, image=torch.randn(2, 3, 32, 32),
                caption_ids=ids, caption_masks=mask)
    scale = model.logit_scale.exp()
    loss = F.cross_entropy(scale * out["vis_features"] @ out["text_features"].T, torch.arange(2)) + \
        F.cross_entropy(scale * out["img_features"] @ out["cap_features"].T, torch.arange(2))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_gradient_checkpointing_same_gradients(clip_folder):
    grads = []
    for checkpointing in (False, True):
        model = build(clip_folder).train()
        model.set_grad_checkpointing(checkpointing)
        ids, mask = random_text(2, 10)
        torch.manual_seed(1)
        out = model(torch.randn(2, 3, 3, 32, 32), ids, mask)
        (out["vis_features"] * out["text_features"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_forward_dict_and_norms(clip_folder):
    model = build(clip_folder)
    ids, mask = random_text(3, 10)
    with torch.no_grad():
        out = model(torch.randn(3, 2, 3, 32, 32), ids, mask)
    assert set(out) == {"vis_features", "text_features"}
    assert out["vis_features"].shape == out["text_features"].shape == (3, 24)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-6)


def test_wrong_input_resolution_is_a_clear_error(clip_folder):
    model = build(clip_folder)
    with pytest.raises(ValueError, match="input_res"):
        model.encode_video(torch.randn(1, 2, 3, 48, 48))


def test_logit_scale_init_and_clamp(clip_folder):
    model = build(clip_folder, logit_scale_init_value=4.6)
    assert model.logit_scale.item() == pytest.approx(4.6)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(200))
