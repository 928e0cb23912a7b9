"""The search subcommands of ``clipvip``: encode, index, search, serve (parse -> build -> run).

Options a subcommand does not know are config overrides (``--test_num_frms 8``,
``--video_backend pyav``), applied to the config file or to the config stored in the index.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from clipvip.errors import DataError
from clipvip.apps.search.encode import (VIDEO_EXTENSIONS, Encoder, count_videos_in_subfolders, encode_to_folder,
                                       list_videos, read_sentences, read_video_list, resolve_config)
from clipvip.apps.search.engine import SearchEngine, index_videos
from clipvip.apps.search.errors import EmptyQueryError, SearchError
from clipvip.apps.search.index import IndexSpec
from clipvip.apps.search.server import listen, serve

MODEL_HELP = "config overrides (--key value, as in clipvip config) may follow the options"


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"clipvip {name}", description=description, epilog=MODEL_HELP,
                                   allow_abbrev=False)


def _model_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="the model's config file (JSON)")
    p.add_argument("--weights", help="checkpoint (.pt / .safetensors); default: the config's e2e_weights_path")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _parse(p: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    args, rest = p.parse_known_args(list(argv))
    # Unknown words must look like config overrides; anything else is a typo argparse should name.
    if rest and not rest[0].startswith("--"):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


# ---------------------------------------------------------------------------------------------
def encode_main(argv: Sequence[str]) -> int:
    p = _parser("encode", "Encode videos (or sentences) into unit feature vectors: OUT/features.npy + "
                          "OUT/ids.txt, written in chunks; rerunning resumes.")
    _model_options(p, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", metavar="DIR", help="every video file directly in DIR (id = file stem); "
                                                      "with --recursive also those in its subfolders")
    src.add_argument("--video-list", metavar="FILE", help="video paths, one per line (id = file stem)")
    src.add_argument("--texts", metavar="FILE", help="sentences, one per line (id = line number)")
    p.add_argument("--recursive", action="store_true", help=RECURSIVE_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--batch-size", type=int, help="default: the config's test_batch_size")
    p.add_argument("--workers", type=int, default=2, help="video decoding processes (default 2; 0: in-process)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk file (the unit of resuming)")
    args, overrides = _parse(p, argv)

    videos = sentences = None
    found = ""
    if args.videos:
        videos, found = _find_videos(args.videos, args.recursive)
    elif args.video_list:
        videos = read_video_list(args.video_list)
    else:
        sentences = read_sentences(args.texts)
    if not (videos or sentences):
        raise DataError("nothing to encode: no video files or sentences found")
    encoder = Encoder(resolve_config(args.config, args.weights, overrides), args.device)
    summary = encode_to_folder(encoder, args.out, videos=videos, sentences=sentences, batch_size=args.batch_size,
                               workers=args.workers, chunk_size=args.chunk_size)
    print(f"{found}encoded {summary.encoded}, already in {args.out}: {summary.already}, "
          f"unreadable: {len(summary.failed)}")
    _list_skipped(summary.failed, f"{args.out}/failed.tsv")
    return 0


RECURSIVE_HELP = ("also the videos in DIR's subfolders, at any depth (id = the path below DIR without the "
                  "extension: trip/cat_042)")


def _find_videos(folder: str, recursive: bool) -> tuple[list, str]:
    """The videos of ``--videos DIR`` and what was found, for the summary ("found 7 video files in
    DIR (3 more in its subfolders: --recursive takes them); "); none at all is an error, before any
    model is loaded."""
    videos = list_videos(folder, recursive=recursive)
    nested = 0 if recursive else count_videos_in_subfolders(folder)
    below = f" ({nested} more in its subfolders: --recursive takes them)" if nested else ""
    if not videos and nested:
        raise DataError(f"no video files directly in {folder}, {nested} in its subfolders: pass --recursive")
    if not videos:
        raise DataError(f"no video files in {folder} (looked for {' '.join(VIDEO_EXTENSIONS)})")
    where = f"{folder} and its subfolders" if recursive else folder
    return videos, f"found {len(videos)} video file{'' if len(videos) == 1 else 's'} in {where}{below}; "


def _list_skipped(failed, where: str) -> None:
    if failed:
        print(f"{len(failed)} unreadable videos skipped (listed in {where}):", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
def index_main(argv: Sequence[str]) -> int:
    p = _parser("index", "Encode every video in DIR and write a FAISS index with a SQLite sidecar "
                         "(see docs/search.md).")
    _model_options(p, required=False)
    p.add_argument("--videos", required=True, metavar="DIR",
                   help="folder of videos (id = file stem); subfolders only with --recursive")
    p.add_argument("--recursive", action="store_true", help=RECURSIVE_HELP)
    p.add_argument("--out", required=True, metavar="IDX", help="index folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--add", action="store_true",
                      help="append the videos of DIR not yet in IDX (model and config from IDX by default)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing index")
    p.add_argument("--index-type", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact (default); ivf: IVF-flat; hnsw: HNSW graph (approximate, for millions)")
    p.add_argument("--nlist", type=int, default=0, help="ivf: number of lists (default 4*sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: lists searched per query (default 16)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per vector (default 32)")
    p.add_argument("--ef-construction", type=int, default=200, help="hnsw: build-time candidates (default 200)")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: search-time candidates (default 128)")
    p.add_argument("--batch-size", type=int, help="default: the config's test_batch_size")
    p.add_argument("--workers", type=int, default=2, help="video decoding processes (default 2; 0: in-process)")
    args, overrides = _parse(p, argv)

    spec = IndexSpec(kind=args.index_type, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                     ef_construction=args.ef_construction, ef_search=args.ef_search)
    videos, found = _find_videos(args.videos, args.recursive)
    summary = index_videos(args.out, videos, config=args.config, weights=args.weights,
                           overrides=overrides, add=args.add, overwrite=args.overwrite, spec=spec,
                           batch_size=args.batch_size, workers=args.workers, device=args.device)
    print(f"{found}indexed {summary.added} new videos ({summary.already} already there, {len(summary.skipped)} "
          f"unreadable); {args.out} holds {summary.total}")
    _list_skipped(summary.skipped, f"{args.out}/skipped.tsv")
    return 0


# ---------------------------------------------------------------------------------------------
def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="IDX", help="index folder written by clipvip index")
    p.add_argument("--config", help="override the config stored in the index")
    p.add_argument("--weights", help="override the weights stored in the index (same model, moved file)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default: as built)")
    p.add_argument("--ef-search", type=int, help="hnsw: search-time candidates (default: as built)")


def _open_engine(args, overrides):
    return SearchEngine.open(args.index, config=args.config, weights=args.weights, overrides=overrides,
                             device=args.device, nprobe=args.nprobe, ef_search=args.ef_search)


def search_main(argv: Sequence[str]) -> int:
    p = _parser("search", "Search an index with a sentence, a file of sentences, or a video.")
    _engine_options(p)
    p.add_argument("query", nargs="?", help="what the clip shows, in words")
    p.add_argument("--queries", metavar="FILE", help="one query per line; one JSON line of results per query")
    p.add_argument("--like", metavar="VIDEO", help="videos similar to VIDEO (a file, or the id of an indexed video)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true",
                   help="JSON lines (UTF-8): {query, results: [{id, path, score}]}, and truncated: {tokens, "
                        "max_txt_len, read} for a query longer than the model reads")
    args, overrides = _parse(p, argv)

    given = [x is not None for x in (args.query, args.queries, args.like)]
    if sum(given) != 1:
        raise SearchError("give exactly one of: a query, --queries FILE, --like VIDEO")
    if args.query is not None and not args.query.strip():
        raise EmptyQueryError("empty query: describe the video you are looking for in a few words")
    queries = None
    if args.queries is not None:
        queries = read_sentences(args.queries)
        if not queries:
            raise EmptyQueryError(f"{args.queries} holds no query")

    engine = _open_engine(args, overrides)  # the model is loaded once, for every query
    try:
        if args.like is not None:
            blocks = [("like", args.like, engine.search_like(args.like, args.k), None)]
        else:
            texts = queries if queries is not None else [args.query]
            blocks = [("query", q, hits, cut) for q, hits, cut in
                      zip(texts, engine.search_texts(texts, args.k), engine.encoder.cut_texts(texts))]
    finally:
        engine.close()
    json_out = args.json or queries is not None
    for key, value, hits, cut in blocks:
        if cut:
            print(f"warning: the query is {cut['tokens']} tokens long, the model reads {cut['max_txt_len']} "
                  f"(max_txt_len): \"{cut['read']}\"", file=sys.stderr)
        if json_out:
            _print_utf8(json.dumps({key: value, "results": hits, **({"truncated": cut} if cut else {})},
                                   ensure_ascii=False))
        else:
            print(f"# {key}: {value}")
            for rank, hit in enumerate(hits, start=1):
                print(f"{rank:3d}  {hit['score']:.4f}  {hit['id']}  {hit['path']}")
    return 0


def _print_utf8(line: str) -> None:
    """``line`` on stdout as UTF-8 (JSON's own encoding) whatever the locale's encoding."""
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        print(line)
        return
    sys.stdout.flush()
    out.write(line.encode("utf-8") + b"\n")
    out.flush()


# ---------------------------------------------------------------------------------------------
def serve_main(argv: Sequence[str]) -> int:
    p = _parser("serve", "Serve a search page and a JSON API (/api/search?q=...&k=...) over an index.")
    _engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    args, overrides = _parse(p, argv)

    # The socket first: a busy or impossible port is an error in milliseconds, not after the
    # model has loaded; requests that come meanwhile wait in the listen backlog.
    server = listen(args.host, args.port)
    try:
        engine = _open_engine(args, overrides)
    except BaseException:
        server.server_close()
        raise
    try:
        serve(engine, server=server)  # closes the server
    finally:
        engine.close()
    return 0


COMMANDS = {"encode": encode_main, "index": index_main, "search": search_main, "serve": serve_main}
