"""Fit the selection weights on the task pool's train tasks and write them into the scorer
checkpoint.

Data: candidates drawn on generative train tasks and options of multiple-choice train tasks
(``scripts/draw_candidates.py``), scored by the scorer (``scripts/score_drawn.py``); the tasks'
references are read from the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data
beside the checkout). Train tasks only: drawn data that names a dev task, or a task the pool
lacks, is refused. Every setting is chosen on a held-out slice of train task families (one in
three, by a hash of the family's name; a family is a dataset, as the pool groups tasks:
``bigbench/arithmetic/1_digit_addition`` belongs to ``arithmetic``, and other sources' copies of
a dataset belong to the same family); dev is never read. Every family weighs the same in fitting
and in the figures (list_functions' 261 subtasks are one).

    python scripts/fit_selector.py runs/drawn [--data PATH] [--scorer capplug-default] [--write]

Prints the held-out figures (mean Rouge-L of the pick on generative sets; mean target score of
the pick, i.e. accuracy, on multiple-choice sets) for each signal alone and each fused subset,
then refits on all train tasks; ``--write`` stores the weights in the checkpoint's config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_candidates import read_drawn

from capplug.selection import SIGNALS, signal_values
from capplug.selection.fit import (
    CandidateSet,
    fit_combiner,
    pick_quality,
    write_combiner,
)

if TYPE_CHECKING:
    from capplug.data import Pool

GRID = [(t, l2) for t in (0.02, 0.05, 0.2) for l2 in (1e-3, 1e-2, 1e-1)]
SUBSETS = [
    SIGNALS,
    ("scorer", "agreement", "length"),
    *[tuple(s for s in SIGNALS if s != left) for left in SIGNALS],
    ("scorer", "agreement", "logprob"),
    ("scorer", "agreement"),
    ("scorer", "logprob"),
    ("agreement", "logprob"),
    ("scorer", "agreement", "logprob", "logprob_mean", "length"),
    ("scorer", "agreement", "logprob", "length"),
    ("scorer", "agreement", "logprob", "length", "echo"),
    ("scorer", "agreement", "length", "echo"),
]


def held_out(family: str) -> bool:
    """Whether a task family is in the held-out slice (one in three, by a hash of its name)."""
    return zlib.crc32(family.encode()) % 3 == 0


def check_train_tasks(pool: Pool, names: set[str]) -> dict[str, str]:
    """Each drawn task's name in ``pool``, checked to be a train task.

    Raises:
        SystemExit: some are not in the pool, or are not train tasks (the selection is fitted on
            train tasks only).
    """
    found: dict[str, str] = {}
    unknown: list[str] = []
    not_train: list[str] = []
    for name in sorted(names):
        try:
            found[name] = pool.resolve(name)
        except KeyError:
            unknown.append(name)
            continue
        if pool.entry(found[name]).split != "train":
            not_train.append(found[name])
    if not_train:
        raise SystemExit(
            f"fit_selector: the drawn data holds {len(not_train)} task(s) that the task pool at "
            f"{pool.root} does not mark train ({', '.join(not_train[:10])}); the selection is "
            f"fitted on train tasks only: export the prompts again (scripts/draw_candidates.py "
            f"export) from this pool"
        )
    if unknown:
        raise SystemExit(
            f"fit_selector: the drawn data names {len(unknown)} task(s) that the task pool at "
            f"{pool.root} lacks ({', '.join(unknown[:10])}); give --data the pool the prompts "
            f"were exported from, or export them again from this one"
        )
    return found


def load_sets(
    drawn: Path, scorer_ref: str, kind: str, pool: Pool
) -> list[tuple[str, CandidateSet]]:
    """(task, set) pairs of one kind: "gen" (sampled candidates) or "mc" (options), each set
    grouped by its task's family in ``pool``."""
    from capplug.data.labels import normalised_option_scores, rouge_l

    group = {"gen": "train-gen", "mc": "train-mc"}[kind]
    scores = json.loads((drawn / f"{group}.scores-{scorer_ref.replace('/', '_')}.json").read_text())
    rows = [
        r for r in read_drawn(drawn / f"{group}.jsonl.gz") if f"{r['task']}#{r['index']}" in scores
    ]
    names = check_train_tasks(pool, {r["task"] for r in rows})
    tasks: dict[str, Any] = {}
    out = []
    for row in rows:
        key = f"{row['task']}#{row['index']}"
        name = names[row["task"]]
        if name not in tasks:
            tasks[name] = {e.index: e for e in pool.load(name).examples}
        example = tasks[name].get(row["index"])
        if example is None:
            raise SystemExit(
                f"fit_selector: {key} is not an example of {name} in the task pool at "
                f"{pool.root}; were the prompts exported from other task data?"
            )
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
            quality = np.array([float(norm[t] == 1.0) for t in texts])
        values = signal_values(
            texts,
            scores=np.array(scores[key]),
            logprobs=lp,
            token_counts=counts,
            instruction=example.prompt,
        )
        out.append((name, CandidateSet(values, quality, pool.family(name))))
    return out


def evaluate(kind: str, sets: list[tuple[str, CandidateSet]]) -> dict[str, Any]:
    fit_sets = [s for _, s in sets if not held_out(s.group)]
    test_sets = [s for _, s in sets if held_out(s.group)]
    families = sorted({s.group for s in test_sets})
    print(
        f"\n== {kind}: {len(fit_sets)} sets to fit, {len(test_sets)} held out in "
        f"{len(families)} families: {', '.join(families)}"
    )

    def held_out_figure(t: float, l2: float, subset: tuple[str, ...]) -> float:
        combiner = fit_combiner(fit_sets, temperature=t, l2=l2, subsets=[subset])
        return 100 * pick_quality(test_sets, combiner.weights_for(subset))

    best = max(GRID, key=lambda g: held_out_figure(*g, SIGNALS))
    print(f"settings chosen on the held-out slice: temperature {best[0]}, l2 {best[1]}")
    rows = {f"{name} alone": 100 * pick_quality(test_sets, {name: 1.0}) for name in SIGNALS}
    rows.update({"fused " + "+".join(s): held_out_figure(*best, s) for s in SUBSETS})
    oracle = [CandidateSet({"scorer": s.quality}, s.quality, s.group) for s in test_sets]
    rows["oracle"] = 100 * pick_quality(oracle, {"scorer": 1.0})
    for name, value in rows.items():
        print(f"  {value:6.1f}  {name}")
    return {"settings": best, "held_out": rows, "families": families}


def cross_validate(sets: list[tuple[str, CandidateSet]]) -> tuple[float, float]:
    """Three folds by family (every family held out once): settings chosen on the mean held-out
    Rouge-L of the full signal set, then each signal subset's figure; returns the settings."""
    fold = {s.group: zlib.crc32(s.group.encode()) % 3 for _, s in sets}

    def figure(
        subset: tuple[str, ...], t: float | None = None, l2: float | None = None
    ) -> tuple[float, list[float]]:
        t, l2 = chosen if t is None else (t, l2)  # type: ignore[assignment]
        values = []
        for k in range(3):
            train = [s for _, s in sets if fold[s.group] != k]
            test = [s for _, s in sets if fold[s.group] == k]
            combiner = fit_combiner(train, temperature=t, l2=l2, subsets=[subset])
            values.append(100 * pick_quality(test, combiner.weights_for(subset)))
        return float(np.mean(values)), values

    chosen: tuple[float, float] = (0.0, 0.0)
    chosen = max(GRID, key=lambda g: figure(SIGNALS, *g)[0])
    print(f"\n== gen, 3 folds by family: temperature {chosen[0]}, l2 {chosen[1]} chosen")
    for name in SIGNALS:
        print(f"  {figure((name,))[0]:6.1f}  {name} alone (fitted sign)")
    for subset in SUBSETS:
        mean, values = figure(subset)
        print(f"  {mean:6.1f}  fused {'+'.join(subset)}  ({', '.join(f'{v:.1f}' for v in values)})")
    return chosen


def leave_one_family_out(
    sets: list[tuple[str, CandidateSet]], settings: tuple[float, float], signal: str
) -> dict[str, Any]:
    """Does ``signal`` earn its place? Each family is held out once; the weights fitted on the
    others pick with and without the signal, for the full signal set and for the set an API
    without log-probabilities has. The rule, fixed before it was first run: keep the signal only
    if, in both cases, it raises the mean over families, raises it on more families than it
    lowers it, and still raises the mean with the family it helps most left out."""
    t, l2 = settings
    families = sorted({s.group for _, s in sets})
    no_logprobs = tuple(s for s in SIGNALS if not s.startswith("logprob"))
    verdict: dict[str, Any] = {}
    for name, full in (("all signals", SIGNALS), ("without log-probs", no_logprobs)):
        without = tuple(s for s in full if s != signal)
        gains = {}
        for held in families:
            train = [s for _, s in sets if s.group != held]
            test = [s for _, s in sets if s.group == held]
            combiner = fit_combiner(train, temperature=t, l2=l2, subsets=[full, without])
            gains[held] = 100 * (
                pick_quality(test, combiner.weights_for(full))
                - pick_quality(test, combiner.weights_for(without))
            )
        top = max(gains, key=gains.__getitem__)
        rest = [g for f, g in gains.items() if f != top]
        keep = (
            float(np.mean(list(gains.values()))) > 0
            and sum(g > 0 for g in gains.values()) > sum(g < 0 for g in gains.values())
            and float(np.mean(rest)) > 0
        )
        print(f"\n== {signal}, leave one family out, {name}: keep = {keep}")
        for f, g in sorted(gains.items(), key=lambda kv: -kv[1]):
            print(f"  {g:+6.2f}  {f}")
        print(f"  mean {np.mean(list(gains.values())):+.2f}; without {top}: {np.mean(rest):+.2f}")
        verdict[name] = {"gains": gains, "keep": keep}
    verdict["keep"] = all(v["keep"] for v in verdict.values() if isinstance(v, dict))
    return verdict


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package
    from benchmarks._tasks import add_data_option

    from capplug.data import open_pool
    from capplug.errors import DataError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drawn", type=Path)
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--kinds", nargs="*", default=["gen", "mc"], choices=["gen", "mc"])
    parser.add_argument(
        "--write",
        action="store_true",
        help="store the weights in the checkpoint: gen sets fit the main table, mc sets (options "
        "with LM log-likelihoods) the table for judged candidates",
    )
    parser.add_argument("--report", type=Path, help="write the held-out figures as JSON here")
    parser.add_argument("--cv", action="store_true", help="also 3-fold cross-validation by family")
    parser.add_argument(
        "--lofo",
        metavar="SIGNAL",
        help="decide whether SIGNAL earns its place, leaving one family out at a time; a signal "
        "that does not is left out of the weights --write stores",
    )
    add_data_option(parser)
    args = parser.parse_args()
    try:
        pool = open_pool(args.data, strict=args.strict)
    except DataError as exc:
        parser.error(str(exc))
    data = {kind: load_sets(args.drawn, args.scorer, kind, pool) for kind in args.kinds}
    report = {kind: evaluate(kind, sets) for kind, sets in data.items()}
    if args.cv and "gen" in data:
        report["gen"]["settings"] = cross_validate(data["gen"])  # the settings --write uses
    signals = SIGNALS
    if args.lofo and "gen" in data:
        verdict = leave_one_family_out(data["gen"], report["gen"]["settings"], args.lofo)
        report["gen"][f"lofo {args.lofo}"] = verdict
        if not verdict["keep"]:
            signals = tuple(s for s in SIGNALS if s != args.lofo)
    if len(data) == 2:
        for a, b in (("gen", "mc"), ("mc", "gen")):
            fitted = fit_combiner(
                [s for _, s in data[a] if not held_out(s.group)],
                temperature=report[a]["settings"][0],
                l2=report[a]["settings"][1],
                subsets=[SIGNALS],
            )
            value = 100 * pick_quality(
                [s for _, s in data[b] if held_out(s.group)], fitted.weights_for(SIGNALS)
            )
            print(f"weights fitted on {a}, held-out {b}: {value:.1f}")
            report[f"{a}_on_{b}"] = value
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    if args.write:
        write(args.scorer, data, report, signals)


def write(
    scorer: str,
    data: dict[str, list[tuple[str, CandidateSet]]],
    report: dict[str, Any],
    signals: tuple[str, ...],
) -> None:
    """Store the weights in the scorer checkpoint: from sampled candidates (gen) the main table,
    from options judged by the LM (mc) the ``judged`` table; a kind not given keeps what the
    checkpoint holds for it."""
    from capplug.models import bundled_path, resolve
    from capplug.selection import Combiner, load_combiner

    old = load_combiner(scorer)
    weights, judged, info = dict(old.weights), dict(old.judged), dict(old.info)
    if "gen" in data:
        t, l2 = report["gen"]["settings"]
        sets = [s for _, s in data["gen"]]
        gen_info = {
            "fitted_on": "the task pool's generative train tasks: 17 SmolLM2-135M-Instruct "
            "candidates per prompt (Cappy's recipe), quality = Rouge-L to the reference; every "
            "task family weighs the same",
            "prompts": len(sets),
            "tasks": len({t for t, _ in data["gen"]}),
            "families": len({s.group for s in sets}),
            "held_out": report["gen"]["held_out"],
            "signals_left_out": sorted(set(SIGNALS) - set(signals)),
        }
        sets = [
            CandidateSet({k: v for k, v in s.values.items() if k in signals}, s.quality, s.group)
            for s in sets
        ]
        fitted = fit_combiner(sets, temperature=t, l2=l2, info=gen_info)
        weights, info = dict(fitted.weights), dict(fitted.info)
    if "mc" in data:
        t, l2 = report["mc"]["settings"]
        sets = [s for _, s in data["mc"]]
        judged = dict(fit_combiner(sets, temperature=t, l2=l2).weights)
        info["judged"] = {
            "fitted_on": "options of the task pool's multiple-choice train tasks with their "
            "SmolLM2-135M-Instruct log-likelihoods, quality = 1 for a correct option; every "
            "task family weighs the same",
            "prompts": len(sets),
            "tasks": len({t for t, _ in data["mc"]}),
            "families": len({s.group for s in sets}),
            "settings": [t, l2],
            "held_out": report["mc"]["held_out"],
        }
    combiner = Combiner(weights, info, judged)
    # A bundled checkpoint keeps its config in the package (the cache copy follows it).
    path = write_combiner(combiner, bundled_path(scorer) or resolve(scorer))
    print(f"wrote {len(combiner.weights)} + {len(combiner.judged)} judged weight sets to {path}")


if __name__ == "__main__":
    main()
