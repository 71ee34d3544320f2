"""Print a ``--dataset_use`` value listing every dataset of a dictionary with its own rate.

    python -m qwenvl.tools.dataset_use [--dataset_dictionary dataset_dictionary.json]
    # llava_665k%30,my_video%250

Same output as the jq one-liner
``jq -r 'to_entries | map("\\(.key)%\\((.value.repeat_time * 100 + 0.5) | floor)") | join(",")'``
(reading sampling_rate or repeat_time, default 1.0), without needing jq. The
dictionary is validated first; problems are printed and the exit status is 2.
"""
from __future__ import annotations

import argparse
import sys

from qwenvl.data.errors import DataError
from qwenvl.data.mixture import mixture_string
from qwenvl.data.registry import DEFAULT_DICTIONARY, load_dictionary


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
    print(mixture_string(dictionary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
