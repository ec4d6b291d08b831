"""Fit the selection weights on BIG-bench train tasks and write them into the scorer checkpoint.

Data: candidates drawn on generative train tasks and options of multiple-choice train tasks
(``scripts/draw_candidates.py``), scored by the scorer (``scripts/score_drawn.py``). Every
setting is chosen on a held-out slice of train task families (about one in five, by a hash of
the family name: ``arithmetic/1_digit_addition`` belongs to ``arithmetic``); dev is never read.

    python scripts/fit_selector.py runs/drawn [--scorer capplug-default] [--write]

Prints the held-out figures (mean Rouge-L of the pick on generative sets, accuracy on
multiple-choice sets) for each single signal and each fused subset, then refits on all train
tasks; ``--write`` stores the weights in the checkpoint's ``config.json`` (``capplug_selection``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_candidates import read_drawn

from capplug.selection import SIGNALS, Combiner, fit_weights, signal_values
from capplug.selection.combiner import CONFIG_KEY

GRID = [(t, l2) for t in (0.02, 0.05, 0.2) for l2 in (1e-3, 1e-2, 1e-1)]


def family(task: str) -> str:
    return task.split("/")[0]


def held_out(task: str) -> bool:
    return zlib.crc32(family(task).encode()) % 5 == 0


def load_sets(
    drawn: Path, scorer_ref: str, kinds: tuple[str, ...] = ("gen", "mc")
) -> dict[str, list[dict[str, Any]]]:
    """Per kind ("gen", "mc"): candidate sets with signals, quality and task."""
    from capplug.data.bigbench import load_task
    from capplug.data.labels import normalised_option_scores, rouge_l

    tag = scorer_ref.replace("/", "_")
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    tasks: dict[str, Any] = {}
    for kind, group in (("gen", "train-gen"), ("mc", "train-mc")):
        if kind not in kinds:
            continue
        scores = json.loads((drawn / f"{group}.scores-{tag}.json").read_text())
        for row in read_drawn(drawn / f"{group}.jsonl.gz"):
            key = f"{row['task']}#{row['index']}"
            if key not in scores:
                continue
            if row["task"] not in tasks:
                tasks[row["task"]] = {e.index: e for e in load_task(row["task"]).examples}
            example = tasks[row["task"]][row["index"]]
            if kind == "gen":
                texts = [c["text"] for c in row["candidates"]]
                lp = np.array([c["sum_logprob"] for c in row["candidates"]])
                counts = np.array([c["n_tokens"] for c in row["candidates"]], dtype=float)
                quality = np.array([rouge_l(t, example.targets) for t in texts])
            else:
                texts = list(example.target_scores)
                lp = np.array([v[0] for v in row["options"]])
                counts = np.array([max(v[2], 1) for v in row["options"]], dtype=float)
                norm = normalised_option_scores(example.target_scores)
                quality = np.array([norm[t] for t in texts])
            values = signal_values(
                texts, scores=np.array(scores[key]), logprobs=lp, token_counts=counts
            )
            out[kind].append({"task": row["task"], "values": values, "quality": quality})
    return out


def pick_quality(sets: list[dict[str, Any]], weights: dict[str, float], kind: str) -> float:
    """Mean quality of the pick: Rouge-L (gen) or accuracy, a hit on a best option (mc)."""
    combiner = Combiner({"+".join(sorted(weights)): weights})
    got = []
    for s in sets:
        fused, _ = combiner.fuse({k: s["values"][k] for k in weights})
        q = s["quality"][int(np.argmax(fused))]
        got.append(float(q == s["quality"].max()) if kind == "mc" else float(q))
    # Per-task mean, then mean over tasks (every task counts once).
    per_task: dict[str, list[float]] = {}
    for s, g in zip(sets, got, strict=True):
        per_task.setdefault(s["task"], []).append(g)
    return 100 * float(np.mean([np.mean(v) for v in per_task.values()]))


def fit(sets: list[dict[str, Any]], signals: tuple[str, ...], t: float, l2: float) -> dict:
    return fit_weights(
        [({k: s["values"][k] for k in signals}, s["quality"]) for s in sets],
        signals,
        temperature=t,
        l2=l2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drawn", type=Path)
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--kinds", nargs="*", default=["gen", "mc"], choices=["gen", "mc"])
    parser.add_argument("--report", type=Path, help="write the held-out figures as JSON here")
    args = parser.parse_args()
    data = load_sets(args.drawn, args.scorer, tuple(args.kinds))
    report: dict[str, Any] = {}
    chosen: dict[str, tuple[float, float]] = {}
    for kind, sets in data.items():
        fit_sets = [s for s in sets if not held_out(s["task"])]
        test_sets = [s for s in sets if held_out(s["task"])]
        n_tasks = len({s["task"] for s in test_sets})
        print(
            f"\n== {kind}: {len(fit_sets)} sets to fit, {len(test_sets)} held out ({n_tasks} tasks)"
        )
        full = tuple(SIGNALS)
        best = max(GRID, key=lambda g: pick_quality(test_sets, fit(fit_sets, full, *g), kind))
        chosen[kind] = best
        print(f"settings chosen on the held-out slice: temperature {best[0]}, l2 {best[1]}")
        rows = {}
        for name in SIGNALS:
            for sign in (1.0, -1.0):
                rows[f"{'-' if sign < 0 else ''}{name} alone"] = pick_quality(
                    test_sets, {name: sign}, kind
                )
        subsets = [
            full,
            tuple(s for s in full if s not in ("logprob", "logprob_mean")),
            *[tuple(s for s in full if s != left) for left in full],
            ("scorer", "agreement", "logprob"),
            ("scorer", "agreement"),
            ("scorer", "logprob"),
            ("scorer", "logprob", "logprob_mean"),
        ]
        for subset in subsets:
            weights = fit(fit_sets, subset, *best)
            rows["fused " + "+".join(subset)] = pick_quality(test_sets, weights, kind)
        rows["oracle"] = pick_quality(
            [{**s, "values": {"scorer": s["quality"]}} for s in test_sets], {"scorer": 1.0}, kind
        )
        for name, value in rows.items():
            print(f"  {value:6.1f}  {name}")
        report[kind] = {"settings": best, "held_out": rows, "tasks": n_tasks}
    # Cross-kind check: weights fitted on one kind, used on the other's held-out sets.
    full = tuple(SIGNALS)
    for a, b in (("gen", "mc"), ("mc", "gen")) if len(data) == 2 else ():
        weights = fit([s for s in data[a] if not held_out(s["task"])], full, *chosen[a])
        value = pick_quality([s for s in data[b] if held_out(s["task"])], weights, b)
        print(f"weights fitted on {a}, held-out {b}: {value:.1f}")
        report[f"{a}_on_{b}"] = value
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    if args.write:
        write(data, chosen, args.scorer, report)


def write(data: dict, chosen: dict, scorer_ref: str, report: dict) -> None:
    """Refit every subset containing the scorer on all train sets; store in the config."""
    from capplug.models import resolve

    weights: dict[str, dict[str, float]] = {}
    for kind in ("gen",):
        sets = data[kind]
        for r in range(1, len(SIGNALS) + 1):
            for subset in itertools.combinations(SIGNALS, r):
                if "logprob_mean" in subset and "logprob" not in subset:
                    continue
                weights["+".join(sorted(subset))] = fit(sets, subset, *chosen[kind])
    info = {
        "fitted_on": "BIG-bench train tasks: SmolLM2-135M-Instruct candidates (17 per prompt, "
        "Cappy's recipe), quality = Rouge-L to the reference",
        "prompts": len(data["gen"]),
        "tasks": len({s["task"] for s in data["gen"]}),
        "temperature": chosen["gen"][0],
        "l2": chosen["gen"][1],
        "held_out": report["gen"]["held_out"],
    }
    path = Path(resolve(scorer_ref)) / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = Combiner(weights, info).to_config()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(weights)} weight sets to {path}")


if __name__ == "__main__":
    main()
