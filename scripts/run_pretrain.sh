#!/usr/bin/env bash
# Post-pretraining (OCL) on HD-VILA with torchrun: one node or several.
#
#   scripts/run_pretrain.sh CONFIG [--key value ...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/run_pretrain.sh configs/pretrain/pretrain_vip_base_32.json \
#       --blob_mount_dir /data
#
# NPROC_PER_NODE defaults to the visible GPUs (or 1). With horovod installed
# (scripts/install_horovod.sh) the same app also runs under
#   horovodrun -np 8 -H host1:4,host2:4 python -m clipvip pretrain --config CONFIG
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--key value ...]}
shift
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
        --master_port "${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC_PER_NODE" \
  -m clipvip pretrain --config "$CONFIG" "$@"
