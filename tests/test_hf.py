"""Issue 15: checkpoints as Hugging Face models (clipvip convert, Auto classes, processor, hub).

A released-layout checkpoint (``clipmodel.*`` keys) of a tiny CLIP-ViP is written here, converted
with the ``clipvip convert`` command, and read back through transformers; everything offline.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor

import clipvip
from clipvip.apps import retrieval
from clipvip.apps.convert import save_best_as_hf
from clipvip.apps.main import main as clipvip_main
from clipvip.apps.search.encode import Encoder, resolve_config
from clipvip.data.retrieval_dataset import tokenize
from clipvip.data.video import count_frames, load_frames
from clipvip.errors import CheckpointError, ClipvipError
from clipvip.hf import CLIPViPConfig, CLIPViPModel, CLIPViPProcessor, is_converted_folder, push_folder
from clipvip.hf.convert import convert_checkpoint
from clipvip.hf.processing import VideoInputSettings
from clipvip.model.clip_vip import VideoSettings
from clipvip.model.factory import resolve_clip_config
from clipvip.model.weights import save_checkpoint

from conftest import write_clip
from tiny_models import random_text, tiny_cfg, tiny_clip_config, write_hf_clip

CLIP_VOCAB = 49408  # the real tokenizer's ids, so that the processor's captions fit the tiny model
RESULTS = {"msrvtt_test": {"protocol": "multi-caption", "n_videos": 6, "n_texts": 6, "skipped_videos": [],
                           "t2v": {"R1": 33.3, "R5": 66.7, "R10": 100.0, "MdR": 2.0, "MnR": 2.5},
                           "v2t": {"R1": 50.0, "R5": 83.3, "R10": 100.0, "MdR": 1.5, "MnR": 2.2}}}
PICKLE_HEADS = (b"PK\x03\x04", b"\x80")  # torch.save's zip, a raw pickle


def released_checkpoint(tmp, name: str = "released", **vision_extra):
    """A trained-looking tiny CLIP-ViP, its config file and its ``.pt`` in the released layout."""
    clip_folder = os.path.join(tmp, f"{name}_clip")
    write_hf_clip(clip_folder, vocab_size=CLIP_VOCAB)
    cfg = tiny_cfg(clip_folder, "--test_num_frms", "4", "--output_dir", tmp, **vision_extra)
    model = clipvip.build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # the proxies and temporal embedding are not CLIP's: perturb them too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = os.path.join(tmp, f"{name}.pt")
    save_checkpoint(model, weights)
    config_path = clipvip.save_config(cfg, tmp, f"{name}.json")
    return cfg, config_path, weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(cfg, config_path, weights, folder, uploads)``: the released checkpoint converted by
    ``clipvip convert`` with results, and pushed with the Hub calls replaced by a recorder."""
    tmp = str(tmp_path_factory.mktemp("hf"))
    cfg, config_path, weights = released_checkpoint(tmp)
    results = os.path.join(tmp, "eval_results.json")
    with open(results, "w", encoding="utf-8") as f:
        json.dump(RESULTS, f)
    out = os.path.join(tmp, "converted")
    uploads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploads.append(("create", repo_id, kw))
                   or type("Repo", (), {"repo_id": repo_id})())
        mp.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(("upload", kw["repo_id"], kw))
                   or f"https://huggingface.co/{kw['repo_id']}/commit/0")
        assert clipvip_main(["convert", "--config", config_path, "--weights", weights, "--out", out,
                             "--results", results, "--push_to_hub", "someone/clipvip-tiny"]) == 0
    return cfg, config_path, weights, out, uploads


def reference_model(config_path: str, weights: str):
    """The ``.pt`` path: the config file with ``--e2e_weights_path`` (an exact load)."""
    return clipvip.build_model(clipvip.load_config(config_path, ["--e2e_weights_path", weights])).eval()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An 8-frame 64 px H.264 clip: more frames than the 4 the config samples, resized to 32 px."""
    return write_clip(tmp_path_factory.mktemp("hf_video") / "clip.mp4", n_frames=8, size=64, seed=3)


def _video_text(seed: int = 0):
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids, mask = random_text(2, 12, seed=seed)
    return video, ids, mask


# ---------------------------------------------------------------------------------------------
# clipvip convert: the folder
# ---------------------------------------------------------------------------------------------
def test_convert_writes_a_pickle_free_model_folder(converted):
    cfg, _, _, out, _ = converted
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    for name in names:  # no pickle anywhere: nothing torch.load would have to unpickle
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")), name
        with open(os.path.join(out, name), "rb") as f:
            assert not f.read(4).startswith(PICKLE_HEADS), name
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    extra = cfg.clip_vision_additional_config
    assert config["model_type"] == "clipvip"
    assert config["use_proxies"] is True and config["add_cls_num"] == extra["add_cls_num"]
    assert config["temporal_size"] == extra["temporal_size"] and config["use_temporal_embed"] is True
    assert config["vision_config"]["patch_size"] == 8 and config["text_config"]["vocab_size"] == CLIP_VOCAB
    with open(os.path.join(out, "preprocessor_config.json"), encoding="utf-8") as f:
        pre = json.load(f)
    assert pre["processor_class"] == "CLIPViPProcessor"
    assert (pre["n_clips"], pre["num_frms"], pre["sample_rate"], pre["input_res"]) == (1, 4, 0, [32, 32])
    assert pre["resize_kernel"] == "bicubic" and pre["max_txt_len"] == cfg.max_txt_len
    assert pre["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_every_file_of_a_converted_folder_has_the_umask_mode(converted, tmp_path):
    """safetensors writes its file through a private 0600 temporary file: model.safetensors came
    out unreadable to the group while config.json beside it was 0644 (issue 26)."""
    _, config_path, weights, out, _ = converted
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
    assert modes and set(modes.values()) == {expected}, {k: oct(v) for k, v in modes.items()}
    # Whatever the umask: under 027 the folder's files are 0640, all of them.
    old = os.umask(0o027)
    try:
        clipvip_main(["convert", "--config", config_path, "--weights", weights, "--out", str(tmp_path / "c")])
    finally:
        os.umask(old)
    assert {os.stat(p).st_mode & 0o777 for p in (tmp_path / "c").iterdir()} == {0o640}


def test_model_card_names_the_source_and_shows_the_results(converted):
    _, _, weights, out, _ = converted
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        card = f.read()
    with open(weights, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() in card
    assert os.path.basename(weights) in card
    assert card.startswith("---\n") and '\nlicense: ""\n' in card  # for the uploader to fill in
    assert "| dataset | direction | R@1 | R@5 | R@10 | MdR | MnR |" in card
    assert "| msrvtt_test | t2v | 33.3 | 66.7 | 100.0 | 2.0 | 2.5 |" in card
    assert "| msrvtt_test | v2t | 50.0 | 83.3 | 100.0 | 1.5 | 2.2 |" in card
    assert "AutoModel.from_pretrained" in card and "AutoProcessor.from_pretrained" in card


def test_push_to_hub_uploads_the_converted_folder(converted):
    _, _, _, out, uploads = converted
    assert [call[:2] for call in uploads] == [("create", "someone/clipvip-tiny"), ("upload", "someone/clipvip-tiny")]
    assert uploads[1][2]["folder_path"] == out  # the folder as written, model card included


def test_push_refuses_a_folder_that_is_not_converted(tmp_path):
    with pytest.raises(ClipvipError, match="not a converted CLIP-ViP folder"):
        push_folder(str(tmp_path), "someone/nothing")


# ---------------------------------------------------------------------------------------------
# Transformers integration: the same features as the .pt path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", [AutoModel, CLIPViPModel], ids=["AutoModel", "CLIPViPModel"])
def test_from_pretrained_gives_the_features_of_the_pt_path(converted, loader):
    _, config_path, weights, out, _ = converted
    model = loader.from_pretrained(out).eval()
    assert type(model) is CLIPViPModel
    reference = reference_model(config_path, weights)
    assert list(model.state_dict()) == list(reference.state_dict())  # the released layout, clipmodel.*
    video, ids, mask = _video_text()
    with torch.no_grad():
        torch.testing.assert_close(model.get_video_features(video), reference.encode_video(video), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.get_text_features(ids, mask), reference.encode_text(ids, mask),
                                   rtol=0, atol=1e-6)
        out_features = model(input_ids=ids, pixel_values=video, attention_mask=mask)
    unit = torch.ones(2)
    torch.testing.assert_close(out_features.video_embeds.norm(dim=-1), unit)
    scale = reference.clipmodel.logit_scale.exp()
    torch.testing.assert_close(out_features.logits_per_text,
                               scale * reference.encode_text(ids, mask) @ reference.encode_video(video).T,
                               rtol=1e-6, atol=1e-5)  # logits of size ~scale: a few float32 ulps


def test_auto_config_rebuilds_the_architecture(converted):
    cfg, _, _, out, _ = converted
    config = AutoConfig.from_pretrained(out)
    assert isinstance(config, CLIPViPConfig)
    assert config.video_settings() == VideoSettings.from_config(cfg.clip_vision_additional_config)
    assert config.clip_config().to_dict()["vision_config"] == resolve_clip_config(cfg.clip_config).to_dict()["vision_config"]


def test_save_pretrained_round_trip(converted, tmp_path):
    _, _, _, out, _ = converted
    model = CLIPViPModel.from_pretrained(out)
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again")
    assert again.config.to_dict() == {**model.config.to_dict(), "_name_or_path": again.config._name_or_path}
    for (key, a), (key_b, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key


@pytest.mark.parametrize("vip", [True, False], ids=["ViP", "mean-pool"])
def test_random_model_from_config_matches_the_retrieval_model(vip):
    """``use_proxies`` false: the mean-pooled frame baseline; its features are unit vectors too."""
    video_settings = VideoSettings(use_proxies=vip, add_cls_num=2 if vip else 0, temporal_size=4,
                                   use_temporal_embed=vip)
    model = CLIPViPModel(CLIPViPConfig.from_parts(tiny_clip_config(), video_settings)).eval()
    assert ("clipmodel.vision_model.embeddings.added_cls" in model.state_dict()) is vip
    video, ids, mask = _video_text(seed=2)
    with torch.no_grad():
        features = model.get_video_features(video)
        # Bit-equal: get_*_features are the retrieval model's encode_* on the same input.
        torch.testing.assert_close(features, model.retrieval.encode_video(video), rtol=0, atol=0)
        torch.testing.assert_close(model.get_text_features(ids, mask), model.retrieval.encode_text(ids, mask),
                                   rtol=0, atol=0)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# The processor: as evaluation reads clips and captions
# ---------------------------------------------------------------------------------------------
def test_auto_processor_equals_load_clip_and_the_tokenizer(converted, clip_file):
    cfg, _, _, out, _ = converted
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, CLIPViPProcessor)
    assert '"num_frms": 4' in repr(processor)  # transformers' repr reads to_dict
    captions = ["a man is singing on stage", "a dog catches a frisbee in the park"]
    inputs = processor(text=captions, videos=[clip_file, clip_file], return_tensors="pt")
    ids, mask = tokenize(clipvip.build_tokenizer(cfg), captions, cfg.max_txt_len)
    assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
    expected = clipvip.load_clip(clip_file, cfg)  # [T, 3, H, W]
    assert inputs["pixel_values"].shape == (2, 4, 3, 32, 32)
    assert torch.equal(inputs["pixel_values"][0], expected) and torch.equal(inputs["pixel_values"][1], expected)


def test_processor_takes_frames_in_memory(converted, clip_file):
    """Every frame of the clip as a uint8 array or PIL images: the same indices and transform."""
    cfg, _, _, out, _ = converted
    processor = CLIPViPProcessor.from_pretrained(out)
    every = load_frames(clip_file, range(count_frames(clip_file)))  # (8, 64, 64, 3) uint8
    expected = clipvip.load_clip(clip_file, cfg)
    from_array = processor(videos=[every.numpy()])["pixel_values"]
    from_tensor = processor(videos=every)["pixel_values"]  # one video alone
    from_images = processor(videos=[[Image.fromarray(f) for f in every.numpy()]])["pixel_values"]
    for batch in (from_array, from_tensor, from_images):
        assert batch.shape == (1, 4, 3, 32, 32)
        assert torch.equal(batch[0], expected)


def test_processor_and_model_end_to_end(converted, clip_file):
    """The Hub-style use of the README: processor -> model -> similarity."""
    _, config_path, weights, out, _ = converted
    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    inputs = processor(text=["a red square", "a blue circle"], videos=[clip_file], return_tensors="pt")
    with torch.no_grad():
        similarity = model(**inputs).logits_per_text  # (2 texts, 1 video)
        reference = reference_model(config_path, weights)
        expected = reference.clipmodel.logit_scale.exp() * (
            reference.encode_text(inputs["input_ids"], inputs["attention_mask"])
            @ reference.encode_video(inputs["pixel_values"]).T)
    assert similarity.shape == (2, 1)
    torch.testing.assert_close(similarity, expected, rtol=0, atol=1e-5)


def test_processor_refuses_a_normalisation_it_does_not_apply(converted, tmp_path):
    _, _, _, out, _ = converted
    folder = shutil.copytree(out, tmp_path / "other_std")
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text())
    path.write_text(json.dumps({**pre, "image_std": [0.5, 0.5, 0.5]}))
    with pytest.raises(ClipvipError, match="image_std"):
        CLIPViPProcessor.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Hub ids: through the local Hugging Face cache
# ---------------------------------------------------------------------------------------------
def _cache_with(folder: str, cache: str, repo_id: str) -> None:
    """``folder`` as the cached snapshot of ``repo_id`` (the layout huggingface_hub downloads into)."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def test_hub_id_loads_from_the_cache_offline(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, config_path, weights, out, _ = converted
    cache = str(tmp_path / "hub")
    _cache_with(out, cache, "someone/clipvip-tiny")
    model = CLIPViPModel.from_pretrained("someone/clipvip-tiny", cache_dir=cache).eval()
    processor = CLIPViPProcessor.from_pretrained("someone/clipvip-tiny", cache_dir=cache)
    video, _, _ = _video_text()
    with torch.no_grad():
        torch.testing.assert_close(model.get_video_features(video),
                                   reference_model(config_path, weights).encode_video(video), rtol=0, atol=1e-6)
    assert processor.settings == CLIPViPProcessor.from_pretrained(out).settings
    # The Auto classes pass options of their own (trust_remote_code, ...) on to the classes.
    assert AutoProcessor.from_pretrained("someone/clipvip-tiny", cache_dir=cache).settings == processor.settings
    auto = AutoModel.from_pretrained("someone/clipvip-tiny", cache_dir=cache).eval()
    with torch.no_grad():  # bit-equal: the same class and weights, the same input
        assert torch.equal(auto.get_video_features(video), model.get_video_features(video))


def test_hub_id_not_cached_offline_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (CLIPViPModel.from_pretrained, CLIPViPProcessor.from_pretrained):
        with pytest.raises(ClipvipError) as raised:
            load("someone/not-downloaded", cache_dir=str(tmp_path / "empty"), local_files_only=True)
        message = str(raised.value)
        assert "\n" not in message and "hf download someone/not-downloaded" in message


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def test_convert_refuses_a_checkpoint_of_another_architecture(converted, tmp_path):
    cfg, _, weights, _, _ = converted
    other = VideoSettings.from_config({**cfg.clip_vision_additional_config, "add_cls_num": 5})
    out = tmp_path / "mismatch"
    with pytest.raises(CheckpointError, match="does not match"):
        convert_checkpoint(weights, resolve_clip_config(cfg.clip_config), other, VideoInputSettings.from_config(cfg),
                           clipvip.build_tokenizer(cfg), str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_convert_refuses_a_folder_that_is_not_empty(converted, tmp_path):
    cfg, config_path, weights, out, _ = converted
    with pytest.raises(ClipvipError, match="not an empty folder"):
        clipvip_main(["convert", "--config", config_path, "--weights", weights, "--out", out])


def test_convert_help_and_usage(capsys):
    with pytest.raises(SystemExit) as done:
        clipvip_main(["convert", "--help"])
    assert done.value.code == 0 and "--weights CKPT" in capsys.readouterr().out
    assert clipvip_main(["--help"]) == 0 and "convert --config CFG --weights CKPT --out DIR" in capsys.readouterr().out


def test_import_clipvip_registers_the_auto_classes(converted):
    """In a fresh interpreter: ``import clipvip`` alone makes the folder loadable by transformers."""
    _, _, _, out, _ = converted
    code = ("import clipvip, transformers; "
            f"m = transformers.AutoModel.from_pretrained({out!r}); p = transformers.AutoProcessor.from_pretrained({out!r}); "
            "print(type(m).__module__, type(m).__name__, type(p).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["clipvip.hf.modeling", "CLIPViPModel", "CLIPViPProcessor"]


# ---------------------------------------------------------------------------------------------
# Accepted wherever a checkpoint is: --e2e_weights_path, clipvip encode|index --weights, serve
# ---------------------------------------------------------------------------------------------
def test_a_converted_folder_is_a_checkpoint_for_build_model(converted):
    _, config_path, weights, out, _ = converted
    from_folder = reference_model(config_path, out)
    video, ids, mask = _video_text()
    with torch.no_grad():  # bit-equal: the same weights in the same model, the same input
        reference = reference_model(config_path, weights)
        assert torch.equal(from_folder.encode_video(video), reference.encode_video(video))
        assert torch.equal(from_folder.encode_text(ids, mask), reference.encode_text(ids, mask))


def test_a_hub_id_is_a_checkpoint_for_the_search_encoder(converted, tmp_path, monkeypatch):
    """``clipvip encode|index --weights owner/name`` (and ``serve``, which rebuilds the index's
    stored config) load the cached Hub copy: the same weights as the ``.pt``."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, config_path, weights, out, _ = converted
    _cache_with(out, str(tmp_path / "hub"), "someone/clipvip-tiny")
    from_hub = Encoder(resolve_config(config_path, "someone/clipvip-tiny"), "cpu")
    assert from_hub.model_fingerprint == Encoder(resolve_config(config_path, weights), "cpu").model_fingerprint


def test_a_hub_id_not_cached_offline_is_one_line_naming_the_download(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    _, config_path, _, _, _ = converted
    with pytest.raises(ClipvipError) as raised:
        reference_model(config_path, "someone/not-downloaded")
    assert "\n" not in str(raised.value) and "hf download someone/not-downloaded" in str(raised.value)


def test_readme_hub_snippet_runs(converted, clip_file, capsys):
    """The README's Hugging Face lines, as written, on the converted tiny model and a clip."""
    _, config_path, weights, out, _ = converted
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        text = f.read()
    section = text[text.index("## Encode videos and sentences"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "AutoModel.from_pretrained" in code and len(code.strip().splitlines()) == 5
    exec(compile(code.replace("clipvip-b32", out).replace("video7010.mp4", clip_file), "README.md", "exec"), {})
    printed = float(re.search(r"tensor\(\[\[(-?[0-9.e-]+)\]\]\)", capsys.readouterr().out).group(1))
    processor = CLIPViPProcessor.from_pretrained(out)
    inputs = processor(text=["a man is singing on stage"], videos=[clip_file])
    reference = reference_model(config_path, weights)
    with torch.no_grad():
        expected = reference.clipmodel.logit_scale.exp() * (
            reference.encode_text(inputs["input_ids"], inputs["attention_mask"])
            @ reference.encode_video(inputs["pixel_values"]).T)
    assert printed == pytest.approx(float(expected), abs=1e-3)  # printed with 4 digits


def test_fine_tuning_writes_its_best_model_as_a_converted_folder(synthetic_data, tmp_path):
    """``--save_hf 1``: ``ckpt/model_best_hf`` beside ``ckpt/model_best.pt``, the same weights;
    a rerun of the finished run replaces it."""
    clip = str(tmp_path / "clip")
    write_hf_clip(clip, vocab_size=CLIP_VOCAB, max_positions=32)
    entry = {"txt": synthetic_data["train"], "vis": synthetic_data["videos"]}
    out = str(tmp_path / "run")
    cfg = clipvip.load_config({
        "train_datasets": {"name": "train", **entry},
        "inference_datasets": [{"name": "test", "txt": synthetic_data["test"], "vis": synthetic_data["videos"]}],
        "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 16,
        "clip_config": clip, "clip_weights": clip,
        "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3},
        "train_batch_size": 3, "test_batch_size": 3, "n_workers": 0, "pin_mem": 0, "fp16": 0,
        "num_train_epochs": 1, "seed": 0, "output_dir": out, "is_train": 1, "save_hf": 1}, [])
    retrieval.run(cfg)
    folder = os.path.join(out, "ckpt", "model_best_hf")
    model = AutoModel.from_pretrained(folder).eval()
    best = clipvip.build_model(clipvip.load_config(cfg.to_dict(), [
        "--e2e_weights_path", os.path.join(out, "ckpt", "model_best.pt")])).eval()
    for key, value in best.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_frms"] == 4
    assert save_best_as_hf(cfg) == folder and is_converted_folder(folder)  # a rerun replaces it
    assert not [name for name in os.listdir(os.path.join(out, "ckpt")) if name.startswith(".tmp")]
