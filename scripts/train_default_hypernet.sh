#!/bin/sh
# Reproduce capplug's bundled default hypernetwork (src/capplug/checkpoints/capplug-hypernet-smollm2).
# Each step resumes where it stopped: run the script again after an interruption.
# On a 2-core CPU: about 70 + 95 minutes (stages 1-2), 38 minutes of teachers and 85 minutes
# (stage 3); on a GPU the same commands run on it by themselves.
#
# Stage 1: 500 steps without teachers: the answer's loss (L_pred) + 0.5 x KL from the base model
# reading the definition; students never read the definition (as in TAGI).
# Stage 2: 500 more steps from stage 1 where half the students also read the definition, so
# the adapters also work beside the definition in the prompt.
# Stage 3: teacher LoRAs for 11 of the 44 train tasks (every 4th in sorted order, listed in
# hypernet_teacher_tasks.txt; all 44 take ~2.5 hours on such a CPU), then 500 steps of TAGI's
# full objective from stage 2: those 11 tasks get the teacher's KL and the weight term, the
# others the KL from the base model with the definition. The weight term is 0.01 because stage
# 2's updates start far from 64-step teachers (relative squared error ~170), and there is no
# reconstruction warm start, which would undo stage 2.
set -eu
WORK="${CAPPLUG_WORK:-${CAPPLUG_HOME:-$HOME/.cache/capplug}/work}"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v1" \
  --steps 500 --lambda-kl 0.5 --eval-every 100 --seed 0
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v2" \
  --init-from "$WORK/hypernet-v1" --steps 500 --lambda-kl 0.5 \
  --student-definition-rate 0.5 --eval-every 100 --seed 1
HERE="$(dirname "$0")"
"$PY" -c "
from capplug.adapters.lora import train_all
train_all('$WORK/teachers', tasks=open('$HERE/hypernet_teacher_tasks.txt').read().split())
"
"$PY" -m capplug.cli adapters train-hypernet --out "$WORK/hypernet-v3" \
  --init-from "$WORK/hypernet-v2" --teachers "$WORK/teachers" \
  $("$PY" -c "from capplug.adapters.lora import train_task_names as t; print(*(f'--task {n}' for n in t()))") \
  --steps 500 --reconstruction-steps 0 --lambda-kl 0.5 --lambda-weights 0.01 \
  --student-definition-rate 0.5 --eval-every 100 --seed 2
# Ship it in bfloat16 (half the size; adapters are made in float32 from it).
"$PY" -c "
import torch
from capplug.adapters import Hypernetwork
h = Hypernetwork.from_pretrained('$WORK/hypernet-v3')
h.save_pretrained('src/capplug/checkpoints/capplug-hypernet-smollm2', dtype=torch.bfloat16)
"
cp "$WORK/hypernet-v3/training_summary.json" src/capplug/checkpoints/capplug-hypernet-smollm2/
# (README.md in that folder is written by hand from training_summary.json.)
