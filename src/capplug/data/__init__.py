"""Task data: one task model read from every format, the pool it comes from, and Cappy's weak
labels for training the scorer.

``open_pool()`` finds the data (``data=``/``--data``, ``$CAPPLUG_DATA``, or ``../shared/data``
beside a source checkout); ``load_task`` and ``task_names`` read it by name and split.
"""

from capplug.data.formats import SOURCES, parse_task, template_of
from capplug.data.labels import (
    LabelledRow,
    clipped_variants,
    label_candidates,
    label_clipped,
    normalised_option_scores,
    reference_rows,
    rouge_l,
)
from capplug.data.pool import (
    DATA_ENV,
    Pool,
    PoolSummary,
    add_data_option,
    data_paths,
    load_task,
    open_pool,
    task_names,
)
from capplug.data.tasks import Example, Split, Task, is_test_example
from capplug.errors import BigBenchArchiveError, DataError, NoDataError, UnknownTaskError

__all__ = [
    "DATA_ENV",
    "SOURCES",
    "BigBenchArchiveError",
    "DataError",
    "Example",
    "LabelledRow",
    "NoDataError",
    "Pool",
    "PoolSummary",
    "Split",
    "Task",
    "UnknownTaskError",
    "add_data_option",
    "clipped_variants",
    "data_paths",
    "is_test_example",
    "label_candidates",
    "label_clipped",
    "load_task",
    "normalised_option_scores",
    "open_pool",
    "parse_task",
    "reference_rows",
    "rouge_l",
    "task_names",
    "template_of",
]
