"""The README's five lines of Python run as written (on a tiny model, config and clip)."""
import json
import os
import re


import clipvip
from tiny_models import tiny_cfg, write_hf_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Encode videos and sentences"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, capsys):
    from clipvip.apps import synthetic

    code = readme_snippet()
    assert len(code.strip().splitlines()) == 5
    paths = synthetic.generate(str(tmp_path / "data"), n_train=1, n_test=2, seed=0, size=64, frames=8,
                               n_pretrain_videos=1, clips_per_video=1, frame_folders=False, workers=1)
    clip_id = json.loads(open(paths["test"]).readline())["clip_id"]
    folder = str(tmp_path / "clip")
    write_hf_clip(folder, vocab_size=49408, max_positions=32)
    cfg = tiny_cfg(folder, "--test_num_frms", "4", "--max_txt_len", "16")
    checkpoint = str(tmp_path / "released.pt")
    clipvip.model.save_checkpoint(clipvip.build_model(cfg), checkpoint)  # the released layout
    config = str(tmp_path / "config.json")
    clipvip.save_config(cfg, str(tmp_path))
    code = (code.replace("configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json", config)
            .replace("pretrain_clipvip_base_32.pt", checkpoint)
            .replace("video7010.mp4", os.path.join(paths["videos"], f"{clip_id}.mp4")))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    similarity = float(re.search(r"tensor\(\[\[(-?[0-9.e-]+)\]\]\)", printed).group(1))
    assert -1.0 <= similarity <= 1.0


def test_readme_says_to_activate_the_venv_where_make_is_introduced():
    """``make`` installs into .venv; the README's ``python -m clipvip`` commands need it active (issue 26)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    setup = text[text.index("## Set up"):text.index("## Demo")]
    assert "make test" in setup and "source .venv/bin/activate" in setup
