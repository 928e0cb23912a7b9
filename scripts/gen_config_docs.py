#!/usr/bin/env python
"""Regenerate docs/config.md from the defaults and comments in src/clipvip/config.py.

    python scripts/gen_config_docs.py           # rewrite docs/config.md
    python scripts/gen_config_docs.py --check   # exit 1 if docs/config.md is not what it would write
"""
import os
import re
import sys
REPO=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # works from any current directory
DOC=os.path.join(REPO, "docs", "config.md")
src=open(os.path.join(REPO, "src", "clipvip", "config.py"), encoding="utf-8").read()
MARK={"DEFAULTS":"\nDEFAULTS: dict[str, Any] = {","VISION_ADDITIONAL_DEFAULTS":"\nVISION_ADDITIONAL_DEFAULTS = {","LOSS_DEFAULTS":"\nLOSS_DEFAULTS = {","DATASET_DEFAULTS":"\nDATASET_DEFAULTS = {"}
def table(name):
    start=src.index(MARK[name]); end=src.index("\n}\n", start)
    rows=[]
    for line in src[start:end].splitlines()[2:]:
        m=re.match(r'\s+"(\w+)": (.*?),\s*(?:# (.*))?$', line)
        # A "|" in a comment ("decord | pyav") would end the table cell.
        if m: rows.append((m.group(1), m.group(2), (m.group(3) or "").replace("|", "\\|")))
        elif line.strip().startswith("# ---"): rows.append(("__section__", line.strip("# -\n "), ""))
    return rows
out=["# Configuration keys", "",
 "A config is a JSON file (the official ones are in `configs/`); every key below may also be set on the",
 "command line as `--key value` (typed from the default), nested keys as `--parent.key value`. Keys a",
 "file leaves out take these defaults; an unknown key is an error naming the nearest known key.",
 "A list takes several words (`--input_res 224 224`; for `input_res` and `video_res` one number means a",
 "square), a path key takes `none` to unset it (`--e2e_weights_path none`).",
 "`python -m clipvip config --config FILE [--key value ...]` prints the resolved config.", "",
 "Paths: `txt`, `vis`, `vid_cap_path`, `shard_index` and local `shards` of every dataset, `e2e_weights_path` and",
 "`output_dir` are joined to `blob_mount_dir` (when set), as in the original; without it they are relative to the",
 "current directory. The model's paths (`clip_config`, `clip_weights`, `e2e_weights_path`) may also be names (a",
 "known architecture, a Hugging Face Hub id such as `openai/clip-vit-base-patch32`), so a relative one written in",
 "a config file is looked for under `blob_mount_dir` (when set), then in the config file's own folder, and the",
 "first place that has it wins: a config kept beside its model folder works from any directory. Where neither",
 "has it, `clip_config` and `clip_weights` are used as written (relative to the current directory, or a name)",
 "and `e2e_weights_path` is joined to `blob_mount_dir`. A path typed on the command line is relative to the",
 "current directory (data, output and `e2e_weights_path` joined to `blob_mount_dir` as from a file).",
 "`python -m clipvip config` shows where each path resolved to.",
 "`configs/demo/*.json` (as their `comment` key says) expect `--blob_mount_dir` to be the",
 "demo's output folder (`python -m clipvip demo --out OUT` writes `OUT/data` and `OUT/clip_config`) and",
 "`--clip_config`/`--clip_weights` to name `OUT/clip_config`; [first-run.md](first-run.md) runs them by hand,",
 "with a tiny random model and no downloaded weights.", ""]
out += ["## Top level", "", "| key | default | meaning |", "|---|---|---|"]
for k,v,c in table("DEFAULTS"):
    if k=="__section__": out.append(f"| **{v}** | | |"); continue
    if v in ("VISION_ADDITIONAL_DEFAULTS","LOSS_DEFAULTS"): v="see below"
    out.append(f"| `{k}` | `{v}` | {c} |")
for name,title in (("VISION_ADDITIONAL_DEFAULTS","`clip_vision_additional_config`"),("LOSS_DEFAULTS","`loss_config`"),("DATASET_DEFAULTS","A dataset entry (`train_datasets`, `val_datasets`, `inference_datasets`)")):
    out += ["", f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
    for k,v,c in table(name): out.append(f"| `{k}` | `{v}` | {c} |")
out += ["", "Differences from the original's defaults: `blob_mount_dir` defaults to empty (paths are used as",
        "given) instead of `/blob_mount`; `fp16` on a CPU trains in fp32 (use `bf16`).", ""]
text="\n".join(out)
if "--check" in sys.argv[1:]:
    current=open(DOC, encoding="utf-8").read() if os.path.isfile(DOC) else ""
    if current!=text:
        sys.exit("docs/config.md is out of date with src/clipvip/config.py: run python scripts/gen_config_docs.py")
else:
    open(DOC, "w", encoding="utf-8").write(text)
