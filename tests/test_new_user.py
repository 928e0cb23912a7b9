"""What a new user meets first (issue 17): help texts, one-line errors that name the way out, a
first run without downloaded weights. Each test is one defect a user reported."""
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import clipvip
from clipvip.apps.cli import run_main
from clipvip.config import DEFAULTS, NESTED_DEFAULTS
from clipvip.errors import CheckpointError, ConfigError, DataError
from tiny_models import tiny_cfg, write_hf_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """The tests' tiny HF CLIP: 32x32 frames, patch 8, 16 text positions."""
    folder = str(tmp_path_factory.mktemp("hf") / "clip")
    write_hf_clip(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Item 3: max_txt_len above the text positions is a config error before any data work
# ---------------------------------------------------------------------------------------------
def test_max_txt_len_above_text_positions_names_key_value_and_limit(clip_folder):
    with pytest.raises(ConfigError, match=r"max_txt_len 20 is more than the 16 text positions .*--max_txt_len 16"):
        clipvip.build_model(tiny_cfg(clip_folder, "--max_txt_len", "20"))
    # A known architecture: refused from the config alone, before a B/32 is built.
    with pytest.raises(ConfigError, match=r"max_txt_len 100 is more than the 77 text positions"):
        clipvip.build_model(clipvip.load_config(None, ["--max_txt_len", "100"]))
    clipvip.build_model(tiny_cfg(clip_folder, "--max_txt_len", "16"))  # the limit itself is fine


def test_retrieval_app_refuses_long_captions_before_reading_data(tmp_path, clip_folder, capsys):
    """The user's report: the error came after every video was encoded. Now it comes first: the
    annotation file does not even exist, and the message is still about max_txt_len."""
    from clipvip.apps import retrieval

    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "clip_config": clip_folder, "clip_weights": clip_folder, "input_res": 32,
        "inference_datasets": [{"name": "t", "txt": str(tmp_path / "missing.jsonl"), "vis": str(tmp_path)}]}))
    code = run_main(retrieval.main, ["--config", str(config), "--max_txt_len", "100",
                                     "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "max_txt_len 100" in err and "16 text positions" in err, err


def test_input_res_that_does_not_fit_the_clip_config_is_a_config_error(clip_folder):
    with pytest.raises(ConfigError, match=r"input_res \[64, 64\] does not match .* 32x32 .*--input_res 32"):
        clipvip.build_model(tiny_cfg(clip_folder, "--input_res", "64"))


# ---------------------------------------------------------------------------------------------
# Item 4: one number is a square size, from the command line and from a file
# ---------------------------------------------------------------------------------------------
def test_single_number_resolution_means_square(tmp_path):
    from clipvip.data.retrieval_dataset import ClipReader

    cfg = clipvip.load_config(None, ["--input_res", "224", "--video_res", "96"])
    assert cfg.input_res == [224, 224] and cfg.video_res == [96, 96]
    assert ClipReader.from_config(cfg, training=False).input_res == (224, 224)  # `clipvip index` unpacked this
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"input_res": 64, "video_res": [120]}))
    cfg = clipvip.load_config(str(path))
    assert cfg.input_res == [64, 64] and cfg.video_res == [120, 120]
    assert clipvip.load_config(None, ["--input_res", "32", "48"]).input_res == [32, 48]


@pytest.mark.parametrize("words", [["0"], ["1", "2", "3"], ["-4", "4"]])
def test_bad_resolutions_are_one_line_errors(words):
    with pytest.raises(ConfigError, match=r"--input_res should be one positive integer \(a square\) or two"):
        clipvip.load_config(None, ["--input_res", *words])


def test_bad_resolution_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"video_res": [240, 320, 3]}))
    with pytest.raises(ConfigError, match=r"c\.json: video_res should be"):
        clipvip.load_config(str(path))


# ---------------------------------------------------------------------------------------------
# Item 5: a model without weights; the errors name the way out; the docs show a first run
# ---------------------------------------------------------------------------------------------
def test_missing_weights_errors_name_the_way_out(clip_folder):
    cfg = tiny_cfg(clip_folder, "--clip_weights", "openai/not-downloaded-model")
    with pytest.raises(CheckpointError, match=r"--clip_weights none for random weights"):
        clipvip.build_model(cfg)
    cfg = tiny_cfg(clip_folder, "--e2e_weights_path", "path/to/CLIP-ViP-B/32/checkpoint")
    with pytest.raises(CheckpointError, match=r"not found: .*--e2e_weights_path none to start from clip_weights"):
        clipvip.build_model(cfg)


def test_no_weights_at_all_builds_a_random_model(clip_folder, caplog):
    cfg = tiny_cfg(clip_folder, "--e2e_weights_path", "none", "--clip_weights", "none")
    with caplog.at_level("INFO", logger="clipvip"):
        model = clipvip.build_model(cfg)
    assert "randomly initialised" in caplog.text
    assert model.clipmodel.text_model.embeddings.position_embedding.weight.shape[0] == 16


def test_first_run_doc_tiny_config_builds(tmp_path):
    """docs/first-run.md's CLIPConfig block, run as written, gives a folder the demo config accepts."""
    with open(os.path.join(REPO, "docs", "first-run.md")) as f:
        doc = f.read()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    folder = str(tmp_path / "clip_config")
    exec(compile(code.replace('"first_run/clip_config"', repr(folder)), "first-run.md", "exec"), {})
    cfg = clipvip.load_config(os.path.join(REPO, "configs", "demo", "vip.json"),
                              ["--clip_config", folder, "--clip_weights", "none", "--input_res", "32"])
    model = clipvip.build_model(cfg).eval()
    with torch.no_grad():
        video = model.encode_video(torch.randn(2, cfg.test_num_frms, 3, 32, 32))
    assert video.shape == (2, 64)
    for needle in ("python -m clipvip synthetic", "src/clipvip/apps/demo.py", "--clip_weights none",
                   "relative to the demo's output folder"):
        assert needle in doc


def test_synthetic_help_shows_defaults_and_what_it_writes(capsys):
    from clipvip.apps import synthetic

    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    out = re.sub(r"[ \t]+", " ", capsys.readouterr().out.replace("\n ", " "))
    assert "(default: 200)" in out and "(default: 0)" in out  # --n-train, --seed
    assert "DIR/train.jsonl" in out and "DIR/videos/<clip_id>.mp4" in out
    assert "(default: None)" not in out and ":func:" not in out


# ---------------------------------------------------------------------------------------------
# Item 6: the apps' --help, and --config is required
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["retrieval", "pretrain"])
def test_app_help_lists_options_overrides_and_docs(module, capsys):
    import importlib

    app = importlib.import_module(f"clipvip.apps.{module}")
    assert run_main(app.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "``" not in out and ":mod:" not in out
    for needle in ("--config FILE", "--blob_mount_dir", "--key value", "docs/config.md", "python -m clipvip config"):
        assert needle in out, needle
    # Every option the help names is a real key: the text cannot drift from config.py unnoticed.
    for key in set(re.findall(r"--([a-z_][a-z0-9_.]*)", out)) - {"help", "key", "nproc_per_node", "nnodes"}:
        top, _, sub = key.partition(".")
        assert top in DEFAULTS and (not sub or sub in NESTED_DEFAULTS[top]), key


@pytest.mark.parametrize("module", ["retrieval", "pretrain"])
def test_app_without_config_says_it_is_required(module, tmp_path, capsys):
    import importlib

    app = importlib.import_module(f"clipvip.apps.{module}")
    out = tmp_path / "never-made"
    assert run_main(app.main, ["--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config is required") and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run folder (or a model) was made


def test_retrieval_with_nothing_to_evaluate_stops_before_building(tmp_path, capsys, monkeypatch):
    from clipvip.apps import retrieval
    from clipvip.apps import runner

    monkeypatch.setattr(runner, "start", lambda cfg: pytest.fail("the model was built"))
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert run_main(retrieval.main, ["--config", str(config)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Item 7: checkpoint errors
# ---------------------------------------------------------------------------------------------
def test_text_file_is_not_a_checkpoint(tmp_path):
    from clipvip.model import read_state_dict

    path = tmp_path / "notes.pt"
    path.write_text("evaluation notes: R@1 50.1\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a checkpoint .*a text file beginning 'evaluation"):
        read_state_dict(str(path))
    lfs = tmp_path / "lfs.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        read_state_dict(str(lfs))


def test_safetensors_content_is_read_whatever_the_suffix(tmp_path):
    from safetensors.torch import save_file

    from clipvip.model import read_state_dict

    path = str(tmp_path / "weights.pt")
    save_file({"w": torch.arange(3.0)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))


def test_directory_given_as_checkpoint_suggests_the_files_inside(tmp_path, clip_folder):
    from clipvip.model import read_state_dict

    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    for name in ("model_step_10.pt", "model_best.pt", "train_state.pt"):
        torch.save({"w": torch.zeros(1)}, str(run / "ckpt" / name))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(str(run))
    message = str(info.value)
    assert message.startswith(f"{run} is a directory - did you mean {run / 'ckpt' / 'model_best.pt'}?")
    assert "model_step_10.pt" in message and "train_state.pt" not in message  # not model weights
    with pytest.raises(CheckpointError, match=r"is a directory - a Hugging Face model folder: pass it as --clip_weights"):
        read_state_dict(clip_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is a directory with no \.pt"):
        read_state_dict(str(tmp_path / "empty"))


def test_mismatched_checkpoint_is_refused_before_anything_loads(tmp_path, clip_folder):
    """B/16 into B/32, in small: a patch-4 checkpoint into the patch-8 model of the config."""
    from clipvip.model import save_checkpoint

    other = str(tmp_path / "patch4")
    write_hf_clip(other, patch_size=4)
    path = str(tmp_path / "patch4.pt")
    save_checkpoint(clipvip.build_model(tiny_cfg(other)), path)
    cfg = tiny_cfg(clip_folder, "--clip_weights", "none")
    torch.manual_seed(0)
    fresh = {k: v.clone() for k, v in clipvip.build_model(cfg).state_dict().items()}
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    with pytest.raises(CheckpointError) as info:
        clipvip.model.load_checkpoint(model, path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not match the model built from the config "
                              "(the checkpoint has patch size 4, the config 8)")
    assert "nothing was loaded" in message and "loaded 0" not in message
    assert not re.search(r"\bloaded \d+ tensors", message)
    assert "patch_embedding.weight: (32, 3, 4, 4) vs (32, 3, 8, 8)" in message
    # Refused means untouched: the tensors that did match were not copied in either.
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Item 10: command-line edges
# ---------------------------------------------------------------------------------------------
def test_unknown_command_is_named(capsys):
    from clipvip.apps.main import main

    assert run_main(main, ["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and len(err.strip().splitlines()) == 1
    assert run_main(main, ["serach"]) == 2
    assert "did you mean 'search'?" in capsys.readouterr().err


def test_version(capsys):
    from clipvip.apps.main import main

    assert run_main(main, ["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"clipvip {clipvip.__version__} (torch ")


def test_bench_help_names_the_command_and_only_real_defaults(monkeypatch):
    from clipvip.apps.bench import build_parser

    monkeypatch.setattr(sys, "argv", ["/venv/bin/clipvip", "bench", "--help"])
    text = re.sub(r"\s+", " ", build_parser().format_help())  # argparse wraps to the terminal
    assert text.startswith("usage: clipvip bench ") and "``" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 224)" in text and "clipvip bench --mode train" in text
    monkeypatch.setattr(sys, "argv", [os.path.join(REPO, "src", "clipvip", "__main__.py"), "bench", "--help"])
    assert build_parser().format_help().startswith("usage: python -m clipvip bench ")


def test_jsonl_record_without_closing_brace_names_line_and_problem(tmp_path):
    from clipvip.data.annotations import read_records

    path = tmp_path / "ann.jsonl"
    path.write_text('{"clip_id": "a", "text": "x"}\n{"clip_id": "b", "text": "y"\n{"clip_id": "c", "text": "z"}\n')
    with pytest.raises(DataError) as info:
        read_records(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: malformed JSON") and "missing closing '}'" in message
    assert "column 1" not in message
    path.write_text('{"clip_id": "a" "text": "x"}\n')
    with pytest.raises(DataError, match=r"ann\.jsonl:1: malformed JSON at column 17: Expecting ',' delimiter"):
        read_records(str(path))


def test_make_test_fast_has_a_recipe_over_existing_files():
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    recipe = re.search(r"^test-fast:.*\n\t(.+)$", makefile, re.M)
    assert recipe and "pytest" in recipe.group(1)
    skipped = re.search(r"^SLOW_TESTS := ((?:.*\\\n)*.*)$", makefile, re.M).group(1).replace("\\\n", " ").split()
    assert skipped and all(os.path.isfile(os.path.join(REPO, "tests", name)) for name in skipped)
    assert "test_new_user.py" not in skipped


def test_config_docs_are_current():
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Issue 26 item 7: a config beside its model folder works from another directory
# ---------------------------------------------------------------------------------------------
def test_convert_with_a_config_in_another_folder(tmp_path, monkeypatch, capsys):
    """``clipvip convert --config DIR/retrieval.json`` failed outside DIR: its clip_config "clip"
    was looked for in the current directory instead of beside the config (docs/config.md, Paths)."""
    from clipvip.apps.main import main

    folder = tmp_path / "DIR"
    write_hf_clip(str(folder / "clip"), vocab_size=49408)
    cfg = tiny_cfg(str(folder / "clip"))
    weights = str(folder / "model.pt")
    clipvip.model.save_checkpoint(clipvip.build_model(cfg), weights)
    (folder / "retrieval.json").write_text(json.dumps({
        "clip_config": "clip", "clip_weights": "clip", "input_res": 32, "max_txt_len": 16,
        "clip_vision_additional_config": dict(cfg.clip_vision_additional_config)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = run_main(main, ["convert", "--config", "../DIR/retrieval.json", "--weights", weights, "--out", "hf"])
    assert code == 0, capsys.readouterr().err
    assert (elsewhere / "hf" / "model.safetensors").is_file()
