"""BIG-bench tasks and Cappy's weak labels for training the scorer."""

from capplug.data.bigbench import (
    BigBenchArchiveError,
    Example,
    Task,
    extract_tasks,
    is_test_example,
    load_task,
    parse_task,
    task_names,
)
from capplug.data.labels import (
    LabelledRow,
    clipped_variants,
    label_candidates,
    label_clipped,
    normalised_option_scores,
    reference_rows,
    rouge_l,
)

__all__ = [
    "BigBenchArchiveError",
    "Example",
    "LabelledRow",
    "Task",
    "clipped_variants",
    "extract_tasks",
    "is_test_example",
    "label_candidates",
    "label_clipped",
    "load_task",
    "normalised_option_scores",
    "parse_task",
    "reference_rows",
    "rouge_l",
    "task_names",
]
