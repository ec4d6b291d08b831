"""``capplug feedback stats | show | add | export``: the recorded selections and their judgements."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capplug.chat import one_line

__all__ = ["add_parser", "open_store"]


def add_parser(sub: Any) -> None:
    """``capplug feedback``: look at, judge and export recorded selections."""
    feedback = sub.add_parser(
        "feedback",
        help="recorded selections and their judgements: stats, show, add, export",
        description=(
            "Selections recorded by the proxy (--feedback) or a Reranker(feedback=...) are judged "
            "with POST /v1/feedback, FeedbackStore.add or `capplug feedback add`; `export` turns "
            "the judged ones into rows for `capplug adapt`."
        ),
    )
    actions = feedback.add_subparsers(title="feedback commands", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="FILE",
        help="the feedback store (default: $CAPPLUG_FEEDBACK_DB or feedback.sqlite3 in the "
        "capplug home)",
    )

    stats = actions.add_parser(
        "stats",
        parents=[common],
        help="how much is recorded and judged, per task, and the task scorers made from it",
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--task-scorers",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="also list the task scorers in DIR (default: $CAPPLUG_TASK_SCORERS or task-scorers "
        "in the capplug home), whether each is used and the guard's figures",
    )
    stats.add_argument(
        "--scorer",
        default=None,
        metavar="REF",
        help="the scorer the task scorers adapt (default: the bundled one)",
    )
    stats.set_defaults(run=_run_stats)

    show = actions.add_parser("show", parents=[common], help="one selection and its judgements")
    show.add_argument("selection_id", metavar="SELECTION_ID")
    show.set_defaults(run=_run_show)

    add = actions.add_parser("add", parents=[common], help="judge a recorded selection")
    add.add_argument("selection_id", metavar="SELECTION_ID")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument("--label", type=float, help="how good a candidate is, in [0, 1]")
    kind.add_argument("--preferred", type=int, metavar="INDEX", help="the candidate to prefer")
    kind.add_argument("--reference", metavar="TEXT", help="the answer that was wanted")
    add.add_argument(
        "--candidate",
        type=int,
        metavar="INDEX",
        help="the candidate --label judges (default: chosen)",
    )
    add.add_argument("--source", metavar="NAME", help="who judged (kept with the judgement)")
    add.set_defaults(run=_run_add)

    export = actions.add_parser(
        "export", parents=[common], help="judged selections as rows for `capplug adapt`"
    )
    export.add_argument("--out", required=True, metavar="FILE", help="a .jsonl or .parquet file")
    export.set_defaults(run=_run_export)
    feedback.set_defaults(run=lambda _args: feedback.print_help() or 2)


def _store(args: argparse.Namespace) -> Any:
    return open_store(args.db)


def open_store(db: str | None) -> Any:
    """The feedback store at ``db`` (default: the default file); a clear error if it is not
    there yet, rather than an empty new one."""
    from capplug.errors import FeedbackError
    from capplug.feedback import FeedbackStore, default_feedback_path

    path = db or default_feedback_path()
    if not Path(path).expanduser().is_file():
        raise FeedbackError(
            f"no feedback store at {path}; run the proxy with --feedback (or a "
            "Reranker(feedback=True)) to record selections"
        )
    return FeedbackStore(path)


def _run_stats(args: argparse.Namespace) -> int:
    stats = _store(args).stats()
    if args.task_scorers is not None:
        stats["task_scorers"] = _task_scorers(args)
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    kinds = stats["judgements"]
    print(f"store:      {stats['path']}")
    print(f"selections: {stats['selections']} recorded, {stats['judged_selections']} judged")
    print(
        f"judgements: {kinds['label']} labels, {kinds['preferred']} preferred, "
        f"{kinds['reference']} references"
    )
    print(f"rows:       {stats['rows']} for `capplug adapt` (capplug feedback export)")
    if stats["tasks"]:
        print("judged selections per task:")
        for entry in stats["tasks"][:10]:
            print(f"  {entry['judged_selections']:6d}  {one_line(entry['task'], 70)}")
    for entry in stats.get("task_scorers", []):
        guard = entry["guard"]
        state = "used" if guard.get("use") else "not used"
        print(f"task scorer {entry['id']} ({state}) for {one_line(entry['instruction'], 70)}")
        seen = guard.get("selections")
        adapted = f"adapted on {seen} judged selections; " if seen is not None else ""
        print(f"  {adapted}guard: {guard.get('reason', '')}")
    return 0


def _task_scorers(args: argparse.Namespace) -> list[dict[str, Any]]:
    from capplug.adapters.task_scorers import TaskScorers
    from capplug.models import DEFAULT_SCORER
    from capplug.scoring import Scorer

    folder = None if args.task_scorers is True else args.task_scorers
    store = TaskScorers(folder, scorer=Scorer.from_pretrained(args.scorer or DEFAULT_SCORER))
    return store.list()


def _run_show(args: argparse.Namespace) -> int:
    print(json.dumps(_store(args).selection(args.selection_id), indent=2, ensure_ascii=False))
    return 0


def _run_add(args: argparse.Namespace) -> int:
    judgement = _store(args).add(
        args.selection_id,
        label=args.label,
        candidate=args.candidate,
        preferred=args.preferred,
        reference=args.reference,
        source=args.source,
    )
    print(json.dumps(judgement.to_dict(), ensure_ascii=False))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    count = _store(args).export(args.out)
    print(
        f"{count} rows written to {args.out}; train on them with: capplug adapt --data {args.out}"
    )
    return 0
