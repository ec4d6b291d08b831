#!/bin/sh
# Reproduce capplug's bundled default hypernetwork (src/capplug/checkpoints/capplug-hypernet-smollm2).
# Each stage resumes where it stopped: run the script again after an interruption.
# On a 2-core CPU: about 70 + 85 minutes; on a GPU the same commands run on it by themselves.
#
# No teacher LoRAs: training the 44 teachers takes ~10 hours on such a CPU, so the hypernetwork
# learns from the answer's loss (L_pred) and the KL from the base model reading the definition
# (lambda-kl 0.5). With teachers (`capplug adapters train-lora --all --out T`), add
# `--teachers T` for TAGI's full objective with the weight term and warm start.
#
# Stage 1: 500 steps, students never read the definition (as in TAGI).
# Stage 2: 500 more steps from stage 1 where half the students also read the definition, so
# the adapters also work beside the definition in the prompt.
set -eu
WORK="${CAPPLUG_WORK:-${CAPPLUG_HOME:-$HOME/.cache/capplug}/work}"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v1" \
  --steps 500 --lambda-kl 0.5 --eval-every 100 --seed 0
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v2" \
  --init-from "$WORK/hypernet-v1" --steps 500 --lambda-kl 0.5 \
  --student-definition-rate 0.5 --eval-every 100 --seed 1
# Ship it in bfloat16 (half the size; adapters are made in float32 from it).
"$PY" -c "
import torch
from capplug.adapters import Hypernetwork
h = Hypernetwork.from_pretrained('$WORK/hypernet-v2')
h.save_pretrained('src/capplug/checkpoints/capplug-hypernet-smollm2', dtype=torch.bfloat16)
"
cp "$WORK/hypernet-v2/training_summary.json" src/capplug/checkpoints/capplug-hypernet-smollm2/
# (README.md in that folder is written by hand from training_summary.json.)
