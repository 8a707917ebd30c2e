#!/usr/bin/env bash
# Quick start, main job: train a small CLAP (HTSAT-mini audio + a 2-layer CLIP-style text tower)
# on the built-in synthetic sound set with 2 processes (FSDP2; gloo on CPU, nccl on GPU), then
# print held-out retrieval metrics (test split; chance R@10 = 10/64) and zero-shot accuracy on
# the test clips written as a labelled folder. About 5 minutes of training on a 2-core CPU.
#
# Environment overrides: DATA (default ./data), RUNS (default ./logs), NPROC (default 2),
# EPOCHS (default 6), TRAIN_N (default 384; only used when the set is generated).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
py=.venv/bin/python
data="${DATA:-$root/data}"
runs="${RUNS:-$root/logs}"
train_n="${TRAIN_N:-384}"
if [ ! -f "$data/synth/test/sizes.json" ] || [ ! -f "$data/synth_test_folder/classnames.json" ]; then
  "$py" - "$data" "$train_n" <<'PY'
import json, logging, sys
from clap_fast import synth
logging.basicConfig(level=logging.INFO, format="%(message)s")
root, n = sys.argv[1], int(sys.argv[2])
synth.write_webdataset(root, "synth", splits={"train": n, "test": 64}, shard_size=32, progress=False)
synth.write_folder(f"{root}/synth_test_folder", 64, split="test")  # the test clips, by class
with open(f"{root}/synth_test_folder/classnames.json", "w") as f:
    f.write(json.dumps(synth.CLASS_NAMES))
PY
fi
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$root/.cache/inductor}"
name="quickstart-$(date +%Y%m%d-%H%M%S)"
start=$(date +%s)
.venv/bin/torchrun --standalone --nproc_per_node "${NPROC:-2}" -m clap_fast.train \
  --dataset-type webdataset --datasetpath "$data" --datasetnames synth --datasetinfos train \
  --model HTSAT-mini --tmodel transformer --text-overrides '{"width": 128, "layers": 2, "heads": 2}' \
  --batch-size 8 --epochs "${EPOCHS:-6}" --lr 2e-3 --wd 0.1 --warmup 20 --workers 1 \
  --precision bf16 --use-bn-sync --val-frequency 100 --save-frequency 0 --save-most-recent \
  --zeroshot-folder "$data/synth_test_folder" --logdir "$runs" --name "$name" --seed 0
echo "quick start: $(( $(date +%s) - start )) s of training; run directory $runs/$name"
