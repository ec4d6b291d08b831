#!/bin/sh
# Reproduce capplug's bundled default hypernetwork (src/capplug/checkpoints/capplug-hypernet-smollm2).
# The training resumes where it stopped: run the script again after an interruption.
# On a 2-core CPU: about 75 minutes (500 steps of 4 tasks x 2 examples, ~8.5 s a step); on a GPU
# the same command runs on it by itself.
#
# No teacher LoRAs: training the 44 teachers takes ~10 hours on such a CPU, so this run learns
# from the answer's loss without the definition (L_pred) and the KL from the base model reading
# the definition (lambda-kl 0.5). With teachers (`capplug adapters train-lora --all --out T`),
# add `--teachers T` for TAGI's full objective with the weight term and warm start.
set -eu
WORK="${CAPPLUG_WORK:-${CAPPLUG_HOME:-$HOME/.cache/capplug}/work}"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v1" \
  --steps 500 --lambda-kl 0.5 --eval-every 100 --seed 0
# Ship it in bfloat16 (half the size; adapters are made in float32 from it).
"$PY" -c "
import torch
from capplug.adapters import Hypernetwork
h = Hypernetwork.from_pretrained('$WORK/hypernet-v1')
h.save_pretrained('src/capplug/checkpoints/capplug-hypernet-smollm2', dtype=torch.bfloat16)
"
cp "$WORK/hypernet-v1/training_summary.json" src/capplug/checkpoints/capplug-hypernet-smollm2/
# (README.md in that folder is written by hand from training_summary.json.)
