"""The training dataset: a seeded mixture of annotation records, rendered on access.

``__getitem__`` is two steps: fetch the raw record the mixture points at, and
render it.  Everything heavy (images, video frames, tokenisation, mRoPE) happens
there, inside dataloader workers; building the dataset only indexes the files.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from torch.utils.data import Dataset

from qwenvl.data.batch.collate import make_collator
from qwenvl.data.batch.length_cache import PATCHES, TOKENS, VISUAL
from qwenvl.data.batch.length_check import LengthCheck, rendered_row
from qwenvl.data.catalog.conversation_checks import conversation_of, conversation_warnings, log_warnings
from qwenvl.data.catalog.mixture import build_mixture, check_not_empty
from qwenvl.data.catalog.preflight import check_first_records
from qwenvl.data.catalog.registry import MixtureEntry, load_dictionary, parse_dataset_use
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.errors import DataError, Origin, bad_sample, where
from qwenvl.data.media.video import video_settings_from
from qwenvl.data.render.processor_settings import configure_processor
from qwenvl.data.render.sample import SampleRenderer
from qwenvl.data.skips import SkipLog, Skipped, skip_log_path

logger = logging.getLogger(__name__)

REBUILD_LENGTHS = ("Fix: rebuild the length cache: run python -m qwenvl.tools.audit with this run's data flags and "
                   "--model_name_or_path (it recounts every record and rewrites the cache), or delete the "
                   "<annotation file>.lengths.* files of that dataset (also under ~/.cache/qwenvl/lengths) and start "
                   "again.")


class SupervisedDataset(Dataset):
    """Samples of a ``--dataset_use`` mixture, rendered for one model family.

    ``entries`` come from ``parse_dataset_use``; the mixture (which records, how many
    copies) depends only on ``seed``, so every rank and every resumed run sees the
    same list.  ``bad_sample_policy`` is ``"error"`` (raise a DataError naming the
    record) or ``"skip"`` (return a ``Skipped`` marker, which the collators drop or stand in
    for, and log it once; see ``qwenvl.data.skips``).
    """

    def __init__(self, entries: list[MixtureEntry], renderer: SampleRenderer, seed: int,
                 bad_sample_policy: str = "error", skip_log: SkipLog | None = None):
        self.entries = entries
        self.renderer = renderer
        self.sources = [open_annotations(e.spec.annotation_path) for e in entries]
        check_not_empty(entries, [len(s) for s in self.sources])
        self.mixture = build_mixture(entries, [len(s) for s in self.sources], seed)
        self.bad_sample_policy = bad_sample_policy
        self.skip_log = skip_log or SkipLog()
        self.length_check: LengthCheck | None = None  # set by expect_lengths when a sampler plans by length

    def expect_lengths(self, rows, refuse_longer: bool, columns: tuple[int, ...] = (TOKENS, VISUAL, PATCHES)) -> None:
        """Check every rendered item against ``rows`` (the length table its batch sampler planned with,
        in ``columns``); ``refuse_longer`` under a token budget (``qwenvl.data.batch.length_check``)."""
        self.length_check = LengthCheck(rows, refuse_longer, REBUILD_LENGTHS, columns)

    def __len__(self) -> int:
        return len(self.mixture)

    def log_metrics(self) -> dict:
        """``skipped_samples``: distinct samples this rank skipped so far, for the training logs.

        Skips happen in dataloader worker processes, so they are read from the rank's
        skipped-samples file the workers append to (see ``qwenvl.data.skips``).
        """
        return {"skipped_samples": len(self.skip_log.skipped_indices())}

    def origin(self, i: int) -> str:
        d, r = self.mixture[i]
        return where(self.entries[d].spec.name, self.entries[d].spec.annotation_path, int(r))

    def conversations(self, i: int):
        """The normalised conversation(s) behind item ``i`` (a list for packed records)."""
        d, r = (int(x) for x in self.mixture[i])
        # The audit and the length cache convert and check through the same function.
        return conversation_of(self.sources[d], self.entries[d].spec, r)

    def __getitem__(self, i: int):
        try:
            conversation = self.conversations(i)
            for c in conversation if isinstance(conversation, list) else [conversation]:
                log_warnings(conversation_warnings(c))
            if isinstance(conversation, list):
                rendered = [self.renderer.render(c) for c in conversation]
                # A Qwen3.5 sample split per reasoning turn is itself a pack: keep one flat list.
                item = {"pack": [s for r in rendered for s in (r["pack"] if "pack" in r else [r])]}
            else:
                item = self.renderer.render(conversation)
            if self.length_check is not None:
                tokens = self.renderer.tokens
                self.length_check.check(i, rendered_row(item, tokens.image_pad, tokens.video_pad),
                                        self.entries[int(self.mixture[i][0])].spec.name, self.origin(i))
            return item
        except Exception as exc:
            err = bad_sample(exc)  # the one rule of what is bad data; anything else is a bug: crash
            if err is None:
                raise
            d, r = (int(x) for x in self.mixture[i])
            spec = self.entries[d].spec
            err.locate(Origin(dataset=spec.name, file=spec.annotation_path, record=r))
            if self.bad_sample_policy == "skip":
                self.skip_log.record(i, self.origin(i), str(err), err.kind.value)
                return Skipped(i, self)
            raise err from None


def make_supervised_data_module(processor, data_args, model_config, model_max_length: int | None = None,
                                seed: int = 42, output_dir: str | None = None) -> dict:
    """Train (and eval) datasets and the collator, as the official code's function of this name.

    ``processor`` is configured with the pixel and frame flags first, so the one that is
    saved with checkpoints is the one training used.
    """
    configure_processor(processor, data_args)
    dictionary = load_dictionary(data_args.dataset_dictionary)
    if not data_args.dataset_use:
        raise DataError("--dataset_use is empty: name at least one dataset of the dictionary, e.g. "
                        f"--dataset_use {next(iter(dictionary), 'my_dataset')}.")
    renderer = SampleRenderer(processor, model_config, model_max_length, video_settings_from(data_args, processor),
                              thinking=data_args.enable_thinking)
    skip_path = None
    if output_dir and data_args.bad_sample_policy == "skip":
        os.makedirs(output_dir, exist_ok=True)
        skip_path = skip_log_path(output_dir)
    skip_log = SkipLog(skip_path)
    train = SupervisedDataset(parse_dataset_use(data_args.dataset_use, dictionary), renderer, seed,
                              data_args.bad_sample_policy, skip_log)
    evaluation = None
    if data_args.eval_dataset_use:
        evaluation = SupervisedDataset(parse_dataset_use(data_args.eval_dataset_use, dictionary), renderer, seed,
                                       data_args.bad_sample_policy, skip_log)
    # Layout and template problems in the first records stop the run now, not after the model loads.
    check_first_records([train, evaluation], processor, data_args.bad_sample_policy)
    flatten = bool(data_args.data_flatten or data_args.data_packing)
    if not flatten:
        _warn_packed_files_padded([train, evaluation])
    collator = make_collator(flatten, processor.tokenizer.pad_token_id)
    return {"train_dataset": train, "eval_dataset": evaluation, "data_collator": collator}


def _warn_packed_files_padded(datasets) -> None:
    """Say when a packed file (``pack_data``'s records: lists of samples) feeds padded batches.

    Nothing leaks there (the padded collator gives each of a pack's samples its own row), but a
    micro-batch then holds every sample of its packs: many more rows than
    ``--per_device_train_batch_size``, each padded to the longest, which is not what packing was for.
    """
    for dataset in datasets:
        if dataset is None:
            continue
        for entry, source in zip(dataset.entries, dataset.sources):
            if getattr(source, "is_packed", False):
                logger.warning("dataset '%s' (%s) is packed (each record a list of samples) but batches are padded: "
                               "each pack's samples become rows of their own, so a micro-batch holds every sample "
                               "of its packs. Fix: add --data_packing True to train each pack as one row.",
                               entry.spec.name, entry.spec.annotation_path)


def sample_token_counts(sample: dict, renderer: SampleRenderer) -> dict:
    """Text and visual token counts of a rendered sample (for previews and logging)."""
    ids = sample["input_ids"]
    visual = int(np.count_nonzero((ids == renderer.tokens.image_pad).numpy() | (ids == renderer.tokens.video_pad).numpy()))
    return {"tokens": int(ids.shape[0]), "visual_tokens": visual, "text_tokens": int(ids.shape[0]) - visual,
            "trained_tokens": int((sample["labels"] != -100).sum())}
