"""Loading HF CLIP folders and released-format CLIP-ViP checkpoints; writing our own."""
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import clipvip
from clipvip.errors import CheckpointError
from clipvip.model import read_state_dict, save_checkpoint
from tiny_models import random_text, tiny_cfg, write_hf_clip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf") / "clip")
    model = write_hf_clip(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def released_checkpoint(path, hf_state, add_cls_num=3, temporal_size=4, dtype=torch.float16, with_buffers=True):
    """A checkpoint in the released layout: clipmodel.<HF name>, proxies, temporal, fp16 as apex O2 saved."""
    D = hf_state["vision_model.embeddings.class_embedding"].shape[0]
    state = {f"clipmodel.{k}": v.to(dtype) for k, v in hf_state.items()
             if with_buffers or not k.endswith("position_ids")}
    state["clipmodel.vision_model.embeddings.added_cls"] = torch.randn(add_cls_num, D).to(dtype)
    state["clipmodel.vision_model.embeddings.temporal_embedding"] = torch.randn(1, temporal_size, D).to(dtype)
    if with_buffers:
        state["clipmodel.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        state["clipmodel.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["clipmodel.logit_scale"] = torch.tensor(4.2).to(dtype)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("safe", [True, False])
def test_clip_weights_initialise(tmp_path, safe):
    folder = str(tmp_path / "clip")
    hf = write_hf_clip(folder, safe=safe)
    assert os.path.isfile(os.path.join(folder, "model.safetensors" if safe else "pytorch_model.bin"))
    torch.manual_seed(0)
    model = clipvip.build_model(tiny_cfg(folder, logit_scale_init_value=3.0))
    ours = model.clipmodel.state_dict()
    for key, value in hf.state_dict().items():
        if key == "logit_scale" or key.endswith("position_ids"):
            continue
        assert torch.equal(ours[key], value), key
    proxies = ours["vision_model.embeddings.added_cls"]
    assert proxies.shape == (3, 32) and 0.5 < proxies.std() < 1.5  # standard normal
    assert torch.count_nonzero(ours["vision_model.embeddings.temporal_embedding"]) == 0
    assert model.logit_scale.item() == pytest.approx(3.0)  # reset to the init value, as the original


def test_load_summary_lists_fresh_tensors(hf_folder, caplog):
    folder, _ = hf_folder
    from clipvip.model.weights import load_clip_weights

    model = clipvip.build_model(tiny_cfg(folder), load_weights=False)
    report = load_clip_weights(model, folder)
    assert report.initialised == ["vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding"]
    assert report.clean and "initialised fresh (2)" in report.summary()


def test_released_layout_loads_exactly(tmp_path, hf_folder):
    folder, hf_state = hf_folder
    path = str(tmp_path / "pretrain_clipvip_base.pt")
    state = released_checkpoint(path, hf_state)
    model = clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))
    ours = model.state_dict()
    expected = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert set(ours) == set(expected)  # exactly the released keys
    for key, value in expected.items():
        assert torch.equal(ours[key], value.float()), key
    assert model.logit_scale.item() == pytest.approx(4.2, abs=1e-2)  # from the checkpoint


def test_released_layout_without_position_ids(tmp_path, hf_folder):
    folder, hf_state = hf_folder
    path = str(tmp_path / "ckpt.pt")
    released_checkpoint(path, hf_state, with_buffers=False)
    clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))


def test_round_trip_same_outputs(tmp_path, hf_folder):
    folder, _ = hf_folder
    model = clipvip.build_model(tiny_cfg(folder)).eval()
    with torch.no_grad():
        model.clipmodel.vision_model.embeddings.temporal_embedding.normal_()
    path = str(tmp_path / "ckpt" / "model_step_10.pt")
    save_checkpoint(torch.nn.DataParallel(model), path)  # wrapper prefixes are stripped
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("clipmodel.") for k in raw) and not any(k.startswith("module.") for k in raw)
    reloaded = clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path)).eval()
    ids, mask = random_text(2, 10)
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(video, ids, mask), reloaded(video, ids, mask)
    # Bit-equal: the same weights in the same model, the same input.
    assert torch.equal(a["vis_features"], b["vis_features"]) and torch.equal(a["text_features"], b["text_features"])
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]  # atomic write leaves nothing


def test_ddp_prefixed_checkpoint_loads(tmp_path, hf_folder):
    folder, _ = hf_folder
    model = clipvip.build_model(tiny_cfg(folder))
    path = str(tmp_path / "ddp.pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))


def _mutated_checkpoint(tmp_path, hf_folder, mutate):
    folder, hf_state = hf_folder
    path = str(tmp_path / "bad.pt")
    state = released_checkpoint(path, hf_state)
    mutate(state)
    torch.save(state, path)
    return folder, path


def test_missing_key_is_an_error(tmp_path, hf_folder):
    folder, path = _mutated_checkpoint(
        tmp_path, hf_folder, lambda s: s.pop("clipmodel.visual_projection.weight"))
    with pytest.raises(CheckpointError, match="missing.*\n.*clipmodel.visual_projection.weight"):
        clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))


def test_unexpected_key_is_an_error(tmp_path, hf_folder):
    folder, path = _mutated_checkpoint(
        tmp_path, hf_folder, lambda s: s.__setitem__("clipmodel.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected.*\n.*clipmodel.extra_head.weight"):
        clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))


def test_shape_mismatch_names_key_and_shapes(tmp_path, hf_folder):
    folder, hf_state = hf_folder
    path = str(tmp_path / "cls1.pt")
    released_checkpoint(path, hf_state, add_cls_num=1)  # config says 3 proxies
    with pytest.raises(CheckpointError, match=r"added_cls: \(1, 32\) vs \(3, 32\)"):
        clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path))


def test_meanpool_config_rejects_vip_checkpoint(tmp_path, hf_folder):
    folder, hf_state = hf_folder
    path = str(tmp_path / "vip.pt")
    released_checkpoint(path, hf_state)
    with pytest.raises(CheckpointError, match="added_cls"):
        clipvip.build_model(tiny_cfg(folder, "--e2e_weights_path", path, type="meanpool"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clipvip_pwned_by_checkpoint",))


def test_checkpoint_never_runs_code(tmp_path, hf_folder):
    folder, _ = hf_folder
    marker = "/tmp/clipvip_pwned_by_checkpoint"
    if os.path.exists(marker):
        os.remove(marker)
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"clipmodel.logit_scale": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a checkpoint .*a text file"):
        read_state_dict(str(garbage))
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(str(truncated))
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], str(not_tensors))
    with pytest.raises(CheckpointError, match="dict of tensors"):
        read_state_dict(str(not_tensors))


def test_clip_weights_missing_folder_message(tmp_path, hf_folder):
    folder, _ = hf_folder
    cfg = tiny_cfg(folder, "--clip_weights", "openai/not-downloaded-model")
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        clipvip.build_model(cfg)


def test_known_architectures_build_offline():
    for name, patch in (("openai/clip-vit-base-patch32", 32), ("openai/clip-vit-base-patch16", 16)):
        config = clipvip.model.resolve_clip_config(name)
        assert config.vision_config.patch_size == patch and config.projection_dim == 512
        assert config.text_config.vocab_size == 49408 and config.vision_config.hidden_act == "quick_gelu"


def test_state_dict_keys_match_released_b32_layout():
    """The full-size model's keys are the released B/32 checkpoint's (HF CLIP names + 2 new)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = clipvip.load_config("configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json",
                              ["--e2e_weights_path", "none", "--clip_weights", "none"])
    with torch.device("meta"):
        ours = set(clipvip.build_model(cfg, load_weights=False).state_dict())
        hf = CLIPModel(CLIPConfig(**clipvip.model.KNOWN_ARCHITECTURES["openai/clip-vit-base-patch32"]))
    expected = {f"clipmodel.{k}" for k in hf.state_dict() if not k.endswith("position_ids")}
    expected |= {"clipmodel.vision_model.embeddings.added_cls", "clipmodel.vision_model.embeddings.temporal_embedding"}
    assert ours == expected
