#!/bin/sh
# Reproduce capplug's bundled default scorer (src/capplug/checkpoints/capplug-default).
# Every step resumes where it stopped: run it again after an interruption.
# On a 2-core CPU: stage 1 about 1.5 minutes of data and 80 minutes of training; stage 2 about
# 80 minutes of candidate generation and 30 minutes of training; stage 3 about 20 minutes of
# training; stage 4 about 45 minutes of candidate generation and 20 minutes of training; stage 5
# about 40 minutes of training and 45 of candidate generation. On a GPU the same commands run on
# it by themselves.
# Held-out slices: stage 1's hit the 2,000-pair cap. The bundled stage 1 took the capped slice's
# examples in file order; `capplug train` now takes them in hash order (the same slice however
# the rows are ordered), so a rerun of stage 1 holds out a different 2,000 pairs. Stages 2-4
# held out fewer pairs than the cap and get the same slices as before.
set -eu
WORK="${CAPPLUG_WORK:-${CAPPLUG_HOME:-$HOME/.cache/capplug}/work}"
PY="${PYTHON:-.venv/bin/python}"
HERE="$(dirname "$0")"

# Stage 1: continual pretraining from the packaged MiniLM on references, negatives and
# multiple-choice options of all 920 BIG-bench train tasks.
"$PY" -m capplug.cli data build --split train --out "$WORK/scorer-data-v1" --max-per-task 16
"$PY" -m capplug.cli train --data "$WORK/scorer-data-v1/shards" --backbone minilm \
  --out "$WORK/scorer-run-v1" --lr 5e-5 --eval-every 150 --patience 6
# What training changed over the packaged MiniLM (word embeddings stay frozen), in float16.
"$PY" -c "from capplug.models.delta import export_delta; export_delta('$WORK/scorer-run-v1', '$WORK/scorer-v1-delta', base='minilm')"

# Stage 2: the same data for 339 of the tasks plus SmolLM2-135M-Instruct's own candidates for
# 2 examples a task, labelled by Rouge-L; adapted from stage 1.
"$PY" -m capplug.cli data build --split train --out "$WORK/scorer-data-v2" --max-per-task 16 \
  --generator smollm2-135m-instruct --recipe fast --sample-per-task 2 \
  $(sed 's/^/--task /' "$HERE/scorer_data_v2_tasks.txt")
"$PY" -m capplug.cli adapt --scorer "$WORK/scorer-v1-delta" --data "$WORK/scorer-data-v2/shards" \
  --out "$WORK/scorer-run-v2" --epochs 1 --max-steps 600 --lr 3e-5 --eval-every 100 --patience 4
"$PY" -c "from capplug.models.delta import export_delta; export_delta('$WORK/scorer-run-v2', '$WORK/scorer-v2-delta', base='minilm')"

# Stage 3: the same data with a pairwise ranking loss beside the pointwise one; from stage 2.
"$PY" -m capplug.cli adapt --scorer "$WORK/scorer-v2-delta" --data "$WORK/scorer-data-v2/shards" \
  --out "$WORK/scorer-run-v3-rank" --epochs 1 --max-steps 250 --lr 2e-5 --rank-weight 1.0 \
  --eval-every 50 --patience 4
"$PY" -c "from capplug.models.delta import export_delta; export_delta('$WORK/scorer-run-v3-rank', '$WORK/scorer-v3-delta', base='minilm')"

# Stage 4: clipped candidates. SmolLM2's candidates for 2 further examples of each of the 180
# generative tasks of stage 2's list; then every sampled candidate of both builds also clipped
# to its first line and first sentence (Rouge-labelled), so short right answers sit beside
# long ones that drift on; both builds merged (shared rows once); adapted from stage 3.
"$PY" -m capplug.cli data build --split train --out "$WORK/scorer-data-v3" --max-per-task 16 \
  --generator smollm2-135m-instruct --recipe fast --sample-per-task 2 --sample-skip 2 \
  $(sed 's/^/--task /' "$HERE/scorer_data_v3_tasks.txt")
"$PY" -m capplug.cli data clip "$WORK/scorer-data-v2" --out "$WORK/scorer-data-v2-clip"
"$PY" -m capplug.cli data clip "$WORK/scorer-data-v3" --out "$WORK/scorer-data-v3-clip"
"$PY" -m capplug.cli data merge "$WORK/scorer-data-v2-clip" "$WORK/scorer-data-v3-clip" \
  --out "$WORK/scorer-data-v5"
"$PY" -m capplug.cli adapt --scorer "$WORK/scorer-v3-delta" --data "$WORK/scorer-data-v5/shards" \
  --out "$WORK/scorer-run-v5" --epochs 1 --max-steps 250 --lr 2e-5 --rank-weight 1.0 \
  --eval-every 50 --patience 4
"$PY" -c "from capplug.models.delta import export_delta; export_delta('$WORK/scorer-run-v5', '$WORK/scorer-v5-delta', base='minilm')"

# Stage 5: the task pool's train tasks, fold 1 of its family-grouped folds left out (to measure
# on), with the listwise loss beside the pointwise one (about 40 minutes of training).
"$PY" -m capplug.cli data build --max-per-task 64 --max-per-family 1024 --leave-out-fold 1 \
  --out "$WORK/scorer-data-pool-x1"
"$PY" -m capplug.cli adapt --scorer "$WORK/scorer-v5-delta" --data "$WORK/scorer-data-pool-x1/shards" \
  --out "$WORK/scorer-run-v6" --listwise-weight 1 --max-length 128 --lr 2e-5 --max-steps 600 \
  --eval-every 150 --heldout 0.02
# Selection weights refit with it: SmolLM2's candidates for two prompts of each generative family
# outside fold 1 (about 45 minutes of drawing on a CPU), scored, fitted on family folds.
"$PY" scripts/draw_candidates.py export --out "$WORK/prompts.jsonl"
"$PY" scripts/draw_candidates.py pick "$WORK/prompts.jsonl" --out "$WORK/prompts-gen-fam.jsonl" \
  --group train-gen --per-family 2 --leave-out-fold 1
"$PY" scripts/draw_candidates.py draw "$WORK/prompts-gen-fam.jsonl" --out "$WORK/drawn-gen" --batch 8
"$PY" scripts/score_drawn.py "$WORK/drawn-gen" --prompts "$WORK/prompts-gen-fam.jsonl" \
  --scorer "$WORK/scorer-run-v6" --groups train-gen
"$PY" scripts/fit_selector.py "$WORK/drawn-gen" --kinds gen --scorer "$WORK/scorer-run-v6" --cv --write
"$PY" -c "from capplug.models.delta import export_delta; export_delta('$WORK/scorer-run-v6', 'src/capplug/checkpoints/capplug-default', base='minilm')"
# (README.md in that folder is written by hand from the runs' training_summary.json.)
