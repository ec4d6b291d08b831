"""Score drawn candidates and options with a scorer, cached beside them (resumable).

    python scripts/score_drawn.py runs/drawn [--scorer capplug-default] [--groups train-gen ...]

Writes ``<drawn>/<group>.scores-<scorer>.json``: per ``task#index``, the scorer's score of each
candidate (or option) in order. Distinct texts are scored once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_candidates import read_drawn

from capplug._cache import write_json_atomic


def score_group(drawn: Path, group: str, scorer_ref: str, prompts: dict) -> None:
    from capplug import Scorer

    out = drawn / f"{group}.scores-{scorer_ref.replace('/', '_')}.json"
    done = json.loads(out.read_text()) if out.is_file() else {}
    rows = [
        r
        for r in read_drawn(drawn / f"{group}.jsonl.gz")
        if f"{r['task']}#{r['index']}" not in done
    ]
    # Round robin over tasks (every task's first example, then every task's second...), so a
    # run stopped early has scored a balanced sample of tasks.
    seen: dict[str, int] = {}
    rank = []
    for r in rows:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        rank.append(seen[r["task"]])
    rows = [
        r for _, _, r in sorted(zip(rank, range(len(rows)), rows, strict=True), key=lambda x: x[:2])
    ]
    print(f"{group}: {len(rows)} to score ({len(done)} done)", flush=True)
    scorer = Scorer.from_pretrained(scorer_ref)
    started = time.monotonic()
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        pairs, where = [], []
        for row in chunk:
            key = f"{row['task']}#{row['index']}"
            prompt = prompts[key]
            texts = (
                [c["text"] for c in row["candidates"]] if "candidates" in row else prompt["options"]
            )
            distinct = list(dict.fromkeys(texts))
            where.append((key, texts, distinct, len(pairs)))
            pairs += [(prompt["prompt"], t) for t in distinct]
        scores = scorer.score_pairs(pairs)
        for key, texts, distinct, offset in where:
            by_text = dict(zip(distinct, scores[offset : offset + len(distinct)], strict=True))
            done[key] = [round(by_text[t], 6) for t in texts]
        write_json_atomic(out, done)
        print(
            f"{group}: {start + len(chunk)}/{len(rows)} in {time.monotonic() - started:.0f} s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drawn", type=Path)
    parser.add_argument("--prompts", type=Path, default=Path("runs/prompts.jsonl"))
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--groups", nargs="*", default=["train-mc", "train-gen"])
    args = parser.parse_args()
    prompts = {}
    for line in args.prompts.read_text().splitlines():
        row = json.loads(line)
        prompts[f"{row['task']}#{row['index']}"] = row
    for group in args.groups:
        score_group(args.drawn, group, args.scorer, prompts)


if __name__ == "__main__":
    main()
