"""Data: video decoding, frame sampling, transforms, synthetic benchmark (and datasets)."""
from clipvip.data.sampling import middle_frame_index, sample_frame_indices
from clipvip.data.transforms import CLIP_MEAN, CLIP_STD, center_crop, frames_to_model_input, normalize, resize
from clipvip.data.video import (
    VideoBytes,
    VideoDecodeError,
    available_backends,
    count_folder_frames,
    count_frames,
    load_frame_folder,
    load_frames,
    load_sampled_frames,
    probe_duration,
    resolve_backend,
)
from clipvip.data.annotations import (
    ANNOTATION_RULES,
    AnnotationRule,
    ClipRecord,
    DatasetEntry,
    load_annotations,
    read_records,
    select_rule,
)
from clipvip.data.loader import (
    ContiguousShardSampler,
    LoaderSettings,
    LoaderStream,
    MixedStream,
    ResumableSampler,
    build_eval_loader,
)
from clipvip.data.pretrain_dataset import VID_TXT_MODES, PretrainCollator, PretrainDataset
from clipvip.data.retrieval_dataset import (
    ClipReader,
    DatasetSettings,
    RetrievalCollator,
    Sentences,
    TextOnlyView,
    VideoFiles,
    VideoOnlyView,
    VideoRetrievalDataset,
    scan_readable,
)
