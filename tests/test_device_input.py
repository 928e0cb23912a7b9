"""Frames leave the loader as uint8 and become model input where the model is (issue 25).

What the tests hold: the transform of a batch, on any device, equals the transform a worker ran on
each clip before (``frames_to_model_input`` on the CPU) within float rounding, on real footage
and for clips of mixed sizes; the training step on uint8 batches trains as on the same batches
made input beforehand (micro-batches, feature cache); the batches of a seed are the clips the
dataset gives for that seed, from loose files, LMDB and shards; PyAV decoding only the span the
sampled frames need gives the frames decoding from the start gives; the loader's settings; the
run's loader throughput.
"""
import itertools
import json
import os
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import clipvip
from clipvip.data.loader import DevicePrefetcher, LoaderSettings, LoaderStream, default_workers
from clipvip.data.pretrain_dataset import PretrainDataset
from clipvip.data.retrieval_dataset import ClipReader, VideoRetrievalDataset, collate_frames
from clipvip.data.transforms import VideoTransform, frames_to_model_input
from clipvip.data.video import _PyAVReader, resolve_backend, span_plan
from clipvip.distributed import local_world_size
from clipvip.engine.logger import Throughput
from clipvip.engine.step import model_inputs
from clipvip.errors import ConfigError

from conftest import write_distinct_clip

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = 1e-5  # float rounding of the transform on another device or batch shape


def _frames(n, h, w, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _per_clip(clips, transform):
    """What a worker computed before: each clip made input on its own, on the CPU."""
    return torch.stack([frames_to_model_input(c.cpu(), transform.input_res, transform.antialias) for c in clips])


# ---------------------------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("antialias", [False, True])
def test_a_batch_transformed_on_the_device_equals_each_clip_on_the_host_on_real_footage(real_videos, device,
                                                                                        antialias):
    reader = ClipReader(n_clips=1, num_frms=12, sample_rate=0, input_res=(224, 224), training=False, jitter=False,
                        backend=resolve_backend(None), antialias=antialias)
    paths = list(real_videos.values())
    clips = [reader.read_frames(path, random.Random(0))[0] for path in paths]  # (12, H_i, W_i, 3)
    expected = _per_clip(clips, reader.transform)  # (3, 12, 3, 224, 224)
    for path, x in zip(paths, expected):  # the float entry point (load_clip, the processor): the same function
        assert torch.equal(reader.read_video(path, random.Random(0))[0], x)
    mixed = collate_frames(clips)  # 1280x720, 640x272, 176x144: a list, one tensor per clip
    assert isinstance(mixed, list)
    got = reader.transform([c.to(device) for c in mixed])
    assert got.shape == (3, 12, 3, 224, 224) and got.device.type == device and got.dtype == torch.float32
    assert (got.cpu() - expected).abs().max().item() <= TOLERANCE
    # One size in the batch: one tensor, one call.
    same = collate_frames([clips[1], clips[1].flip(0)])
    assert isinstance(same, torch.Tensor) and same.shape == (2, 12, 272, 640, 3)
    got = reader.transform(same.to(device)).cpu()
    assert (got - _per_clip([clips[1], clips[1].flip(0)], reader.transform)).abs().max().item() <= TOLERANCE


def test_the_transform_keeps_leading_dimensions_and_passes_model_input_through():
    transform = VideoTransform((16, 12))
    video = _frames(2 * 3, 20, 30).view(2, 3, 20, 30, 3)  # (B, T, H, W, 3)
    out = transform(video)
    assert out.shape == (2, 3, 3, 16, 12)
    assert (out - _per_clip(list(video), transform)).abs().max().item() <= TOLERANCE
    image = _frames(4, 20, 30, seed=1)  # (B, H, W, 3): pretraining's middle frames
    assert transform(image).shape == (4, 3, 16, 12)
    assert transform(image[0]).shape == (3, 16, 12)  # one frame alone
    ready = torch.randn(2, 3, 3, 16, 12)  # model input already (batches built by hand, the benchmark)
    assert transform(ready) is ready
    # Mixed sizes: clips of one size together, results in list order.
    clips = [_frames(3, 20, 30, seed=2), _frames(3, 24, 24, seed=3), _frames(3, 20, 30, seed=4)]
    assert (transform(clips) - _per_clip(clips, transform)).abs().max().item() <= TOLERANCE
    with pytest.raises(ValueError, match="no frames"):
        transform([])
    with pytest.raises(TypeError):
        frames_to_model_input(torch.zeros(2, 4, 4, 3), (4, 4))


# ---------------------------------------------------------------------------------------------- the step
def _tiny_step(tmp_path, *overrides):
    from clipvip.engine.optim import OptimizerSettings
    from clipvip.engine.step import OptimizerStep, StepSettings, train_mode
    from clipvip.loss import LossSettings, build_loss
    from tiny_models import tiny_cfg, write_hf_clip

    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--learning_rate", "1e-3", "--warmup_ratio", "0", *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    settings = StepSettings.from_config(cfg)
    train_mode(model, settings)
    step = OptimizerStep(model, build_loss(LossSettings.from_config(cfg)), settings,
                         OptimizerSettings.from_config(cfg), "fp32", torch.device("cpu"), total_steps=4)
    return step, model


def _uint8_batches(sizes):
    """Micro-batches of 2 clips of 3 frames each, of the given (H, W) per clip, captions of 10 tokens."""
    from tiny_models import random_text

    batches = []
    for k, pair in enumerate(sizes):
        ids, mask = random_text(len(pair), 10, seed=k)
        clips = [_frames(3, h, w, seed=10 * k + i) for i, (h, w) in enumerate(pair)]
        batches.append({"video": collate_frames(clips), "text_input_ids": ids, "text_input_mask": mask})
    return batches


@pytest.mark.parametrize("feature_cache", [0, 1])
def test_the_step_trains_on_uint8_frames_as_on_the_same_frames_made_input_first(tmp_path, feature_cache):
    """Two micro-batches, one of them of mixed sizes, through the step's own transform, against the
    same batches transformed clip by clip beforehand (what the workers handed the step before)."""
    overrides = ["--gradient_accumulation_steps", "2", "--accum_feature_cache", str(feature_cache)]
    uint8_step, uint8_model = _tiny_step(tmp_path, *overrides)
    float_step, float_model = _tiny_step(tmp_path, *overrides)
    batches = _uint8_batches([[(40, 48), (40, 48)], [(40, 48), (24, 20)]])
    assert isinstance(batches[0]["video"], torch.Tensor) and isinstance(batches[1]["video"], list)
    transform = uint8_step.settings.transform
    assert transform.input_res == (32, 32)
    made_input = [{**b, "video": _per_clip(list(b["video"]), transform)} for b in batches]
    got = uint8_step(1, batches)
    expected = float_step(1, made_input)
    assert got.clips == expected.clips == 4
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    for (name, p), q in zip(uint8_model.named_parameters(), float_model.parameters()):
        assert (p - q).abs().max().item() <= 1e-5, name


def test_frames_reach_the_device_as_uint8_through_the_prefetcher():
    batches = _uint8_batches([[(40, 48), (40, 48)], [(40, 48), (24, 20)]])
    prefetcher = DevicePrefetcher(iter(batches), DEVICES[-1])
    for batch, original in zip(prefetcher, batches):
        video = batch["video"]
        tensors = video if isinstance(video, list) else [video]
        assert all(t.dtype == torch.uint8 and t.device.type == DEVICES[-1] for t in tensors)
        inputs = model_inputs(batch, torch.device(DEVICES[-1]), VideoTransform((32, 32)))
        assert inputs["video"].shape == (2, 3, 3, 32, 32) and inputs["video"].dtype == torch.float32
        expected = _per_clip(list(original["video"]), VideoTransform((32, 32)))
        assert (inputs["video"].cpu() - expected).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- a seed's batches
def _expected_from_items(dataset, pairs, key="video"):
    """The batch a worker built before: every item of the sampler's (index, seed) pairs, made input on its own."""
    items = [dataset[pair] for pair in pairs]
    return items, torch.stack([dataset.reader.transform(it[key]) for it in items])


def _first_batch_pairs(stream):
    return list(itertools.islice(iter(stream.sampler), stream.batch_size))


def test_a_seeds_batches_from_loose_files_are_its_clips(synthetic_data, make_cfg, tokenizer):
    cfg = make_cfg(train_batch_size=3, seed=11)
    entry = {"name": "t", "txt": synthetic_data["train"], "vis": synthetic_data["videos"]}
    dataset = VideoRetrievalDataset.from_config(cfg, entry, tokenizer, training=True)
    stream = LoaderStream(dataset, LoaderSettings.from_config(cfg), rank=0, world_size=1)
    pairs = _first_batch_pairs(stream)
    batch = next(stream)
    reference = VideoRetrievalDataset.from_config(cfg, entry, tokenizer, training=True)
    items, expected = _expected_from_items(reference, pairs)
    assert batch["indices"].tolist() == [i for i, _ in pairs]
    assert torch.equal(batch["text_input_ids"], reference.collator(items)["text_input_ids"])  # the same captions
    assert torch.equal(batch["video"], torch.stack([it["video"] for it in items]))  # the same uint8 frames
    got = model_inputs(batch, torch.device("cpu"), VideoTransform.from_config(cfg))["video"]
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_a_seeds_batches_from_lmdb_with_middle_frames_are_its_clips(synthetic_data, make_cfg, tokenizer):
    cfg = make_cfg(train_batch_size=2, seed=3, n_workers=2)
    entry = {"name": "hdvila", "vis_format": "videoframe", "txt": synthetic_data["pretrain_subtitles"],
             "vis": synthetic_data["pretrain_videos"], "vid_cap_path": synthetic_data["pretrain_captions"],
             "vid_txt": "subtitle"}
    dataset = PretrainDataset.from_config(cfg, entry, training=True, tokenizer=tokenizer)
    stream = LoaderStream(dataset, LoaderSettings.from_config(cfg), rank=0, world_size=1)
    pairs = _first_batch_pairs(stream)
    batch = next(stream)  # from a worker process
    assert batch["video"].dtype == batch["image"].dtype == torch.uint8 and batch["load_s"] > 0
    _, expected_video = _expected_from_items(dataset, pairs)
    _, expected_image = _expected_from_items(dataset, pairs, key="image")
    inputs = model_inputs(batch, torch.device("cpu"), VideoTransform.from_config(cfg))
    assert (inputs["video"] - expected_video).abs().max().item() <= TOLERANCE
    assert (inputs["image"] - expected_image).abs().max().item() <= TOLERANCE
    dataset.close()


def test_a_seeds_batches_from_shards_are_the_same_clips_every_time(synthetic_data, make_cfg, tokenizer, tmp_path):
    from clipvip.data.shards import ShardStream
    from shard_helpers import synthetic_samples, write_shards

    write_shards(str(tmp_path / "s"), synthetic_samples(synthetic_data)[:6], [3, 3])
    cfg = make_cfg(train_batch_size=2, seed=5)
    entry = {"name": "sh", "vis_format": "webdataset", "shards": str(tmp_path / "s" / "*.tar")}
    first, again = (next(ShardStream.from_config(cfg, entry, tokenizer, 0, 1)) for _ in range(2))
    assert first["video"].dtype == torch.uint8 and first["load_s"] > 0
    assert first["indices"].tolist() == again["indices"].tolist() and torch.equal(first["video"], again["video"])
    got = model_inputs(first, torch.device("cpu"), VideoTransform.from_config(cfg))["video"]
    assert (got - _per_clip(list(first["video"]), VideoTransform.from_config(cfg))).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- PyAV: the span
def test_span_plan_numbers_frames_by_timestamp_and_starts_at_a_usable_key_frame():
    # Decode order of two closed groups with B-frames: I0 P3 B1 B2 | I4 P7 B5 B6.
    pts, keys = [0, 3, 1, 2, 4, 7, 5, 6], [True, False, False, False, True, False, False, False]
    assert span_plan(pts, keys, [5, 6]) == (4, [5, 6])
    assert span_plan(pts, keys, [2, 5]) == (0, [2, 5])
    assert span_plan(pts, keys, [6, 7, 9]) == (4, [6, 7, 7])  # past the end: the last frame
    # An open group: B3 and B4 are shown before their key frame I5 and may refer to the group before.
    pts, keys = [0, 2, 1, 5, 3, 4, 6], [True, False, False, True, False, False, False]
    assert span_plan(pts, keys, [4, 6]) == (0, [4, 6])
    assert span_plan(pts, keys, [5, 6]) == (3, [5, 6])
    assert span_plan([0, 1, 1, 2], [True] * 4, [0]) is None  # timestamps cannot number the frames
    assert span_plan([0, None, 2], [True] * 3, [0]) is None


def _write(path, codec, frames, rate=6, options=None, pts=None, faststart=False):
    """``frames`` (uint8 [T, H, W, 3]) encoded with ``codec``; ``pts``: each frame's timestamp in 1/rate s;
    ``faststart``: the mp4 index first, so that a truncated copy still opens."""
    import av

    with av.open(path, "w", options={"movflags": "+faststart"} if faststart else {}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        stream.options = options or {}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def span_clips(tmp_path_factory):
    """Clips with B-frames and several key frames, in the codecs the span path decodes."""
    import av

    root = tmp_path_factory.mktemp("span")
    frames = write_distinct_clip(str(root / "source.mp4"), t=40, h=48, w=64)
    clips = {
        # x264 defaults (3 B-frames, b-pyramid) with a key frame every 8 and scene-cut ones.
        "h264": _write(str(root / "h264.mp4"), "libx264", frames, options={"g": "8", "threads": "1"}),
        # Variable frame rate: irregular timestamps, frame i is still the i-th shown.
        "h264_vfr": _write(str(root / "vfr.mp4"), "libx264", frames, rate=30, options={"g": "10", "threads": "1"},
                           pts=np.cumsum([0] + [1 + (i % 3) * 2 for i in range(39)]).tolist()),
        # Open groups: frames shown before a key frame refer to the group before it.
        "h264_open_gop": _write(str(root / "open.mp4"), "libx264", frames,
                                options={"x264-params": "keyint=8:min-keyint=8:open-gop=1:bframes=3", "threads": "1"}),
    }
    if "libx265" in av.codecs_available:
        clips["hevc"] = _write(str(root / "hevc.mp4"), "libx265", frames,
                               options={"x265-params": "keyint=8:bframes=3:log-level=error"})
    return clips


def _both_ways(path, indices):
    span = _PyAVReader(path)
    start = _PyAVReader(path)
    try:
        return span._read_span(indices), start._read_from_start(indices)
    finally:
        span.close()
        start.close()


@pytest.mark.parametrize("name", ["h264", "h264_vfr", "h264_open_gop", "hevc"])
def test_decoding_the_span_gives_the_frames_decoding_from_the_start_gives(span_clips, name):
    if name not in span_clips:
        pytest.skip("no libx265 in this PyAV build")
    path = span_clips[name]
    rng = random.Random(0)
    sets = [[0], [39], [5, 6, 7], [17, 30, 38], list(range(0, 40, 3)), [12, 45]] + \
        [sorted(rng.sample(range(40), 6)) for _ in range(6)]
    for indices in sets:
        span, start = _both_ways(path, indices)
        assert span is not None, f"{name}: the span path was not taken"
        assert all(np.array_equal(a, b) for a, b in zip(span, start)), (name, indices)
    # Late frames really start at a later key frame (the clip has several).
    reader = _PyAVReader(path)
    packets = reader._demuxed()
    plan = span_plan([p.pts for p in packets], [p.is_keyframe for p in packets], [33, 36])
    reader.close()
    assert plan is not None and plan[0] > 0


def test_the_span_equals_decoding_from_the_start_on_real_footage(real_videos):
    for path in real_videos.values():
        reader = _PyAVReader(path)
        n = len(reader)
        reader.close()
        for indices in ([0, n // 2, n - 1], sorted(random.Random(n).sample(range(n), 12)), [n - 3, n + 4]):
            span, start = _both_ways(path, indices)
            assert span is not None and all(np.array_equal(a, b) for a, b in zip(span, start)), (path, indices)


def test_other_codecs_and_damaged_files_are_decoded_from_the_start(tmp_path):
    frames = write_distinct_clip(str(tmp_path / "source.mp4"), t=12, h=48, w=64)
    mpeg4 = _write(str(tmp_path / "clip.avi"), "mpeg4", frames, options={"bf": "2"})  # AVI may pack B-frames
    span, start = _both_ways(mpeg4, [2, 7])
    assert span is None and len(start) == 2
    noise = _frames(12, 48, 64).numpy()  # frames that do not compress: the data lies mostly in the frames
    whole = _write(str(tmp_path / "faststart.mp4"), "libx264", noise, faststart=True)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    reader = _PyAVReader(str(cut))
    try:
        assert len(reader) == 12 and len(reader._demuxed()) < 12  # the header promises what the data lacks
        assert reader._read_span([0, 1]) is None
        first = reader._read_from_start([0, 1])  # in front of the damage: read, as decoding from the start did
    finally:
        reader.close()
    assert len(first) == 2


# ---------------------------------------------------------------------------------------------- loader settings
def test_workers_default_to_the_cpus_per_local_process_and_an_explicit_value_wins(make_cfg, monkeypatch):
    assert default_workers(16, 1) == 15 and default_workers(96, 8) == 11 and default_workers(2, 1) == 1
    assert default_workers(4, 8) == 1  # never none: a process without workers decodes in its own loop
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4 and local_world_size({}) == 1
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cpus = len(os.sched_getaffinity(0))
    assert clipvip.load_config(None, []).n_workers == -1
    settings = LoaderSettings.from_config(make_cfg(n_workers=-1, prefetch_factor=4, persistent_workers=0))
    assert settings.n_workers == max(cpus - 1, 1) and settings.workers_chosen
    assert settings.prefetch_factor == 4 and not settings.persistent_workers
    # The official configs name 8 workers: kept.
    official = clipvip.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "msrvtt_retrieval",
                                                "msrvtt_retrieval_vip_base_32.json"))
    assert LoaderSettings.from_config(official).n_workers == 8
    with pytest.raises(ConfigError, match="n_workers"):
        LoaderSettings.from_config(make_cfg(n_workers=-2))


def test_mixed_sets_divide_the_chosen_workers_among_them(make_cfg, monkeypatch):
    """Pretraining's sets keep their loaders side by side: -1's workers are split among them."""
    monkeypatch.setattr("clipvip.data.loader.default_workers", lambda: 15)
    chosen = LoaderSettings.from_config(make_cfg(n_workers=-1))
    assert [chosen.shared_by(k).n_workers for k in (1, 2, 3, 20)] == [15, 7, 5, 1]
    given = LoaderSettings.from_config(make_cfg(n_workers=6))
    assert given.shared_by(3).n_workers == 6  # a count the config gives is each set's


def test_chosen_workers_read_no_more_shards_than_there_are(synthetic_data, make_cfg, tokenizer, tmp_path, monkeypatch):
    from clipvip.data.shards import ShardStream
    from shard_helpers import synthetic_samples, write_shards

    write_shards(str(tmp_path / "s"), synthetic_samples(synthetic_data)[:6], [3, 3])
    entry = {"name": "sh", "vis_format": "webdataset", "shards": str(tmp_path / "s" / "*.tar")}
    monkeypatch.setattr("clipvip.data.loader.default_workers", lambda: 8)  # a machine with 9 cores a GPU
    stream = ShardStream.from_config(make_cfg(n_workers=-1, train_batch_size=1), entry, tokenizer, 0, 1)
    assert stream.loader.num_workers == stream.dataset.readers_per_rank == 2  # a reader needs a shard of its own
    with pytest.raises(ConfigError, match="2 shards for 3 readers"):  # an explicit value is taken as it is
        ShardStream.from_config(make_cfg(n_workers=3, train_batch_size=1), entry, tokenizer, 0, 1)


def test_throughput_says_whether_the_loader_or_the_step_is_the_wall(monkeypatch):
    clock = iter([110.0, 110.0])
    monkeypatch.setattr("clipvip.engine.logger.time.perf_counter", lambda: next(clock))
    rates = Throughput(workers=4, world_size=2, start=100.0)
    for _ in range(5):  # 5 steps of 8 clips; waited 1 s each; the workers took 3.2 s per batch
        rates.add(8, 1.0, 3.2)
    metrics = rates.metrics()  # at t = 110
    assert metrics["clips_per_s"] == pytest.approx(80 / 10)
    assert metrics["step_clips_per_s"] == pytest.approx(80 / 5)  # 5 of the 10 s were spent waiting
    assert metrics["loader_clips_per_s"] == pytest.approx(80 * 4 / 16)  # 4 workers at 2.5 clips/s each
    assert metrics["data_wait_s"] == pytest.approx(1.0)
    assert rates.steps == rates.clips == 0  # the next window starts empty


def test_the_run_logs_the_loaders_rate_beside_the_steps(tmp_path):
    from clipvip.distributed import DistEnv
    from clipvip.engine import Trainer, TrainerSettings
    from clipvip.engine.schedule import TrainPlan
    from clipvip.loss import LossSettings, build_loss
    from tiny_models import ListStream, tiny_cfg, write_hf_clip

    folder = str(tmp_path / "clip")
    write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2", "--log_interval", "1",
                   "--num_train_epochs", "2")
    batches = [{**b, "load_s": 0.5} for b in _uint8_batches([[(40, 48), (40, 48)], [(36, 36), (36, 36)]])]
    torch.manual_seed(0)
    trainer = Trainer(TrainerSettings.from_config(cfg), clipvip.build_model(cfg),
                      build_loss(LossSettings.from_config(cfg)), ListStream(batches),
                      TrainPlan.from_config(cfg, num_examples=4, world_size=1), evaluate=lambda m: {},
                      env=DistEnv(), precision="fp32")
    trainer.fit()
    with open(os.path.join(str(tmp_path / "run"), "log", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if '"loss"' in line]
    assert len(lines) == 4
    for line in lines:
        assert line["loader_clips_per_s"] == pytest.approx(2 / 0.5)  # one loading process, 0.5 s a batch of 2
        assert line["step_clips_per_s"] >= line["clips_per_s"] > 0 and line["data_wait_s"] >= 0
