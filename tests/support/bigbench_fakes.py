"""Two tiny BIG-bench tasks, one multiple choice and one generative, behind a recording loader."""

from __future__ import annotations

from capplug.data import parse_task

MC_TASK = "arithmetic/1_digit_addition"
GEN_TASK = "anachronisms"


def fake_loader(calls: list[str]):
    tasks = {
        MC_TASK: parse_task(
            MC_TASK,
            {
                "name": "x",
                "description": "d",
                "examples": [
                    {
                        "input": f"What is {i} plus 1?",
                        "target_scores": {str(i + 1): 1, **{f"w{j}": 0 for j in range(12)}},
                    }
                    for i in range(30)
                ],
            },
        ),
        GEN_TASK: parse_task(
            GEN_TASK,
            {
                "name": "y",
                "description": "d",
                "examples": [{"input": f"q{i}", "target": f"answer {i}"} for i in range(5)],
            },
        ),
    }

    def load(name: str):
        calls.append(name)
        return tasks[name]

    return load
