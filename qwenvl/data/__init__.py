"""Data side of qwenvl: a sample's path from the dataset dictionary to a batch.

- ``catalog/``: which record (dictionary, ``--dataset_use`` mixture, annotation files),
  read and converted into a checked ``Conversation``;
- ``render/``: a conversation -> ``input_ids``, ``labels`` (built while rendering),
  pixels and positions;
- ``media/``: images and videos opened, decoded, sampled and sized under a time limit;
- ``batch/``: lengths (counted without pixels, cached per file), packing, samplers and
  collators;
- shared by every stage: ``errors`` (``DataError`` and its kinds), ``arguments`` (the data
  flags), ``skips`` (``--bad_sample_policy skip``); ``dataset`` composes the stages
  (``make_supervised_data_module``); ``preview`` is a command (``python -m qwenvl.data.preview``).

The official ``qwenvl.data`` names are kept: ``data_dict`` (name -> settings,
read lazily from the repo's ``dataset_dictionary.json`` instead of Python code)
and ``data_list(["a%50", "b"])``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

from qwenvl.data.catalog.formats import Conversation, to_conversation, to_conversations
from qwenvl.data.catalog.mixture import build_mixture, mixture_counts, mixture_string
from qwenvl.data.catalog.registry import (DEFAULT_DICTIONARY, DatasetSpec, MixtureEntry, load_dictionary,
                                          parse_dataset_use)
from qwenvl.data.catalog.sources import AnnotationSource, open_annotations
from qwenvl.data.errors import DataError, where
from qwenvl.data.media.read import open_image, resolve_media

__all__ = [
    "DataError", "where", "DatasetSpec", "MixtureEntry", "DEFAULT_DICTIONARY", "load_dictionary",
    "parse_dataset_use", "build_mixture", "mixture_counts", "mixture_string", "AnnotationSource",
    "open_annotations", "Conversation", "to_conversation", "to_conversations", "open_image",
    "resolve_media", "data_dict", "data_list",
]


def _as_official(spec: DatasetSpec) -> dict:
    entry = {"annotation_path": spec.annotation_path, "data_path": spec.data_path}
    for key in ("sampling_rate", "repeat_time", "length"):
        if getattr(spec, key) is not None:
            entry[key] = getattr(spec, key)
    return entry


class _LazyDataDict(Mapping):
    """``data_dict`` of the official code: loads the default dictionary on first access.

    Loading at import time would make ``import qwenvl.data`` fail for everyone
    whenever the dictionary has a problem (or does not exist yet).
    """

    def __init__(self) -> None:
        self._specs: dict[str, DatasetSpec] | None = None

    def specs(self) -> dict[str, DatasetSpec]:
        if self._specs is None:
            # Existence and lengths are checked when a dataset is used, not on every lookup.
            self._specs = load_dictionary(check_files=False)
        return self._specs

    def __getitem__(self, name: str) -> dict:
        return _as_official(self.specs()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs())

    def __len__(self) -> int:
        return len(self.specs())

    def __repr__(self) -> str:
        state = "not loaded" if self._specs is None else f"{len(self._specs)} datasets"
        return f"<data_dict from {DEFAULT_DICTIONARY} ({state})>"


data_dict = _LazyDataDict()


def data_list(dataset_names: list[str]) -> list[dict]:
    """Official API: ``["a%50", "b"]`` -> ``[{"annotation_path", "data_path", "sampling_rate",
    "name"}, ...]`` from the default dictionary.

    ``sampling_rate`` is the fraction to use (0.5, or 2.5 for 250%); without ``%``
    it is the dataset's own sampling_rate / repeat_time (1.0 when neither is set).
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    entries = parse_dataset_use(",".join(dataset_names), data_dict.specs())
    return [{"annotation_path": e.spec.annotation_path, "data_path": e.spec.data_path,
             "sampling_rate": e.rate, "name": e.spec.name} for e in entries]
