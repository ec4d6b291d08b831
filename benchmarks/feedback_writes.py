"""Feedback store writes (docs/benchmarks.md, "Feedback"; targets: p50 <= 1 ms per write, none
lost under 32 concurrent writers or a writer killed with SIGKILL).

Three runs against a fresh ``FeedbackStore`` file in a temporary folder:

1. latency: one writer records a selection (8 candidates of ~40 words, their scores) and judges
   it (a label), ``--writes`` times; p50/p90/p99 of each call;
2. concurrency: 32 threads in one process plus 4 processes, each recording and judging
   ``--per-writer`` selections at once; every id a writer got back must be in the store, judged;
3. kill -9: a writer process loops record + judge and prints each id after its commit; it is
   killed with SIGKILL mid-stream, ``--kills`` times; every printed id must be in the store,
   judged, and ``PRAGMA integrity_check`` must say ok.

    python -m benchmarks.feedback_writes [--writes 2000] [--per-writer 50] [--kills 5]

Writes benchmarks/results/feedback_writes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from capplug.feedback import FeedbackStore

RESULTS = Path(__file__).parent / "results"
WORDS = "the a capital answer question model river city planet number colour language".split()

WRITER = """
import json, sys
from capplug.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
candidates = json.loads(sys.argv[2])
count = int(sys.argv[3])
done = 0
while count < 0 or done < count:
    sid = store.record("a question", candidates, 0)
    store.add(sid, label=1.0)
    print(sid, flush=True)
    done += 1
"""


def _candidates(rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(8)]


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(pick(0.9) * 1000, 3),
        "p99_ms": round(pick(0.99) * 1000, 3),
    }


def latency(path: Path, writes: int) -> dict[str, dict[str, float]]:
    store = FeedbackStore(path)
    rng = random.Random(0)
    candidates = _candidates(rng)
    records, judgements = [], []
    for _ in range(writes):
        started = time.perf_counter()
        sid = store.record(
            "a question about " + rng.choice(WORDS),
            candidates,
            0,
            scores=[rng.random() for _ in candidates],
        )
        middle = time.perf_counter()
        store.add(sid, label=rng.random())
        judgements.append(time.perf_counter() - middle)
        records.append(middle - started)
    return {"record": _percentiles(records), "judge": _percentiles(judgements)}


def concurrency(path: Path, per_writer: int) -> dict[str, int]:
    store = FeedbackStore(path)
    candidates = _candidates(random.Random(1))
    got: list[str] = []
    lock = threading.Lock()
    errors: list[str] = []

    def writer() -> None:
        try:
            for _ in range(per_writer):
                sid = store.record("q", candidates, 0)
                store.add(sid, preferred=1)
                with lock:
                    got.append(sid)
        except Exception as error:
            errors.append(repr(error))

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), json.dumps(candidates), str(per_writer)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    threads = [threading.Thread(target=writer) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        out, _ = process.communicate()
        got += out.split()
    missing = sum(1 for sid in got if not store.selection(sid)["judgements"])
    return {
        "writers": 36,
        "acknowledged": len(got),
        "expected": 36 * per_writer,
        "errors": len(errors),
        "lost": missing + (36 * per_writer - len(got)),
    }


def kills(path: Path, times: int) -> dict[str, int]:
    FeedbackStore(path)
    candidates = _candidates(random.Random(2))
    acknowledged: list[str] = []
    for round_ in range(times):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), json.dumps(candidates), "-1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        for _ in range(20 + 10 * round_):
            acknowledged.append(child.stdout.readline().strip())
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        acknowledged += [line.strip() for line in child.stdout if line.strip()]
    store = FeedbackStore(path)
    lost = sum(1 for sid in acknowledged if not store.selection(sid)["judgements"])
    with sqlite3.connect(path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {
        "kills": times,
        "acknowledged": len(acknowledged),
        "lost": lost,
        "integrity_ok": int(integrity == "ok"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--per-writer", type=int, default=50)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capplug-feedback-") as tmp:
        folder = Path(tmp)
        result = {
            "latency": latency(folder / "latency.sqlite3", args.writes),
            "concurrency": concurrency(folder / "concurrency.sqlite3", args.per_writer),
            "kill9": kills(folder / "kill.sqlite3", args.kills),
            "machine": {
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "settings": vars(args),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feedback_writes.json").write_text(json.dumps(result, indent=2) + "\n")
    lat, conc, kill = result["latency"], result["concurrency"], result["kill9"]
    lines = [
        "| what | p50 | p90 | p99 |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} ({args.writes} writes, one writer) | {v['p50_ms']} ms | {v['p90_ms']} ms "
            f"| {v['p99_ms']} ms |"
            for name, v in lat.items()
        ),
        "",
        f"- {conc['writers']} concurrent writers (32 threads, 4 processes): {conc['acknowledged']}"
        f" of {conc['expected']} writes acknowledged, {conc['errors']} errors, {conc['lost']} lost",
        f"- {kill['kills']} writers killed with SIGKILL mid-stream: {kill['acknowledged']} "
        f"acknowledged writes, {kill['lost']} lost, integrity check "
        f"{'ok' if kill['integrity_ok'] else 'FAILED'}",
        f"- SQLite {sqlite3.sqlite_version}, WAL, synchronous=NORMAL; {platform.platform()}, "
        f"{os.cpu_count()} cores",
    ]
    (RESULTS / "feedback_writes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
