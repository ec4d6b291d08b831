#!/bin/sh
# Reproduce capplug's bundled default scorer (src/capplug/checkpoints/capplug-default).
# Every step resumes where it stopped: run it again after an interruption.
# On a 2-core CPU: about 1.5 minutes to build the data and 80 minutes to train; on a GPU the same
# commands run on it by themselves.
set -eu
WORK="${CAPPLUG_WORK:-${CAPPLUG_HOME:-$HOME/.cache/capplug}/work}"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m capplug.cli data build --split train --out "$WORK/scorer-data-v1" --max-per-task 16
"$PY" -m capplug.cli train --data "$WORK/scorer-data-v1/shards" --backbone minilm \
  --out "$WORK/scorer-run-v1" --lr 5e-5 --eval-every 150 --patience 6
# Ship what training changed over the packaged MiniLM (word embeddings stay frozen), in float16.
"$PY" -c "from capplug._delta import export_delta; export_delta('$WORK/scorer-run-v1', 'src/capplug/checkpoints/capplug-default', base='minilm')"
