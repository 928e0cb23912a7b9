#!/usr/bin/env bash
# Fine-tune or evaluate text-to-video retrieval with `accelerate launch` on one node.
#
#   scripts/run_retrieval.sh CONFIG [--key value ...]
#   scripts/run_retrieval.sh configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \
#       --blob_mount_dir /data --e2e_weights_path /data/pretrain_clipvip_base_32.pt --is_train
#
# NUM_PROCESSES (default: the number of visible GPUs, or 1) processes; ACCELERATE_CONFIG, if set,
# is passed as --config_file (from `accelerate config`). Several nodes: use torchrun (README).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--key value ...]}
shift
PYTHON=${PYTHON:-python}
NUM_PROCESSES=${NUM_PROCESSES:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
LAUNCH=(accelerate launch --num_processes "$NUM_PROCESSES")
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  LAUNCH+=(--config_file "$ACCELERATE_CONFIG")
elif [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH+=(--multi_gpu)  # also right on CPU-only machines: accelerate then uses gloo
fi
exec "${LAUNCH[@]}" -m clipvip "${APP:-retrieval}" --config "$CONFIG" "$@"
