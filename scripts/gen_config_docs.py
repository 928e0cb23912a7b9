#!/usr/bin/env python
"""Regenerate docs/config.md from the defaults and comments in src/clipvip/config.py."""
import re
src=open('src/clipvip/config.py').read()
MARK={"DEFAULTS":"\nDEFAULTS: dict[str, Any] = {","VISION_ADDITIONAL_DEFAULTS":"\nVISION_ADDITIONAL_DEFAULTS = {","LOSS_DEFAULTS":"\nLOSS_DEFAULTS = {","DATASET_DEFAULTS":"\nDATASET_DEFAULTS = {"}
def table(name):
    start=src.index(MARK[name]); end=src.index("\n}\n", start)
    rows=[]
    for line in src[start:end].splitlines()[2:]:
        m=re.match(r'\s+"(\w+)": (.*?),\s*(?:# (.*))?$', line)
        if m: rows.append((m.group(1), m.group(2), m.group(3) or ""))
        elif line.strip().startswith("# ---"): rows.append(("__section__", line.strip("# -\n "), ""))
    return rows
out=["# Configuration keys", "",
 "A config is a JSON file (the official ones are in `configs/`); every key below may also be set on the",
 "command line as `--key value` (typed from the default), nested keys as `--parent.key value`. Keys a",
 "file leaves out take these defaults; an unknown key is an error naming the nearest known key.",
 "`python -m clipvip config --config FILE [--key value ...]` prints the resolved config.", ""]
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
open('docs/config.md','w').write("\n".join(out))
