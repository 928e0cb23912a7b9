"""The synthetic benchmark: layout, determinism, exact time-reversed twins, LMDB contents."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipvip.apps import synthetic
from clipvip.apps.synthetic import (COLOURS, DIRECTIONS, OPPOSITE, ClipSpec, generate,  # noqa: E402
                                    render_clip, draw_test_specs, draw_train_specs)
from clipvip.data.video import count_folder_frames, count_frames, load_frames  # noqa: E402

SIZE, FRAMES = 64, 16
KW = dict(size=SIZE, frames=FRAMES, n_pretrain_videos=2, clips_per_video=2, workers=1)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return generate(str(out / "a"), n_train=6, n_test=8, seed=3, **KW)


def test_layout_and_annotation_formats(data):
    train = _read_jsonl(data["train"])
    test = _read_jsonl(data["test"])
    assert len(train) == 6 and len(test) == 8
    for rec in train:
        assert isinstance(rec["text"], list) and len(rec["text"]) == 5
        assert len(set(rec["text"])) == 5 and all(isinstance(t, str) for t in rec["text"])
        # Every paraphrase names the colour and the shape.
        assert all(rec["attrs"]["colour"] in t and rec["attrs"]["shape"] in t for t in rec["text"])
    captions = [rec["text"] for rec in test]
    assert all(isinstance(c, str) for c in captions)
    assert len(set(captions)) == len(captions)
    for rec in train + test:
        path = os.path.join(data["videos"], rec["clip_id"] + ".mp4")
        assert os.path.isfile(path)
    n = count_frames(os.path.join(data["videos"], test[0]["clip_id"] + ".mp4"))
    assert n == FRAMES
    frames = load_frames(os.path.join(data["videos"], test[0]["clip_id"] + ".mp4"), [0])
    assert frames.shape == (1, SIZE, SIZE, 3)
    meta = json.load(open(data["meta"]))
    assert meta["seed"] == 3 and meta["frames"] == FRAMES


def test_twins_are_recorded_both_ways(data):
    test = {r["clip_id"]: r for r in _read_jsonl(data["test"])}
    twins = [r for r in test.values() if "twin" in r]
    assert len(twins) == 6  # round(8 * 0.7 / 2) = 3 pairs
    for rec in twins:
        other = test[rec["twin"]]
        assert other["twin"] == rec["clip_id"]
        a, b = rec["attrs"], other["attrs"]
        assert b["direction"] == OPPOSITE[a["direction"]]
        assert {k: v for k, v in a.items() if k != "direction"} == \
               {k: v for k, v in b.items() if k != "direction"}
    train = {r["clip_id"]: r for r in _read_jsonl(data["train"])}
    assert all(train[r["twin"]]["twin"] == cid for cid, r in train.items() if "twin" in r)


def test_twins_decode_as_time_reversals(data):
    test = _read_jsonl(data["test"])
    rec = next(r for r in test if "twin" in r)
    a = load_frames(os.path.join(data["videos"], rec["clip_id"] + ".mp4"), range(FRAMES)).numpy()
    b = load_frames(os.path.join(data["videos"], rec["twin"] + ".mp4"), range(FRAMES)).numpy()
    diff = np.abs(a.astype(np.int16) - b[::-1].astype(np.int16))
    assert diff.mean() < 2.0
    # ...and not merely the same clip: in forward order the twins differ clearly.
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() > 4 * diff.mean()


def test_twin_frames_are_exactly_reversed_before_encoding():
    for spec, twin_id in draw_test_specs(40, seed=0, twin_fraction=0.7):
        if twin_id is None or not spec.time_reversed:
            continue
        partner = next(s for s, _ in draw_test_specs(40, seed=0, twin_fraction=0.7) if s.clip_id == twin_id)
        a = render_clip(spec, SIZE, SIZE, FRAMES)
        b = render_clip(partner, SIZE, SIZE, FRAMES)
        assert np.array_equal(a, b[::-1])
        assert not np.array_equal(a, b)


def test_frame_folders(data):
    recs = _read_jsonl(data["test_frames"])
    assert [r["clip_id"] for r in recs] == [r["clip_id"] for r in _read_jsonl(data["test"])]
    for r in recs[:2]:
        assert r["num_frame"] == FRAMES
        assert count_folder_frames(data["frames"], r["clip_id"]) == FRAMES
        assert os.path.isfile(os.path.join(data["frames"], r["clip_id"], f"{r['clip_id']}_000.jpg"))


def test_pretrain_lmdbs_and_layout(data):
    import lmdb

    ids = [r["clip_id"] for r in _read_jsonl(data["pretrain_subtitles_jsonl"])]
    assert len(ids) == 4
    assert data["pretrain_subtitles_jsonl"] == data["pretrain_subtitles"] + ".jsonl"
    for clip_id in ids:
        video, k, ext = clip_id.split(".")
        assert len(video) == 11 and k.isdigit() and ext == "mp4"
        path = os.path.join(data["pretrain_videos"], clip_id.split(".")[0], clip_id)
        assert count_frames(path) == FRAMES
    # Opened the way the original opens them: readonly, key = clip_id utf-8, value utf-8 text.
    for name in ("pretrain_subtitles", "pretrain_captions"):
        env = lmdb.open(data[name], readonly=True, create=False)
        with env.begin() as txn:
            values = [txn.get(cid.encode()).decode() for cid in ids]
            assert txn.stat()["entries"] == len(ids)
        env.close()
        assert all(isinstance(v, str) and v for v in values)
    caps = json.load(open(data["pretrain_captions_json"]))
    assert sorted(c["image_id"] for c in caps) == sorted(ids)


def test_same_seed_same_data_other_seed_other_data(data, tmp_path):
    again = generate(str(tmp_path / "b"), n_train=6, n_test=8, seed=3, **KW)
    for key in ("train", "test", "test_frames", "pretrain_subtitles_jsonl", "pretrain_captions_json"):
        assert open(data[key], "rb").read() == open(again[key], "rb").read(), key
    for rec in _read_jsonl(data["test"])[:3]:
        p, q = (os.path.join(d["videos"], rec["clip_id"] + ".mp4") for d in (data, again))
        assert np.array_equal(load_frames(p, range(FRAMES)).numpy(), load_frames(q, range(FRAMES)).numpy())
    other = generate(str(tmp_path / "c"), n_train=6, n_test=8, seed=4, frame_folders=False, **KW)
    assert open(data["test"], "rb").read() != open(other["test"], "rb").read()


def test_specs_are_deterministic_per_seed():
    assert draw_test_specs(20, 5, 0.7) == draw_test_specs(20, 5, 0.7)
    assert draw_test_specs(20, 5, 0.7) != draw_test_specs(20, 6, 0.7)
    assert draw_train_specs(8, 5, 0.5) == draw_train_specs(8, 5, 0.5)


def test_unique_captions_up_to_every_combination():
    n_max = 2 * len(COLOURS) * len(synthetic.SHAPES) * len(synthetic.SIZES) * len(synthetic.SPEEDS) * 2
    specs = draw_test_specs(n_max, 0, 0.7)
    assert len({synthetic.caption(s) for s, _ in specs}) == n_max
    with pytest.raises(ValueError):
        draw_test_specs(n_max + 1, 0, 0.7)


def _centroid(frame, background):
    mask = np.abs(frame.astype(int) - background).sum(-1) > 30
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("seed", range(3))
def test_motion_is_large_and_shapes_stay_inside(seed):
    rng = np.random.default_rng(seed)
    for k in range(40):
        spec = synthetic._random_spec(rng, f"c{k}")
        frames = render_clip(spec, SIZE, SIZE, FRAMES)
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)
        assert (border == spec.background).all(), spec  # never touches the frame edge
        # Eight uniformly sampled frames: the centroid moves steadily the named way.
        idx = np.linspace(0, FRAMES - 1, 8).astype(int)
        cx, cy = np.array([_centroid(frames[i], spec.background) for i in idx]).T
        dx, dy = DIRECTIONS[spec.direction]
        along = cx * dx if dx else cy * dy
        steps = np.diff(along)
        assert (steps > 0.5).all(), (spec, steps)
        assert along[-1] - along[0] >= 0.25 * SIZE - 2 * 0.2 * SIZE * 0.5


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path / "cli"), "--n-train", "2", "--n-test", "2",
                           "--n-pretrain-videos", "1", "--clips-per-video", "1",
                           "--no-frame-folders", "--size", "32x48", "--frames", "4"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert len(_read_jsonl(paths["test"])) == 2
    frames = load_frames(os.path.join(paths["videos"], "test_00000.mp4"), [0])
    assert frames.shape == (1, 32, 48, 3)
    assert synthetic.main(["--out", str(tmp_path / "x"), "--n-test", "100000"]) == 2


def test_spec_is_a_plain_value():
    spec = ClipSpec("a", "red", "cross", "up", "small", "slowly", 20, 0.5, 0.5)
    assert spec.attrs == {"colour": "red", "shape": "cross", "direction": "up", "size": "small",
                          "speed": "slowly"}


def test_canonical_training_captions_leave_clips_and_subtitles_alone(data, tmp_path):
    """n_paraphrases=0: each training clip gets its one canonical caption; nothing else changes."""
    other = generate(str(tmp_path / "c"), n_train=6, n_test=8, seed=3, n_paraphrases=0, frame_folders=False, **KW)
    train, train0 = _read_jsonl(data["train"]), _read_jsonl(other["train"])
    assert [r["clip_id"] for r in train] == [r["clip_id"] for r in train0]
    for rec in train0:
        spec = ClipSpec(rec["clip_id"], background=0, across=0.0, along=0.0, **rec["attrs"])
        assert rec["text"] == [synthetic.caption(spec)]
    assert _read_jsonl(data["test"]) == _read_jsonl(other["test"])
    assert _lmdb_items(data["pretrain_subtitles"]) == _lmdb_items(other["pretrain_subtitles"])
    with pytest.raises(ValueError, match="n_paraphrases"):
        generate(str(tmp_path / "d"), n_train=2, n_test=2, n_paraphrases=-1, **KW)


def _lmdb_items(path):
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()
