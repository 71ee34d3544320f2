"""Print a ``--dataset_use`` value listing every training dataset of a dictionary with its own rate.

    python -m qwenvl.tools.dataset_use [--dataset_dictionary dataset_dictionary.json]
    # llava_665k%30,my_video%250
    # (stderr) left out as evaluation splits: my_video_eval; use them with --eval_dataset_use my_video_eval

Evaluation splits are left out of the training string: a dataset is one when its name
ends with ``_eval``, ``_val``, ``_valid``, ``_validation`` or ``_test`` (also with ``-``),
the convention of the demo dictionary (``demo_shapes_eval``).  They are named on stderr
with the ``--eval_dataset_use`` value that evaluates them, so stdout stays the one line
to paste.  Otherwise the same output as the jq one-liner
``jq -r 'to_entries | map("\\(.key)%\\((.value.repeat_time * 100 + 0.5) | floor)") | join(",")'``
(reading sampling_rate or repeat_time, default 1.0), without needing jq. The
dictionary is validated first; problems are printed and the exit status is 2.
"""
from __future__ import annotations

import argparse
import re
import sys

from qwenvl.data.catalog.mixture import mixture_string
from qwenvl.data.catalog.registry import DEFAULT_DICTIONARY, load_dictionary
from qwenvl.data.errors import DataError

EVAL_SPLIT_NAME = re.compile(r"[_-](eval|val|valid|validation|test)$", re.IGNORECASE)


def is_eval_split(name: str) -> bool:
    """True for a dataset name that marks an evaluation split (``demo_shapes_eval``, ``coco-val``)."""
    return EVAL_SPLIT_NAME.search(name) is not None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dictionary", default=None,
                        help=f"dictionary file (default: {DEFAULT_DICTIONARY})")
    parser.add_argument("--no_check_files", action="store_true",
                        help="skip checking that annotation files/media folders exist and "
                             "that declared lengths match")
    args = parser.parse_args(argv)
    try:
        dictionary = load_dictionary(args.dataset_dictionary,
                                     check_files=not args.no_check_files)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    evaluation = [name for name in dictionary if is_eval_split(name)]
    training = {name: spec for name, spec in dictionary.items() if name not in evaluation}
    print(mixture_string(training))
    if evaluation:
        names = ",".join(evaluation)
        print(f"left out as evaluation splits: {names}; use them with --eval_dataset_use {names}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
