"""benchmarks/rerank_generation.py: its report (the overall means, the per-group table, the
dev lists it ran on) and a run on a small task pool with a fake generator and scorer."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from bench_pool import generation_task, ni_task, write_pool

RERANK = ["bigbench/qa_wikidata", "bigbench/tense"]
I2A = ["natural_instructions_v1/subtask043_essential_terms_answering_incomplete_questions"]
TRAIN = ["bigbench/anachronisms", "bigbench/auto_debugging", "bigbench/bbq_lite"]
GROUPS = {"rerank_generation": RERANK, "instruction_to_adapter": I2A}


@pytest.fixture
def bench() -> ModuleType:
    return importlib.import_module("benchmarks.rerank_generation")


def row(base: float, scorer: float, adapted: float, oracle: float) -> dict[str, float]:
    return {
        "beam": base,
        "lm-sum": base - 1,
        "lm-mean": base,
        "scorer": scorer,
        "adapted": adapted,
        "oracle": oracle,
        "examples": 30,
    }


def result_of(bench: ModuleType, tasks: dict[str, dict[str, float]]) -> dict:
    mean, best, closed = bench.summarise(list(tasks.values()))
    groups = {g: [t for t in names if t in tasks] for g, names in GROUPS.items()}
    return {
        "tasks": tasks,
        "groups": {g: names for g, names in groups.items() if names},
        "mean": mean,
        "best_baseline": best,
        "gap_closed": closed,
    }


def test_each_dev_group_gets_its_own_means_and_gap_closed(bench: ModuleType) -> None:
    rerank = RERANK[:2]
    i2a = I2A[:1]
    tasks = {
        rerank[0]: row(20, 25, 30, 40),
        rerank[1]: row(10, 15, 20, 20),  # group: baseline 15, zero-shot 20, adapted 25, oracle 30
        i2a[0]: row(10, 5, 40, 70),  # baseline 10, oracle 70: zero-shot below, adapted at half
    }
    result = result_of(bench, tasks)
    # Overall: baseline 40/3, oracle 130/3, adapted 90/3: (90 - 40) / (130 - 40) = 56%.
    assert result["gap_closed"]["adapted"] == pytest.approx(50 / 90)
    table = bench.report_lines(result)
    assert "| 2 `dev.rerank_generation` | 15.0 | 20.0 | 25.0 | 30.0 | 33% / 67% |" in table
    assert "| 1 `dev.instruction_to_adapter` | 10.0 | 5.0 | 40.0 | 70.0 | -8% / 50% |" in table


def test_a_run_on_one_group_or_on_train_tasks_has_no_group_table(bench: ModuleType) -> None:
    one_group = {t: row(10, 12, 14, 20) for t in RERANK[:2]}
    assert bench.group_lines(result_of(bench, one_group)) == []
    train = {t: row(10, 12, 14, 20) for t in TRAIN}
    lines = bench.report_lines(result_of(bench, train))
    assert not any("dev." in line for line in lines)
    assert lines[-1].startswith("capplug scorer (adapted): closes 40%")


@pytest.mark.parametrize(
    "flags",
    [["--adapt-lr", "0"], ["--adapt-epochs", "-1"], ["--adapt-rank-weight", "-0.5"]],
)
def test_adaptation_settings_are_checked_before_any_work(
    bench: ModuleType, flags: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def no_work(args, pool):  # the run must stop at the argument check
        raise AssertionError("evaluate was reached")

    monkeypatch.setattr(bench, "evaluate", no_work)
    with pytest.raises(SystemExit) as stop:
        bench.main(flags)
    assert stop.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_adaptation_trains_with_the_chosen_recipe_and_clipped_candidates_on_request(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import capplug
    import capplug.training.scorer as train_module
    from capplug.data import Example

    seen: list[tuple[list, object]] = []
    monkeypatch.setattr(capplug.Scorer, "from_pretrained", classmethod(lambda cls, ref: ref))
    monkeypatch.setattr(
        train_module,
        "train_scorer",
        lambda scorer, pairs, out, *, config, **kw: seen.append((pairs, config)),
    )
    examples = [Example("t", i, f"in {i}", f"Q: in {i}\nA: ", [f"answer {i}"]) for i in range(2)]

    class Cache:
        def get(self, example):
            return [{"text": f"answer {example.index}. Then more.\nAnd more.", "strategy": "beam"}]

    for clip in (False, True):
        bench.adapt_scorer("base", examples, Cache(), "t", 1.0, clip=clip)
    (plain, config), (clipped, _) = seen
    assert (config.epochs, config.learning_rate, config.rank_weight) == (6.0, 5e-5, 1.0)
    # per example: reference, another example's reference as negative, the candidate ...
    assert len(plain) == 2 * 3
    # ... and with clipping its first line and first sentence, the latter labelled 1.0
    assert len(clipped) == 2 * 5
    assert {p.response: p.label for p in clipped}["answer 0."] == pytest.approx(1.0)


def with_examples(base: list[float], scorer: list[float], oracle: list[float]) -> dict:
    """A task row with per-example Rouge-L: all three baselines pick ``base``."""
    per_example = {"beam": base, "lm-sum": base, "lm-mean": base}
    per_example |= {"scorer": scorer, "adapted": scorer, "oracle": oracle}
    row = {name: sum(v) / len(v) for name, v in per_example.items()}
    return row | {"examples": len(base), "per_example": per_example}


def test_paired_intervals_separate_a_steady_gain_from_a_noisy_tie(bench: ModuleType) -> None:
    tasks = RERANK[:2]
    # Scorer 2 points above the baseline on every example: the interval is 2 to 2, and it
    # closes 2 of the 10 points to the oracle on every resample.
    steady = {
        t: with_examples([10.0, 30.0] * 10, [12.0, 32.0] * 10, [20.0, 40.0] * 10) for t in tasks
    }
    result = result_of(bench, steady)
    interval = bench.paired_intervals(result)["scorer"]
    assert interval["margin"] == pytest.approx((2.0, 2.0))
    assert interval["gap_closed"] == pytest.approx((0.2, 0.2))
    # Same means, but the scorer wins by 20 on half the examples and loses by 20 on the
    # others: level on average, and the interval must say that it could be either side.
    noisy = {
        t: with_examples([10.0, 30.0] * 10, [30.0, 10.0] * 10, [40.0, 40.0] * 10) for t in tasks
    }
    lo, hi = bench.paired_intervals(result_of(bench, noisy))["scorer"]["margin"]
    assert lo < -2 and hi > 2
    # the results JSON keeps task names sorted: reloading it must give the same intervals
    noisy[tasks[0]] = with_examples([10.0, 30.0] * 10, [30.0, 10.0, 10.0, 30.0] * 5, [40.0] * 20)
    forward = bench.paired_intervals(result_of(bench, noisy))
    backward = bench.paired_intervals(result_of(bench, dict(reversed(noisy.items()))))
    assert forward == backward
    lines = bench.report_lines(result_of(bench, noisy))
    assert any(
        line.startswith("- capplug scorer (zero-shot): +0.0 points against the best baseline")
        for line in lines
    )
    assert "95% intervals, from 2,000 paired bootstrap resamples of the 40 test examples" in (
        "\n".join(lines)
    )


def test_results_without_per_example_scores_report_no_intervals(bench: ModuleType) -> None:
    tasks = {t: row(10, 12, 14, 20) for t in RERANK[:2]}
    result = result_of(bench, tasks)
    assert bench.paired_intervals(result) == {}
    assert not any("interval" in line for line in bench.report_lines(result))


def test_a_share_that_rounds_to_zero_is_printed_as_zero(bench: ModuleType) -> None:
    rerank = RERANK[:1]
    i2a = I2A[:1]
    # zero-shot a hair below the baseline: -0.1% of the gap, which must not print as "-0%"
    tasks = {rerank[0]: row(10, 9.99, 15, 20), i2a[0]: row(10, 9.99, 15, 20)}
    lines = bench.report_lines(result_of(bench, tasks))
    assert "| 1 `dev.rerank_generation` | 10.0 | 10.0 | 15.0 | 20.0 | 0% / 50% |" in lines
    assert (
        "capplug scorer (zero-shot): is below the best baseline, by 0% of its gap to the oracle."
        in lines
    )


# ------------------------------------------------------------------ a run on a small task pool


@dataclass
class Candidate:
    text: str
    strategy: str
    sum_logprob: float
    mean_logprob: float


class FakeGenerator:
    """Draws four candidates per prompt, the beam one first; counts the prompts it saw."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def sample_candidates(self, prompts, *, seed, batch_size):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            word = next((w for w in prompt.split() if w.startswith("word")), "x")
            texts = [word, f"{word} {word}", "something else", "no idea at all"]
            out.append(
                [
                    Candidate(t, "beam" if i == 0 else "sample", -1.0 - i, -0.5 - i / 10)
                    for i, t in enumerate(texts)
                ]
            )
        return out


class LengthScorer:
    def score(self, instruction, responses):
        return [-float(len(r)) for r in responses]


def pairs(prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix} word{i} .", f"word{i}") for i in range(40)]


@pytest.fixture
def small_pool(tmp_path: Path) -> Path:
    return write_pool(
        tmp_path / "data",
        {
            "bigbench/qa_wikidata": ("dev", generation_task(pairs("qa"))),
            "bigbench/tense": ("dev", generation_task(pairs("tense"))),
            I2A[0]: ("dev", ni_task("Repeat the word.", pairs("ni"))),
            "bigbench/anachronisms": ("train", generation_task(pairs("train"))),
        },
    )


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeGenerator:
    import capplug
    import capplug.llms

    generator = FakeGenerator()
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        capplug.llms.LocalChatModel, "from_pretrained", classmethod(lambda cls, ref: generator)
    )
    monkeypatch.setattr(
        capplug.Scorer, "from_pretrained", classmethod(lambda cls, ref: LengthScorer())
    )
    return generator


def test_a_run_on_the_pool_reports_each_group_and_the_shrunk_dev_lists(
    bench: ModuleType, small_pool: Path, fakes: FakeGenerator, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    argv = ["--data", str(small_pool), "--limit", "3", "--adapt-examples", "0"]
    result = bench.main([*argv, "--scorer", str(tmp_path / "no-scorer"), "--results", str(out)])

    assert list(result["tasks"]) == [*RERANK, *I2A]
    assert all(row["examples"] == 3 for row in result["tasks"].values())
    assert len(fakes.prompts) == 9  # three test instructions per task, each drawn once
    assert result["groups"] == GROUPS
    assert result["data"] == str(small_pool.resolve())
    report = (out / "rerank_generation.md").read_text()
    assert (
        "| 2 `dev.rerank_generation` |" in report and "| 1 `dev.instruction_to_adapter` |" in report
    )
    assert (
        "dev.rerank_generation: 2 of the 6 tasks of the original BIG-bench list are in the task "
        "pool; 4 could not be recovered and are left out (auto_categorization, gem/common_gen, "
        "gem/e2e_nlg, linguistic_mappings/sentence_negation_json), so its figures are over 2 "
        "tasks and do not compare with reports on all 6."
    ) in report
    assert "dev.instruction_to_adapter: 1 of the 8 tasks" in report
    # beam search finds every reference here: the oracle is no better, and the report says so
    assert "no gap to close (the oracle is no better)" in report
    assert json.loads((out / "rerank_generation.json").read_text())["groups"] == GROUPS

    # A rerun draws nothing again: the candidates are cached per task.
    again = bench.main([*argv, "--scorer", str(tmp_path / "no-scorer"), "--results", str(out)])
    assert len(fakes.prompts) == 9 and again["mean"] == result["mean"]


def test_tasks_are_named_as_the_pool_names_them_and_checked(
    bench: ModuleType, small_pool: Path, fakes: FakeGenerator, tmp_path: Path, capsys
) -> None:
    argv = ["--data", str(small_pool), "--limit", "2", "--adapt-examples", "0"]
    argv += ["--scorer", str(tmp_path / "no-scorer"), "--results", str(tmp_path / "out")]
    result = bench.main([*argv, "--tasks", "tense"])
    assert list(result["tasks"]) == ["bigbench/tense"]
    assert "This run covers 1 of the 2 (bigbench/tense)." in "\n".join(bench.report_lines(result))
    with pytest.raises(SystemExit):
        bench.main([*argv, "--tasks", "anachronisms"])  # a train task
    assert "--tasks must be dev.rerank_generation or dev.instruction_to_adapter" in (
        capsys.readouterr().err
    )
    train = bench.main(
        [*argv, "--split", "train", "--tasks", "anachronisms", "--out", str(tmp_path / "t.json")]
    )
    assert list(train["tasks"]) == ["bigbench/anachronisms"]
    assert train["groups"] == {} and train["dev_lists"] == []


def test_a_pool_without_dev_tasks_is_refused(
    bench: ModuleType, tmp_path: Path, fakes: FakeGenerator, capsys
) -> None:
    root = write_pool(
        tmp_path / "train-only", {"bigbench/x": ("train", generation_task(pairs("x")))}
    )
    with pytest.raises(SystemExit) as stop:
        bench.main(["--data", str(root)])
    assert stop.value.code == 2
    assert "has no dev tasks for dev.rerank_generation and dev.instruction_to_adapter" in (
        capsys.readouterr().err
    )
