"""Building the scorer's weakly labelled training data from the task pool, one Parquet shard per task.

A build folder holds ``build.json`` (the settings and what each shard holds) and
``shards/<task>.parquet``. Every shard is written atomically, so a build that is stopped and
started again with the same settings skips the tasks it finished. The shards load with
``datasets.load_dataset("parquet", data_dir=...)`` or ``capplug train --data``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from capplug._cache import share_like_umask, write_json_atomic
from capplug.data.labels import LabelledRow, label_candidates, label_clipped, reference_rows
from capplug.data.pool import Pool, open_pool
from capplug.data.tasks import Example
from capplug.errors import DataError

__all__ = [
    "BuildConfig",
    "BuildResult",
    "CandidateSource",
    "EndpointCandidateSource",
    "LocalCandidateSource",
    "build_dataset",
    "clip_build",
    "merge_builds",
]

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
COLUMNS = ("task", "example_id", "instruction", "response", "label", "source", "generator")


class CandidateSource(Protocol):
    """Anything that answers prompts with several candidates, each with its settings."""

    name: str

    def candidates(self, prompts: Sequence[str]) -> list[list[tuple[str, str]]]:
        """For each prompt, its candidates as ``(text, settings)`` pairs."""
        ...


class LocalCandidateSource:
    """Candidates sampled from a local chat model by a recipe (Cappy's by default)."""

    def __init__(
        self, model: Any, *, recipe: Any = None, seed: int = 0, batch_size: int = 16
    ) -> None:
        from capplug.llms.local import CAPPY_RECIPE, RECIPES

        if isinstance(recipe, str):
            if recipe not in RECIPES:
                raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
            recipe = RECIPES[recipe]

        self.model = model
        self.recipe = recipe or CAPPY_RECIPE
        self.seed = seed
        self.batch_size = batch_size
        strategies = ",".join(f"{s.name}x{s.n}" for s in self.recipe.strategies)
        self.name = json.dumps(
            {
                "model": model.name,
                "strategies": strategies,
                "max_new_tokens": self.recipe.max_new_tokens,
                "seed": seed,
            },
            sort_keys=True,
        )

    @classmethod
    def from_pretrained(
        cls, ref: str, *, recipe: Any = None, seed: int = 0, batch_size: int = 16
    ) -> LocalCandidateSource:
        from capplug.llms.local import LocalChatModel

        return cls(
            LocalChatModel.from_pretrained(ref), recipe=recipe, seed=seed, batch_size=batch_size
        )

    def candidates(self, prompts: Sequence[str]) -> list[list[tuple[str, str]]]:
        sampled = self.model.sample_candidates(
            list(prompts),
            recipe=self.recipe,
            seed=self.seed,
            batch_size=self.batch_size,
            progress=False,
        )
        return [[(c.text, c.strategy) for c in row] for row in sampled]


class EndpointCandidateSource:
    """Candidates from a model behind an OpenAI-compatible endpoint (a larger model, a cluster).

    ``model`` is a :class:`capplug.llms.remote.OpenAICompatibleModel`; the recipe is
    :data:`capplug.llms.remote.ENDPOINT_RECIPE` unless given.
    """

    def __init__(
        self, model: Any, *, recipe: Any = None, max_tokens: int = 64, seed: int = 0
    ) -> None:
        from capplug.llms.remote import ENDPOINT_RECIPE

        self.model = model
        self.recipe = tuple(recipe or ENDPOINT_RECIPE)
        self.max_tokens = max_tokens
        self.seed = seed
        self.name = json.dumps(
            {
                "model": model.name,
                "strategies": ",".join(f"{s.settings()}x{s.n}" for s in self.recipe),
                "max_new_tokens": max_tokens,
                "seed": seed,
            },
            sort_keys=True,
        )

    def candidates(self, prompts: Sequence[str]) -> list[list[tuple[str, str]]]:
        return self.model.candidates(
            prompts, recipe=self.recipe, max_tokens=self.max_tokens, seed=self.seed
        )


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one data build; a rerun must use the same ones to resume."""

    split: Literal["train"] = "train"
    """Only ``train`` tasks are ever trained on."""
    max_per_task: int = 32
    """Examples drawn per task (seeded), so large tasks do not swamp small ones."""
    max_per_family: int | None = None
    """Examples drawn per family (a dataset's templates or subtasks together), shared evenly
    among its tasks, so a dataset with hundreds of subtasks does not swamp the others; ``None``:
    no cap beyond ``max_per_task``."""
    max_options: int = 8
    """Options kept per multiple-choice example: every positive one, then a seeded draw."""
    seed: int = 0
    generator: str = ""
    """Settings of the candidate source, empty for none (references, negatives and options only)."""
    max_prompt_chars: int = 4000
    """Examples with longer prompts are skipped: the scorer only reads their end anyway."""
    sample_per_task: int | None = None
    """Examples per task that get sampled candidates (the first of the drawn ones); ``None``: all.
    Sampling is the slow part of a build, so a cap lets every task contribute some."""
    sample_skip: int = 0
    """Drawn examples passed over before the sampled ones: a second build with ``sample_skip``
    equal to the first one's ``sample_per_task`` samples new examples of the same draw."""
    clip_candidates: bool = False
    """Also label each sampled candidate's first line and first sentence (``clipped`` rows), so
    a scorer sees short right answers beside the long ones that drift on."""


@dataclass
class BuildResult:
    out_dir: Path
    shards_written: int
    shards_skipped: int
    rows: int
    seconds: float


def build_dataset(
    out_dir: str | Path,
    *,
    config: BuildConfig | None = None,
    source: CandidateSource | None = None,
    tasks: Sequence[str] | None = None,
    data: str | os.PathLike[str] | Pool | None = None,
    progress: bool = True,
    task_loader: Callable[[str], Any] | None = None,
) -> BuildResult:
    """Write one labelled shard per train task of the pool into ``out_dir``, skipping shards
    already written.

    Args:
        tasks: names of train tasks (``bigbench/anachronisms``, or a bare name when only one
            task has it); by default every train task of the pool.
        data: the task pool (a path or :class:`~capplug.data.pool.Pool`); by default
            ``$CAPPLUG_DATA`` or ``../shared/data`` beside a source checkout.
        task_loader: loads a task by name instead of the pool (tests).

    A task whose file is unusable is skipped with a warning (its shard is not written, so a
    rerun tries it again), unless the pool is strict.

    Raises:
        ValueError: ``out_dir`` holds a build with other settings, or a task is not a train task.
        NoDataError: no task data was found.
    """
    config = config or BuildConfig()
    if config.split != "train":
        raise ValueError(
            f"split must be 'train': only train tasks are trained on; got {config.split!r}"
        )
    if config.max_per_task < 1 or config.max_options < 1:
        raise ValueError("max_per_task and max_options must be >= 1")
    if config.max_per_family is not None and config.max_per_family < 1:
        raise ValueError(f"max_per_family must be >= 1 (or None); got {config.max_per_family}")
    if config.sample_per_task is not None and config.sample_per_task < 0:
        raise ValueError("sample_per_task must be >= 0 (or None for every drawn example)")
    if config.sample_skip < 0:
        raise ValueError(f"sample_skip must be >= 0; got {config.sample_skip}")
    if source is not None and config.generator != source.name:
        config = BuildConfig(**{**asdict(config), "generator": source.name})
    caps: dict[str, int] = {}
    if task_loader is not None:
        names = list(tasks or ())
        load = task_loader
    else:
        pool = open_pool(data)
        names = _train_names(pool, tasks)
        load = pool.load
        if config.max_per_family is not None:
            caps = _family_caps(pool, config.max_per_family)

    out = Path(out_dir).expanduser().resolve()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    state = _load_state(out, config)

    def task_rows(name: str) -> tuple[list[LabelledRow], int] | None:
        try:
            task = load(name)
        except DataError as exc:
            if task_loader is None and pool.strict:
                raise
            logger.warning("skipped task %s: %s", name, exc)
            return None
        examples = _draw(task.examples, config, name, caps.get(name, config.max_per_task))
        return _rows(examples, config, source), len(examples)

    return _write_shards(out, state, names, task_rows, desc="building", progress=progress)


def _train_names(pool: Pool, tasks: Sequence[str] | None) -> list[str]:
    """The pool's names of ``tasks`` (every train task by default), refusing any other split."""
    if tasks is None:
        return pool.names("train")
    names = []
    for name in tasks:
        resolved = pool.resolve(name)
        if pool.entry(resolved).split != "train":
            raise ValueError(
                f"{resolved} is a {pool.entry(resolved).split} task: only train tasks of "
                f"{pool.root} are trained on"
            )
        names.append(resolved)
    return list(dict.fromkeys(names))


def _write_shards(
    out: Path,
    state: dict[str, Any],
    names: Sequence[str],
    task_rows: Callable[[str], tuple[list[LabelledRow], int] | None],
    *,
    desc: str,
    progress: bool,
) -> BuildResult:
    """Write each task's shard that ``state`` does not list yet, recording it after each one."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    written = skipped = 0
    bar = tqdm(names, desc=desc, unit="task", disable=not progress, dynamic_ncols=True)
    for name in bar:
        shard = _shard_path(out, name)
        if shard.is_file() and name in state["shards"]:
            skipped += 1
            continue
        bar.set_postfix_str(name[-40:])
        made = task_rows(name)
        if made is None:
            continue
        rows, examples = made
        _write_shard(shard, rows)
        state["shards"][name] = {"rows": len(rows), "examples": examples}
        write_json_atomic(out / BUILD_FILE, state)
        written += 1
    total = sum(s["rows"] for s in state["shards"].values())
    return BuildResult(out, written, skipped, total, time.monotonic() - started)


def _family_caps(pool: Pool, per_family: int) -> dict[str, int]:
    """Each train task's share of its family's examples (at least one each)."""
    sizes: dict[str, int] = defaultdict(int)
    for name in pool.names("train"):
        sizes[pool.family(name)] += 1
    return {
        name: max(1, -(-per_family // sizes[pool.family(name)])) for name in pool.names("train")
    }


def _draw(
    examples: list[Example], config: BuildConfig, task: str, cap: int | None = None
) -> list[Example]:
    limit = min(config.max_per_task, cap or config.max_per_task)
    usable = [e for e in examples if e.targets and len(e.prompt) <= config.max_prompt_chars]
    if len(usable) <= limit:
        return usable
    rng = random.Random(f"{config.seed}\x00{task}")
    # the draw for a smaller cap is the start of the draw for a larger one
    draw = rng.sample(range(len(usable)), min(config.max_per_task, len(usable)))
    chosen = sorted(draw[:limit])
    return [usable[i] for i in chosen]


def _rows(
    examples: list[Example], config: BuildConfig, source: CandidateSource | None
) -> list[LabelledRow]:
    if not examples:
        return []
    rows = list(reference_rows(examples, seed=config.seed))
    by_example: dict[int, list[LabelledRow]] = defaultdict(list)
    for row in rows:
        by_example[row.example_id].append(row)
    kept: list[LabelledRow] = []
    for example_id, group in by_example.items():
        options = [r for r in group if r.source == "option"]
        kept += [r for r in group if r.source != "option"]
        if len(options) > config.max_options:
            rng = random.Random(f"{config.seed}\x00options\x00{example_id}")
            positives = [r for r in options if r.label > 0]
            others = [r for r in options if r.label <= 0]
            room = max(config.max_options - len(positives), 0)
            options = positives[: config.max_options] + rng.sample(others, min(room, len(others)))
        kept += options
    if source is not None:
        end = (
            None if config.sample_per_task is None else config.sample_skip + config.sample_per_task
        )
        chosen = examples[config.sample_skip : end]
        sampled = source.candidates([e.prompt for e in chosen]) if chosen else []
        for example, candidates in zip(chosen, sampled, strict=True):
            rows = label_candidates(example, candidates)
            kept += rows
            if config.clip_candidates:
                kept += label_clipped(rows, example.targets)
    return kept


def clip_build(src_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> BuildResult:
    """Copy a finished build into ``out_dir`` with its sampled candidates' clipped variants added.

    The result holds the same rows as building with ``clip_candidates=True`` would, without
    sampling again: the references to label against are the build's own ``gold`` rows. Shards
    already in ``out_dir`` are skipped, so a stopped run resumes; ``src_dir`` is only read.

    Raises:
        FileNotFoundError: ``src_dir`` holds no build.
        ValueError: ``src_dir`` already has clipped rows, or ``out_dir`` holds another build.
    """
    import pyarrow.parquet as pq

    src = Path(src_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    source_state = _read_build(src)
    if out == src:
        raise ValueError("out_dir must differ from src_dir: the source build is only read")
    if "merged_from" in source_state:
        raise ValueError(
            f"{src} is a merge of builds: clip each build, then merge the clipped ones"
        )
    recorded = {**asdict(BuildConfig()), **(source_state.get("config") or {})}
    if recorded["clip_candidates"]:
        raise ValueError(f"{src} already holds clipped candidates")
    if not recorded["generator"]:
        raise ValueError(
            f"{src} was built without --generator: it has no sampled candidates to clip"
        )
    config = BuildConfig(**{**recorded, "clip_candidates": True})
    (out / "shards").mkdir(parents=True, exist_ok=True)
    state = _load_state(out, config)
    names = [name for name in source_state.get("shards", {}) if _shard_path(src, name).is_file()]

    def task_rows(name: str) -> tuple[list[LabelledRow], int]:
        rows = [LabelledRow(**r) for r in pq.read_table(_shard_path(src, name)).to_pylist()]
        by_example: dict[int, list[LabelledRow]] = defaultdict(list)
        for row in rows:
            by_example[row.example_id].append(row)
        out_rows: list[LabelledRow] = []
        for group in by_example.values():
            out_rows += group
            references = [r.response for r in group if r.source == "gold"]
            if references:
                out_rows += label_clipped(group, references)
        return out_rows, source_state["shards"][name].get("examples", len(by_example))

    return _write_shards(out, state, names, task_rows, desc="clipping", progress=progress)


def _write_shard(path: Path, rows: list[LabelledRow]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("task", pa.string()),
            ("example_id", pa.int64()),
            ("instruction", pa.string()),
            ("response", pa.string()),
            ("label", pa.float32()),
            ("source", pa.string()),
            ("generator", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([r.to_dict() for r in rows], schema=schema)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        share_like_umask(tmp)  # mkstemp's 0600 would keep other users out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_path(out: Path, task: str) -> Path:
    return out / "shards" / (task.replace("/", "__") + ".parquet")


def _read_build(folder: Path) -> dict[str, Any]:
    """The ``build.json`` of a finished build (or merge) that is read, never written."""
    if not (folder / BUILD_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no {BUILD_FILE}: give a folder `capplug data build` wrote"
        )
    return json.loads((folder / BUILD_FILE).read_text())


def _load_state(out: Path, config: BuildConfig) -> dict[str, Any]:
    path = out / BUILD_FILE
    settings = asdict(config)
    if path.is_file():
        state = json.loads(path.read_text())
        # settings added since a build was started take their defaults, so it still resumes
        recorded = {**asdict(BuildConfig()), **(state.get("config") or {})}
        if recorded != settings:
            raise ValueError(
                f"{out} holds a build with other settings ({state.get('config')}); use the same "
                f"settings to resume, or a new --out folder"
            )
        return state
    state = {"config": settings, "columns": list(COLUMNS), "shards": {}}
    write_json_atomic(path, state)
    return state


def merge_builds(
    src_dirs: Sequence[str | Path], out_dir: str | Path, *, progress: bool = True
) -> BuildResult:
    """Merge finished builds into ``out_dir``: per task, every row once.

    Builds of the same draw (two generators, or a second build with ``sample_skip``) share their
    references, negatives and options; a row is kept once per (example, source, response), the
    first build's copy first. Shards already merged are skipped, so a stopped run resumes; a
    folder holding a merge of other builds is refused. The sources are only read.

    Raises:
        FileNotFoundError: a source holds no build.
        ValueError: fewer than two sources, or ``out_dir`` is one of them or holds another merge.
    """
    import pyarrow.parquet as pq

    srcs = [Path(d).expanduser().resolve() for d in src_dirs]
    out = Path(out_dir).expanduser().resolve()
    if len(srcs) < 2:
        raise ValueError(f"give at least two builds to merge; got {len(srcs)}")
    if out in srcs:
        raise ValueError("out_dir must differ from every source: the sources are only read")
    states = [_read_build(src) for src in srcs]
    merged_from = [
        {"path": str(src), "config": st.get("config")} for src, st in zip(srcs, states, strict=True)
    ]
    path = out / BUILD_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("merged_from") != merged_from:
            raise ValueError(
                f"{out} holds another build or merge; use the same sources to resume, or a new "
                f"--out folder"
            )
    else:
        state = {"merged_from": merged_from, "columns": list(COLUMNS), "shards": {}}
        write_json_atomic(path, state)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(name for st in states for name in st.get("shards", {})))

    def task_rows(name: str) -> tuple[list[LabelledRow], int]:
        rows: list[LabelledRow] = []
        seen: set[tuple[int, str, str]] = set()
        for src in srcs:
            part = _shard_path(src, name)
            if not part.is_file():
                continue
            for raw in pq.read_table(part).to_pylist():
                key = (raw["example_id"], raw["source"], raw["response"])
                if key not in seen:
                    seen.add(key)
                    rows.append(LabelledRow(**raw))
        return rows, len({row.example_id for row in rows})

    return _write_shards(out, state, names, task_rows, desc="merging", progress=progress)
