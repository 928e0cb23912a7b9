"""Config loading: official files, defaults, overrides, blob mount, errors."""
import glob
import json
import os
import subprocess
import sys

import pytest

import clipvip
from clipvip.config import DEFAULTS, save_config
from clipvip.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.json")))
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "reference", "configs")


def test_ten_official_configs_are_present():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS}
    official = {f"{task}/{task}_vip_base_{p}.json" for task in
                ("msrvtt_retrieval", "didemo_retrieval", "lsmdc_retrieval", "actnet_retrieval") for p in (16, 32)}
    official |= {f"pretrain/pretrain_vip_base_{p}.json" for p in (16, 32)}
    assert official <= names


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason=(
    f"no reference copy of the official configs at {REFERENCE}: to compare configs/ with them, put "
    "CLIP-ViP/src/configs of github.com/microsoft/XPretrain there (../shared/reference/configs of the repo)"))
def test_official_configs_equal_reference():
    for ref in glob.glob(os.path.join(REFERENCE, "*", "*.json")):
        ours = os.path.join(REPO, "configs", os.path.relpath(ref, REFERENCE))
        with open(ref) as a, open(ours) as b:
            assert json.load(a) == json.load(b), ours


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_official_configs_load_with_file_values(path):
    cfg = clipvip.load_config(path)
    with open(path) as f:
        raw = json.load(f)
    for key, value in raw.items():
        if key in ("train_datasets", "val_datasets", "inference_datasets"):
            datasets = [value] if isinstance(value, dict) else value
            assert [d["name"] for d in cfg[key]] == [d["name"] for d in datasets]
            assert [d["txt"] for d in cfg[key]] == [d["txt"] for d in datasets]
        elif isinstance(value, dict):
            assert {k: cfg[key][k] for k in value} == value
        else:
            assert cfg[key] == value, key
    assert cfg.config == path


def test_attribute_access_and_defaults(tmp_path):
    path = tmp_path / "model_only.json"
    path.write_text(json.dumps({"clip_config": "openai/clip-vit-base-patch16",
                                "clip_vision_additional_config": {"type": "ViP", "add_cls_num": 1}}))
    cfg = clipvip.load_config(str(path))
    assert cfg.clip_vision_additional_config.add_cls_num == 1
    assert cfg.clip_vision_additional_config.temporal_size == DEFAULTS["clip_vision_additional_config"]["temporal_size"]
    assert cfg.train_batch_size == DEFAULTS["train_batch_size"] and cfg.loss_config.loss_name == "NCELearnableTempLoss"
    assert cfg.is_train is False and cfg.inference_datasets == []


def test_overrides_are_typed_from_the_file():
    path = CONFIGS[0]
    cfg = clipvip.load_config(path, [
        "--learning_rate", "1e-5", "--is_train", "--train_batch_size", "8", "--num_train_epochs=3",
        "--betas", "0.8", "0.9", "--seed", "7", "--output_dir", "/tmp/out", "--e2e_weights_path", "w.pt",
        "--gradient_accumulation_steps", "4", "--fp16", "0", "--clip_vision_additional_config.add_cls_num", "0",
        "--loss_config", '{"loss_name": "NCELearnableTempDSLLoss"}',
    ])
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.is_train is True
    assert cfg.train_batch_size == 8 and isinstance(cfg.train_batch_size, int)
    assert cfg.num_train_epochs == 3 and cfg.betas == [0.8, 0.9] and cfg.seed == 7
    assert cfg.output_dir == "/tmp/out" and cfg.e2e_weights_path == "w.pt"
    assert cfg.gradient_accumulation_steps == 4 and cfg.fp16 == 0
    assert cfg.clip_vision_additional_config.add_cls_num == 0
    assert cfg.loss_config == {"loss_name": "NCELearnableTempDSLLoss", "if_gather": 1}


def test_config_flag_in_overrides():
    cfg = clipvip.load_config(None, ["--config", CONFIGS[0], "--seed", "3"])
    assert cfg.config == CONFIGS[0] and cfg.seed == 3


def test_a_dict_of_a_files_keys_loads_like_the_file(tmp_path):
    values = {"learning_rate": 1e-5, "train_datasets": {"name": "a", "txt": "a.jsonl", "vis": "videos"}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    from_file = clipvip.load_config(str(path), ["--seed", "3"])
    from_dict = clipvip.load_config(values, ["--seed", "3"])
    assert from_dict == {**from_file, "config": None}
    assert from_dict.train_datasets[0].vis_format == "video" and from_dict.seed == 3
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        clipvip.load_config({"learning_rat": 1e-5})


def test_none_valued_keys_take_strings_and_none():
    cfg = clipvip.load_config(None, ["--clip_weights", "some/folder", "--e2e_weights_path", "none"])
    assert cfg.clip_weights == "some/folder" and cfg.e2e_weights_path is None


def test_blob_mount_dir_joins_paths():
    path = os.path.join(REPO, "configs", "msrvtt_retrieval", "msrvtt_retrieval_vip_base_32.json")
    cfg = clipvip.load_config(path, ["--blob_mount_dir", "/data", "--e2e_weights_path", "ckpt/w.pt"])
    assert cfg.train_datasets[0].txt == "/data/clip_data/vis_db/msrvtt_video_clips/train9k.jsonl"
    assert cfg.inference_datasets[0].vis == "/data/clip_data/vis_db/msrvtt_video_clips/videos_6fps"
    assert cfg.e2e_weights_path == "/data/ckpt/w.pt"
    assert cfg.output_dir.startswith("/data/vidclip_data/output/")
    assert cfg.clip_weights == "openai/clip-vit-base-patch32"  # a model name, not joined
    absolute = clipvip.load_config(path, ["--blob_mount_dir", "/data", "--output_dir", "/abs/out"])
    assert absolute.output_dir == "/abs/out"  # absolute paths are left alone


def test_pretrain_dataset_paths_joined():
    path = os.path.join(REPO, "configs", "pretrain", "pretrain_vip_base_32.json")
    cfg = clipvip.load_config(path, ["--blob_mount_dir", "/b"])
    assert cfg.train_datasets[0].vid_cap_path == "/b/datasets/hdvila/hdvila_captions_db"
    assert len(cfg.val_datasets) == 3


@pytest.mark.parametrize("overrides, message", [
    (["--learning_rat", "1"], "did you mean 'learning_rate'"),
    (["--train_batch_size", "eight"], "expected int"),
    (["--train_batch_size", "1.5"], "expected int"),
    (["--is_train", "maybe"], "expected a boolean"),
    (["--fp16", "maybe"], "expected int"),
    (["--learning_rate"], "needs a value"),
    (["--clip_vision_additional_config.add_cls", "1"], "did you mean 'add_cls_num'"),
    (["stray"], "unexpected command-line word"),
])
def test_override_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        clipvip.load_config(CONFIGS[0], overrides)


def test_unknown_file_key_names_nearest(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"train_batch_sise": 4}))
    with pytest.raises(ConfigError, match=r"typo.json: unknown key 'train_batch_sise' \(did you mean 'train_batch_size'"):
        clipvip.load_config(str(path))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"clip_vision_additional_config": {"add_cls_number": 2}}))
    with pytest.raises(ConfigError, match="add_cls_num"):
        clipvip.load_config(str(nested))
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"train_datasets": {"name": "x", "vsi": "videos"}}))
    with pytest.raises(ConfigError, match=r"train_datasets\[0\].*'vsi'.*'vis'"):
        clipvip.load_config(str(dataset))


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "types.json"
    path.write_text(json.dumps({"train_batch_size": "16"}))
    with pytest.raises(ConfigError, match="train_batch_size.*int"):
        clipvip.load_config(str(path))


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.json"):
        clipvip.load_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 1,\n "lr": }')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 2"):
        clipvip.load_config(str(bad))


@pytest.mark.parametrize("content, expected", [(None, "config file not found"), ("{oops", "invalid JSON")])
def test_cli_errors_are_one_line(tmp_path, content, expected):
    path = tmp_path / "cfg.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "clipvip", "config", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_save_config_round_trip(tmp_path):
    cfg = clipvip.load_config(CONFIGS[0], ["--blob_mount_dir", "/data", "--output_dir", str(tmp_path / "run")])
    written = save_config(cfg)
    assert written == str(tmp_path / "run" / "config.json")
    again = clipvip.load_config(written)
    assert again.train_datasets == cfg.train_datasets  # paths were joined once, not twice
    assert again.blob_mount_dir == "" and again.learning_rate == cfg.learning_rate


def test_every_key_is_documented():
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        doc = f.read()
    from clipvip.config import DATASET_DEFAULTS, NESTED_DEFAULTS

    keys = set(DEFAULTS) | set(DATASET_DEFAULTS) | {k for nested in NESTED_DEFAULTS.values() for k in nested}
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"undocumented keys {missing}: run python scripts/gen_config_docs.py"


def test_comment_key_is_free_text_and_the_demo_configs_say_where_their_paths_point():
    from clipvip.config import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("vip", "meanpool"):
        cfg = load_config(os.path.join(repo, "configs", "demo", f"{name}.json"))
        assert "relative to the demo's output folder" in cfg.comment
    assert load_config(None, ["--comment", "a note"]).comment == "a note"


# ---------------------------------------------------------------------------------------------
# Issue 26 item 7: "did you mean" names the key a user meant
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed, meant", [
    ("lr", "learning_rate"),  # initials: difflib alone ranks lr_mul first
    ("wd", "weight_decay"), ("gas", "gradient_accumulation_steps"),
    ("train_batch", "train_batch_size"), ("learning", "learning_rate"), ("out", "output_dir"),  # cut words
    ("epochs", "num_train_epochs"), ("batch_size", "train_batch_size"), ("num_workers", "n_workers"),  # aliases
    ("max_grad_norm", "grad_norm"),
    ("lr_mult", "lr_mul"), ("learning_rat", "learning_rate"), ("train_batch_sise", "train_batch_size"),  # typos
])
def test_did_you_mean_prefers_the_key_a_user_meant(typed, meant):
    with pytest.raises(ConfigError, match=rf"unknown option --{typed} \(did you mean '{meant}'\?\)"):
        clipvip.load_config(None, [f"--{typed}", "1"])


def test_did_you_mean_in_nested_and_dataset_keys():
    with pytest.raises(ConfigError, match="did you mean 'temporal_size'"):
        clipvip.load_config(None, ["--clip_vision_additional_config.temporal", "4"])
    with pytest.raises(ConfigError, match="did you mean 'vid_cap_path'"):
        clipvip.load_config({"train_datasets": {"name": "x", "vcp": "captions"}})


# ---------------------------------------------------------------------------------------------
# Issue 26 item 7: where a config file's relative model paths are
# ---------------------------------------------------------------------------------------------
def _model_folder(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    return str(path)


def test_a_config_files_model_paths_are_found_beside_it_from_any_directory(tmp_path, monkeypatch):
    """clipvip convert --config DIR/retrieval.json failed outside DIR: clip_config "clip" meant DIR/clip."""
    folder = tmp_path / "DIR"
    _model_folder(folder / "clip")
    (folder / "model.pt").write_bytes(b"")
    config = folder / "retrieval.json"
    config.write_text(json.dumps({"clip_config": "clip", "clip_weights": "clip", "e2e_weights_path": "model.pt",
                                  "output_dir": "run"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = clipvip.load_config(str(config))
    assert cfg.clip_config == cfg.clip_weights == str(folder / "clip")
    assert cfg.e2e_weights_path == str(folder / "model.pt")
    assert cfg.output_dir == "run"  # an output is made, not found: relative to the current directory
    relative = clipvip.load_config("../DIR/retrieval.json")
    assert os.path.samefile(relative.clip_config, folder / "clip")
    # Typed on the command line, a path is the shell's: relative to the current directory.
    assert clipvip.load_config(str(config), ["--clip_config", "clip"]).clip_config == "clip"


def test_blob_mount_dir_is_looked_in_first_and_names_stay_names(tmp_path, monkeypatch):
    folder = tmp_path / "DIR"
    _model_folder(folder / "clip")
    blob = tmp_path / "blob"
    _model_folder(blob / "clip")
    config = folder / "c.json"
    config.write_text(json.dumps({"clip_config": "clip", "clip_weights": "openai/clip-vit-base-patch32",
                                  "e2e_weights_path": "ckpt/w.pt"}))
    monkeypatch.chdir(tmp_path)
    cfg = clipvip.load_config(str(config), ["--blob_mount_dir", str(blob)])
    assert cfg.clip_config == str(blob / "clip")
    assert cfg.clip_weights == "openai/clip-vit-base-patch32"  # found nowhere: a Hub id, as written
    assert cfg.e2e_weights_path == str(blob / "ckpt" / "w.pt")  # found nowhere: joined, as the original
    # The blob holds what the file names: a relative blob_mount_dir is joined once.
    (blob / "ckpt").mkdir()
    (blob / "ckpt" / "w.pt").write_bytes(b"")
    cfg = clipvip.load_config(str(config), ["--blob_mount_dir", "blob"])
    assert cfg.clip_config == os.path.join("blob", "clip") and cfg.e2e_weights_path == os.path.join("blob", "ckpt", "w.pt")
    assert clipvip.load_config(str(config)).clip_config == str(folder / "clip")  # no blob: beside the file
