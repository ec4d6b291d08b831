"""Feedback to an adapted scorer: record choices, judge them, adapt, and let the guard decide.

A made-up house style stands in for a user's task: unit conversions answered with the number
and unit only. The bundled scorer has never seen that style. Twenty-four recorded selections
are judged (the terse right answer preferred over a chatty right one and a wrong one), the
scorer is adapted on sixteen of them, and the guard compares the adapted scorer's picks with
the bundled one's on the other eight. Both are then asked about eight conversions neither saw.

    python examples/feedback_adaptation.py
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from capplug import Scorer
from capplug.data.rows import labelled_pairs
from capplug.feedback import FeedbackStore
from capplug.scoring.guard import guard
from capplug.training.scorer import TrainConfig, train_scorer


def conversions(count: int, seed: int) -> list[tuple[str, list[str], int]]:
    """(question, [chatty, terse, wrong] answers, index of the one the house style wants)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        km = rng.randint(2, 90)
        question = f"Convert {km} kilometres to metres. Answer with the number and unit only."
        chatty = f"To convert {km} kilometres to metres, multiply by 1000: {km} km is {km * 1000} metres."
        out.append((question, [chatty, f"{km * 1000} m", f"{km * 100} m"], 1))
    return out


def right_picks(scorer: Scorer, items: list[tuple[str, list[str], int]]) -> int:
    right = 0
    for question, answers, wanted in items:
        scores = scorer.score(question, answers)
        right += max(range(len(answers)), key=lambda i: scores[i]) == wanted
    return right


def adapt_on_feedback(start: str = "capplug-default") -> None:
    print("\n== adapting the scorer to judged selections (a made-up house style)")
    work = Path(tempfile.mkdtemp(prefix="capplug-feedback-demo-"))
    store = FeedbackStore(work / "feedback.sqlite3")
    bundled = Scorer.from_pretrained(start)
    recorded = []
    for question, answers, wanted in conversions(24, seed=0):
        scores = bundled.score(question, answers)
        chosen = max(range(len(answers)), key=lambda i: scores[i])
        selection_id = store.record(question, answers, chosen)  # what a surface records
        store.add(selection_id, preferred=wanted)  # what the user judged
        recorded.append(selection_id)
    pairs = labelled_pairs(store.rows())  # one group per selection
    # The last eight judged selections are held out for the guard (`capplug adapt` holds out a
    # share picked by a hash of each selection's id instead).
    kept_back = set(recorded[-8:])
    train = [p for p in pairs if p.group not in kept_back]
    heldout = [p for p in pairs if p.group in kept_back]
    started = time.perf_counter()
    config = TrainConfig(
        epochs=6, learning_rate=5e-5, batch_size=16, eval_every=10, rank_weight=1.0
    )
    train_scorer(
        Scorer.from_pretrained(start),
        train,
        work / "adapted",
        eval_pairs=heldout,
        config=config,
        progress=False,
    )
    adapted = Scorer.from_pretrained(work / "adapted")
    print(f"{len(train)} judged pairs, adapted in {time.perf_counter() - started:.1f}s")
    report = guard(bundled, adapted, heldout)
    print(f"guard: {report.reason}")
    unseen = conversions(8, seed=1)
    print(
        f"8 conversions neither saw, house-style answer picked: bundled "
        f"{right_picks(bundled, unseen)}/8, adapted {right_picks(adapted, unseen)}/8"
    )


if __name__ == "__main__":
    adapt_on_feedback()
