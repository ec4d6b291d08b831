"""``capplug store list | show | lookup | create | import | check | pin | rm | gc | verify``: the
adapter store.

The same commands stay under ``capplug adapters``, where they were first. :func:`register` adds
them to an argparse subparsers object; each sets ``run`` to a function that takes the parsed
arguments and returns the exit status, and raises :class:`~capplug.errors.CapplugError` or
:class:`ValueError` for bad input (the caller prints those as one line).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from capplug.chat import blank, one_line
from capplug.cli._common import add_device_option, add_hypernet_option
from capplug.errors import CapplugError
from capplug.models import DEFAULT_CHAT_MODEL, DEFAULT_SCORER

__all__ = ["add_parser", "hypernetwork_version", "register"]

DEFAULT_BASE = DEFAULT_CHAT_MODEL
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def add_parser(sub: Any) -> None:
    """``capplug store``: the store-admin commands under their own name."""
    store = sub.add_parser("store", help="list, look up, create, import and tidy stored adapters")
    register(store.add_subparsers(title="store commands", metavar="ACTION"))
    store.set_defaults(run=lambda _args: store.print_help() or 2)


def register(subparsers: Any) -> None:
    """Add the adapter-store commands to ``subparsers`` (from ``add_subparsers()``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=os.environ.get("CAPPLUG_ADAPTER_STORE", "adapters_store"),
        metavar="DIR",
        help="store folder (default: $CAPPLUG_ADAPTER_STORE or adapters_store)",
    )
    common.add_argument(
        "--base",
        metavar="REF",
        help=f"the base model the adapters are for (default: {DEFAULT_BASE}; for create: the "
        f"hypernetwork's)",
    )
    common.add_argument(
        "--chroma-url", metavar="URL", help="a shared Chroma server (chroma run) to index in"
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    _add_list(subparsers, common)
    _add_show(subparsers, common)
    _add_lookup(subparsers, common)
    _add_create(subparsers, common)
    _add_import(subparsers, common)
    _add_check(subparsers, common)
    _add_pin(subparsers, common)

    rm = subparsers.add_parser("rm", parents=[common], help="delete adapters")
    rm.add_argument("ids", nargs="+", metavar="ID", type=str.strip)
    rm.set_defaults(run=_run_rm)

    _add_gc(subparsers, common)
    _add_verify(subparsers, common)


def _add_list(subparsers: Any, common: Any) -> None:
    ls = subparsers.add_parser(
        "list", parents=[common], help="list stored adapters, most recently used first"
    )
    ls.add_argument("--order", choices=("last_used", "created"), default="last_used")
    ls.add_argument("--limit", type=int, metavar="N", help="show at most N")
    ls.set_defaults(run=_run_list)


def _add_show(subparsers: Any, common: Any) -> None:
    show = subparsers.add_parser(
        "show", parents=[common], help="one adapter's record, with its files checked"
    )
    show.add_argument("id", metavar="ID", type=str.strip)
    show.set_defaults(run=_run_show)


def _add_lookup(subparsers: Any, common: Any) -> None:
    lookup = subparsers.add_parser(
        "lookup", parents=[common], help="stored adapters for an instruction, best first"
    )
    lookup.add_argument("--instruction", required=True, metavar="TEXT")
    lookup.add_argument("--threshold", type=float, help="least similarity (default: 0.8)")
    lookup.add_argument("-k", type=int, default=3, help="most matches (default: 3)")
    lookup.set_defaults(run=_run_lookup)


def _add_create(subparsers: Any, common: Any) -> None:
    create = subparsers.add_parser(
        "create",
        parents=[common],
        help="find the adapter for an instruction, or have the hypernetwork make and store it",
    )
    create.add_argument("--instruction", required=True, metavar="TEXT")
    add_hypernet_option(create)
    create.add_argument("--threshold", type=float, help="least similarity of a hit (default: 0.8)")
    create.add_argument("--max-adapters", type=int, metavar="N", help="evict beyond N adapters")
    create.add_argument("--max-bytes", type=_size, metavar="SIZE", help="evict beyond SIZE (2G)")
    create.set_defaults(run=_run_create)


def _add_import(subparsers: Any, common: Any) -> None:
    imp = subparsers.add_parser(
        "import", parents=[common], help="store a peft LoRA folder made for the base model"
    )
    imp.add_argument("folder", metavar="FOLDER")
    imp.add_argument("--instruction", required=True, metavar="TEXT", help="what it was made for")
    imp.add_argument("--source", choices=("imported", "trained"), default="imported")
    imp.add_argument("--name", metavar="NAME", help="a unique name to address it by (sql-lora)")
    imp.set_defaults(run=_run_import)


def _add_check(subparsers: Any, common: Any) -> None:
    check = subparsers.add_parser(
        "check",
        parents=[common],
        help="judge an adapter's answer against the bare base model's, and keep the verdict",
        description="Answer a probe with the adapter and with the base model (the instruction "
        "in its prompt), let the selector judge, and keep the verdict with the adapter: one that "
        "lost is kept but not used (the adapter service and `capplug adapters answer --judge` "
        "answer its instruction with the base model) until checked again or pinned.",
    )
    check.add_argument("id", metavar="ID", type=str.strip)
    check.add_argument(
        "--probe",
        metavar="TEXT",
        help="an example input of the task (default: one the base model writes)",
    )
    check.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"the scorer the selector judges with (default: {DEFAULT_SCORER})",
    )
    check.add_argument(
        "--judge-tokens", type=int, default=64, metavar="N", help="longest answer (default: 64)"
    )
    add_device_option(check)
    check.set_defaults(run=_run_check)


def _add_pin(subparsers: Any, common: Any) -> None:
    pin = subparsers.add_parser(
        "pin",
        parents=[common],
        help="use an adapter, or the base model, for its instruction whatever its check says",
    )
    pin.add_argument("id", metavar="ID", type=str.strip)
    pin.add_argument(
        "side",
        choices=("adapter", "base", "none"),
        help="adapter: always the adapter; base: always the base model; none: the check decides",
    )
    pin.set_defaults(run=_run_pin)


def _add_gc(subparsers: Any, common: Any) -> None:
    gc = subparsers.add_parser(
        "gc", parents=[common], help="evict least recently used adapters beyond a limit"
    )
    gc.add_argument("--max-adapters", type=int, metavar="N", help="keep at most N adapters")
    gc.add_argument("--max-bytes", type=_size, metavar="SIZE", help="keep at most SIZE (500M, 2G)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    gc.set_defaults(run=_run_gc)


def _add_verify(subparsers: Any, common: Any) -> None:
    verify = subparsers.add_parser(
        "verify",
        parents=[common],
        help="find index rows without files, files without rows, corrupt files and duplicates",
    )
    verify.add_argument("--repair", action="store_true", help="fix what is found")
    verify.add_argument("--quick", action="store_true", help="skip re-hashing every file")
    verify.set_defaults(run=_run_verify)


# ------------------------------------------------------------------------------- commands


def _run_list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    with _open(args, existing=True) as store:
        records = store.list_adapters(order=args.order)
        total, total_bytes = len(records), sum(r.size for r in records)
        records = records[: args.limit] if args.limit else records
    if args.json:
        _print_json([r.to_dict() for r in records])
        return 0
    print(f"{total} adapters for {store.base_model} in {store.root} ({_human(total_bytes)})")
    for r in records:
        marks = f"[{r.name}] " if r.name else ""
        if r.falls_back:
            marks += "(base answers) "
        print(
            f"{r.id}  {r.source:<9}  r={r.rank:<3} {_human(r.size):>8}  "
            f"{_when(r.last_used)}  {marks}{one_line(r.instruction, 60)}"
        )
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from capplug.adapters.store import CorruptAdapterError

    with _open(args, existing=True) as store:
        record = store.resolve(args.id)
        try:
            store.files(record.id)
            files = "ok (sha256 checked)"
        except CorruptAdapterError as exc:
            files = f"BAD: {exc}"
    if args.json:
        _print_json({**record.to_dict(), "files": files})
        return 0 if files.startswith("ok") else 1
    data = record.to_dict()
    data["target_modules"] = ", ".join(record.target_modules)
    data["created"] = _when(record.created)
    data["last_used"] = _when(record.last_used)
    data["size"] = _human(record.size)
    data["check"] = verdict(record)
    data["pinned"] = record.pinned or "-"
    data["answers"] = _answered_by(record)
    for key, value in data.items():
        print(f"{key:>21}: {value}")
    print(f"{'files':>21}: {files}")
    return 0 if files.startswith("ok") else 1


def verdict(record: Any) -> str:
    """An adapter's check in one line, or ``-``."""
    check = record.check
    if check is None:
        return "-"
    return (
        f"{check.winner} won (adapter {check.adapter_score:.3f}, base {check.base_score:.3f}; "
        f"{check.judge}, {_when(check.checked)}) on {one_line(check.probe, 50)!r}"
    )


def _answered_by(record: Any) -> str:
    """Who answers the adapter's instruction: the adapter, or the base model it falls back to."""
    return "the base model" if record.falls_back else "the adapter"


def _run_check(args: argparse.Namespace) -> int:
    if args.judge_tokens < 1:
        raise ValueError(f"--judge-tokens must be >= 1; got {args.judge_tokens}")
    if args.probe is not None and blank(args.probe):
        raise ValueError("--probe is empty; give an example input of the task, or leave it out")
    from capplug.adapters.fallback import AdapterJudge
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.selection import Reranker

    with _open(args, existing=True) as store:
        record = store.resolve(args.id)  # an unknown id fails before any model loads
        runtime = AdapterRuntime.from_pretrained(
            args.base or DEFAULT_BASE, max_loaded=1, device=args.device
        )
        judge = AdapterJudge(runtime, Reranker(args.scorer), max_new_tokens=args.judge_tokens)
        checked, comparison = judge.check(store, record.id, probe=args.probe)
    if args.json:
        _print_json({**checked.to_dict(), "answers": dict(comparison.answers)})
        return 0
    print(f"{checked.id}: {verdict(checked)}")
    for side in ("adapter", "base"):
        print(f"  {side:>7}: {one_line(comparison.answers[side], 100)}")
    print(f"requests for its instruction are answered by {_answered_by(checked)}")
    return 0


def _run_pin(args: argparse.Namespace) -> int:
    side = None if args.side == "none" else args.side
    with _open(args, existing=True) as store:
        record = store.pin(store.resolve(args.id).id, side)
    if args.json:
        _print_json(record.to_dict())
        return 0
    how = f"pinned to {side}" if side else "unpinned: its check decides"
    print(f"{record.id} {how}; requests for its instruction are answered by {_answered_by(record)}")
    return 0


def _run_lookup(args: argparse.Namespace) -> int:
    with _open(args, existing=True) as store:
        matches = store.lookup(args.instruction, threshold=args.threshold, k=args.k)
    if args.json:
        _print_json([{"similarity": m.similarity, **m.record.to_dict()} for m in matches])
        return 0
    if not matches:
        print("no stored adapter is similar enough")
    for m in matches:
        print(f"{m.record.id}  {m.similarity:.3f}  {one_line(m.record.instruction, 70)}")
    return 0


def _run_create(args: argparse.Namespace) -> int:
    from capplug.adapters.store import AdapterStore

    if blank(args.instruction):
        raise ValueError("--instruction is empty; give the task's instruction text")
    hypernet = _load_hypernetwork(args.hypernet, args.device)
    base = hypernet.config.base_model
    if args.base is not None:
        from capplug.models.adapter_folder import WrongBaseModelError, canonical_model_name

        if canonical_model_name(args.base).casefold() != base.casefold():
            raise WrongBaseModelError(
                f"the hypernetwork {args.hypernet} makes adapters for {base}, not for "
                f"{canonical_model_name(args.base)} (--base); drop --base or pass a hypernetwork "
                f"for that model"
            )
    with AdapterStore(
        args.store,
        base_model=base,
        chroma_url=args.chroma_url,
        generator=hypernet.generate,
        hypernetwork_version=hypernetwork_version(hypernet),
        max_adapters=args.max_adapters,
        max_bytes=args.max_bytes,
        **({"threshold": args.threshold} if args.threshold is not None else {}),
    ) as store:
        result = store.get_or_create(args.instruction)
        folder = store.files(result.record.id).folder
    similarity = None if result.similarity is None else round(result.similarity, 4)
    if args.json:
        _print_json(
            {
                "id": result.record.id,
                "hit": result.hit,
                "similarity": similarity,
                "folder": str(folder),
                "set_aside": list(result.set_aside),
            }
        )
        return 0
    for corrupt in result.set_aside:
        print(f"set aside {corrupt} (corrupt; moved to {store.root / '.corrupt'})")
    how = "hit" if result.hit else "made"
    print(f"{how} {result.record.id} (similarity {similarity if similarity is not None else '-'})")
    print(folder)
    return 0


def _run_import(args: argparse.Namespace) -> int:
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder {args.folder}")
    with _open(args, existing=False) as store:
        record = store.import_folder(folder, args.instruction, source=args.source, name=args.name)
    if args.json:
        _print_json(record.to_dict())
        return 0
    named = f" as {record.name!r}" if record.name else ""
    print(f"imported {record.id}{named} ({_human(record.size)}, r={record.rank})")
    print(record.folder)
    return 0


def _run_rm(args: argparse.Namespace) -> int:
    with _open(args, existing=True) as store:
        records = [store.resolve(i) for i in args.ids]  # every one checked before any goes
        for record in records:
            store.remove(record.id)
    if args.json:
        _print_json([r.id for r in records])
    else:
        for record in records:
            print(f"removed {record.id}")
    return 0


def _run_gc(args: argparse.Namespace) -> int:
    if args.max_adapters is None and args.max_bytes is None:
        raise ValueError("give --max-adapters N and/or --max-bytes SIZE")
    with _open(args, existing=True) as store:
        evicted = store.gc(
            max_adapters=args.max_adapters, max_bytes=args.max_bytes, dry_run=args.dry_run
        )
        left = len(store)
    if args.json:
        _print_json({"evicted": [r.id for r in evicted], "dry_run": args.dry_run})
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    freed = _human(sum(r.size for r in evicted))
    print(f"{verb} {len(evicted)} adapters ({freed}); {left} in the index now")
    for record in evicted:
        print(f"  {record.id}  {_when(record.last_used)}  {one_line(record.instruction, 60)}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    with _open(args, existing=True) as store:
        check = not args.quick
        report = (
            store.repair(check_hashes=check) if args.repair else store.verify(check_hashes=check)
        )
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"{report.adapters} adapters indexed")
        for label, ids in (
            ("index rows without files", report.rows_without_files),
            ("files without index rows", report.files_without_rows),
            ("corrupt", report.corrupt),
            ("leftovers of interrupted writes", report.stale_staging),
            (
                "duplicates (same instruction as the adapter kept)",
                [f"{dup} (of {kept})" for dup, kept in report.duplicates.items()],
            ),
        ):
            if ids:
                print(f"{label}: {', '.join(ids)}")
        for action in report.actions:
            print(f"  {action}")
        if report.ok:
            print("ok")
        elif not args.repair:
            print("run `capplug store verify --repair` to fix it")
    return 0 if report.ok or args.repair else 1


# ------------------------------------------------------------------------------- helpers


def _open(args: argparse.Namespace, *, existing: bool) -> Any:
    from capplug.adapters.store import AdapterStore, AdapterStoreError

    root = Path(args.store).expanduser()
    if existing and args.chroma_url is None and not (root / "index").is_dir():
        raise AdapterStoreError(
            f"no adapter store at {root} (pass --store DIR, or make one with `capplug store "
            f"create` or `import`)"
        )
    return AdapterStore(root, base_model=args.base or DEFAULT_BASE, chroma_url=args.chroma_url)


def _load_hypernetwork(ref: str, device: str | None) -> Any:
    try:
        from capplug.adapters.hypernetwork import Hypernetwork
    except ImportError as exc:
        raise CapplugError(
            f"`create` makes adapters with capplug's hypernetwork, which this install cannot "
            f"import ({exc}); add adapters to the store with `capplug store import` instead"
        ) from exc
    from capplug.errors import ModelNotFoundError

    try:
        return Hypernetwork.from_pretrained(ref, device=device)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"no hypernetwork at {ref}: {exc}") from exc


def hypernetwork_version(hypernet: Any) -> str:
    """A fingerprint of the hypernetwork's weights: adapters from equal weights are comparable."""
    digest = hashlib.sha256()
    for name, tensor in sorted(hypernet.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    fmt = getattr(hypernet.config, "format", "hypernetwork")
    return f"{fmt}@{digest.hexdigest()[:12]}"


def _size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500M, 2G or 1048576")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * 1024 ** " kmgt".index(unit or " "))
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return value


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _when(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
