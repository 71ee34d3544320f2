"""A cheap look at the first records of every dataset a run names, before the model loads.

Datasets are read lazily (a record is parsed when a dataloader worker asks for it), so
a file in a layout this package does not read, or records the model's chat template
cannot render (tools on a template without them), would otherwise be found after the
model has loaded and the first batch ran.  ``check_first_records`` reads the first
``PREFLIGHT_RECORDS`` records of each annotation file, converts them (layout detection,
roles, tags against media) and renders their chat-template text with the processor: no
image, video or tokenizer work, a few milliseconds per file.

With ``--bad_sample_policy error`` any problem found stops the run; with ``skip`` only a
file none of whose first records can be read does (its layout is not understood), and
the others are logged and left to the run's skipping.  Every problem of every file is
reported at once, each naming the dataset, file and record.
"""
from __future__ import annotations

import logging

from qwenvl.data.catalog.formats import to_conversation, to_conversations
from qwenvl.data.errors import DataError
from qwenvl.data.render.prompt import chat_text

logger = logging.getLogger(__name__)

__all__ = ["PREFLIGHT_RECORDS", "check_first_records"]

PREFLIGHT_RECORDS = 8


def _problems_of(source, spec, processor, count: int) -> list[str]:
    problems = []
    for index in range(count):
        try:
            record = source[index]
            packed = getattr(source, "is_packed", False) or isinstance(record, list)
            conversations = to_conversations(record, spec, index) if packed else [to_conversation(record, spec, index)]
            for conversation in conversations:
                chat_text(processor, conversation)
        except DataError as err:
            problems.append(str(err))
    return problems


def check_first_records(datasets, processor, bad_sample_policy: str = "error",
                        records: int = PREFLIGHT_RECORDS) -> None:
    """Raise one ``DataError`` listing the problems in the first ``records`` records of each
    annotation file behind ``datasets`` (``SupervisedDataset``s; ``None`` entries are skipped)."""
    found, seen = [], set()
    for dataset in datasets:
        if dataset is None:
            continue
        for entry, source in zip(dataset.entries, dataset.sources):
            spec = entry.spec
            if spec.annotation_path in seen:
                continue
            seen.add(spec.annotation_path)
            count = min(records, len(source))
            problems = _problems_of(source, spec, processor, count)
            if not problems:
                continue
            more = f" (and {len(problems) - 1} more of its first {count} records)" if len(problems) > 1 else ""
            if bad_sample_policy == "error" or len(problems) == count:
                found.append(problems[0] + more)
            else:
                logger.warning("%d of the first %d records of dataset '%s' cannot be used and will be skipped; "
                               "the first: %s", len(problems), count, spec.name, problems[0])
    if found:
        raise DataError("checked before loading the model:\n  " + "\n  ".join(found))
