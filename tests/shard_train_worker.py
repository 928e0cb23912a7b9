"""``python tests/shard_train_worker.py IDS_DIR clipvip-args...`` (under torchrun): the retrieval app,
with every training batch's sample ids appended to ``IDS_DIR/rank{R}.jsonl`` and this process's pid
written to ``IDS_DIR/pid{R}.{restart}`` (the test kills one of them)."""
import json
import os
import sys

from clipvip.apps.main import main
from clipvip.data.shards import ShardStream

ids_dir = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
os.makedirs(ids_dir, exist_ok=True)
with open(os.path.join(ids_dir, f"pid{rank}.{restart}"), "w") as f:
    f.write(str(os.getpid()))
next_batch = ShardStream.__next__


def recording_next(self):
    batch = next_batch(self)
    with open(os.path.join(ids_dir, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"restart": restart, "epoch": self.epoch, "ids": batch["indices"].tolist()}) + "\n")
    return batch


ShardStream.__next__ = recording_next
sys.exit(main(sys.argv[2:]))
