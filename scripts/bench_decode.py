#!/usr/bin/env python
"""Data-loading throughput of one worker: decode + sample + transform, decord vs PyAV vs the ffmpeg CLI,
and the loader table (the same clips as loose files, LMDB text + files and tar shards, per backend).

The benchmark lives in the package (:mod:`clipvip.apps.data_bench`, also run by
``python -m clipvip bench --mode data``); this script keeps its original command line:

    python scripts/bench_decode.py --clips 8 --frames 90 --repeats 5 [--table loader.md]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8, help="distinct clips per pass")
    p.add_argument("--frames", type=int, default=90, help="frames per clip (90 = 15 s at 6 fps)")
    p.add_argument("--size", default="240x320", help="clip HxW")
    p.add_argument("--fps", type=int, default=6)
    p.add_argument("--num-frms", type=int, default=12, help="frames sampled per clip")
    p.add_argument("--input-res", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="reuse clips in this folder instead of a temporary one")
    p.add_argument("--layouts", nargs="*", default=["files", "lmdb", "shards"],
                   help="loader table layouts (none: no table)")
    p.add_argument("--backends", nargs="+", help="loader table backends (default: every one that loads)")
    p.add_argument("--no-real", action="store_true", help="loader table without the real sample clips")
    p.add_argument("--nvdec", action="store_true", help="loader table: torchcodec on the GPU too")
    p.add_argument("--table", help="write the loader table to this markdown file")
    args = p.parse_args(argv)

    from clipvip.apps.data_bench import run_data_bench

    report = run_data_bench(num_frms=args.num_frms, input_res=args.input_res, clips=args.clips, frames=args.frames,
                            size=args.size, fps=args.fps, repeats=args.repeats, folder=args.dir,
                            layouts=args.layouts, backends=args.backends, real=not args.no_real,
                            nvdec=args.nvdec, table=args.table)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
