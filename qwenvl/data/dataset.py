"""The training dataset: a seeded mixture of annotation records, rendered on access.

``__getitem__`` is two steps: fetch the raw record the mixture points at, and
render it.  Everything heavy (images, video frames, tokenisation, mRoPE) happens
there, inside dataloader workers; building the dataset only indexes the files.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from .collate import make_collator
from .errors import DataError, where
from .formats import to_conversation, to_conversations
from .mixture import build_mixture
from .processor_settings import configure_processor
from .registry import MixtureEntry, load_dictionary, parse_dataset_use
from .render import SampleRenderer
from .sources import open_annotations

logger = logging.getLogger(__name__)


@dataclass
class SkipLog:
    """Where skipped samples are counted and written (one JSON line each, once per sample)."""

    path: str | None = None
    counts: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)  # distinct item indices skipped in this process

    def record(self, index: int, origin: str, reason: str) -> None:
        kind = reason.split(":", 1)[0][:60] if ":" in reason else reason[:60]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if index in self.seen:
            return
        self.seen.add(index)
        logger.warning("skipping bad sample %s: %s", origin, reason)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"index": int(index), "origin": origin, "reason": reason, "pid": os.getpid()}) + "\n")


class SupervisedDataset(Dataset):
    """Samples of a ``--dataset_use`` mixture, rendered for one model family.

    ``entries`` come from ``parse_dataset_use``; the mixture (which records, how many
    copies) depends only on ``seed``, so every rank and every resumed run sees the
    same list.  ``bad_sample_policy`` is ``"error"`` (raise a DataError naming the
    record) or ``"skip"`` (return None, which the collators drop, and log it once).
    """

    def __init__(self, entries: list[MixtureEntry], renderer: SampleRenderer, seed: int,
                 bad_sample_policy: str = "error", skip_log: SkipLog | None = None):
        self.entries = entries
        self.renderer = renderer
        self.sources = [open_annotations(e.spec.annotation_path) for e in entries]
        self.mixture = build_mixture(entries, [len(s) for s in self.sources], seed)
        self.bad_sample_policy = bad_sample_policy
        self.skip_log = skip_log or SkipLog()

    def __len__(self) -> int:
        return len(self.mixture)

    def log_metrics(self) -> dict:
        """``skipped_samples``: distinct samples skipped so far, for the training logs.

        Skips happen in dataloader worker processes, so the count is read from the
        skipped-samples file they append to (one line per sample) when there is one.
        """
        path = self.skip_log.path
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                return {"skipped_samples": sum(1 for _ in f)}
        return {"skipped_samples": len(self.skip_log.seen)}

    def origin(self, i: int) -> str:
        d, r = self.mixture[i]
        return where(self.entries[d].spec.name, self.entries[d].spec.annotation_path, int(r))

    def conversations(self, i: int):
        """The normalised conversation(s) behind item ``i`` (a list for packed records)."""
        d, r = (int(x) for x in self.mixture[i])
        spec, source = self.entries[d].spec, self.sources[d]
        record = source[r]
        if getattr(source, "is_packed", False) or isinstance(record, list):
            return to_conversations(record, spec, r)
        return to_conversation(record, spec, r)

    def __getitem__(self, i: int):
        try:
            conversation = self.conversations(i)
            if isinstance(conversation, list):
                rendered = [self.renderer.render(c) for c in conversation]
                # A Qwen3.5 sample split per reasoning turn is itself a pack: keep one flat list.
                return {"pack": [s for r in rendered for s in (r["pack"] if "pack" in r else [r])]}
            return self.renderer.render(conversation)
        except DataError as err:
            origin = self.origin(i)
            if origin not in str(err):  # every message names the dataset, file and record
                err = DataError(f"{origin}: {err}")
            if self.bad_sample_policy == "skip":
                self.skip_log.record(i, origin, str(err))
                return None
            raise err from None


def video_settings_from(data_args, processor):
    """The video sampling settings of the flags, with the family's patch sizes (pixel bounds per frame)."""
    from .video import VideoSettings

    return VideoSettings.for_processor(
        processor, fps=data_args.video_fps, min_frames=data_args.video_min_frames,
        max_frames=data_args.video_max_frames, min_pixels=data_args.video_min_pixels,
        max_pixels=data_args.video_max_pixels, backend=data_args.video_backend)


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
        skip_path = os.path.join(output_dir, "skipped_samples.jsonl")
    skip_log = SkipLog(skip_path)
    train = SupervisedDataset(parse_dataset_use(data_args.dataset_use, dictionary), renderer, seed,
                              data_args.bad_sample_policy, skip_log)
    evaluation = None
    if data_args.eval_dataset_use:
        evaluation = SupervisedDataset(parse_dataset_use(data_args.eval_dataset_use, dictionary), renderer, seed,
                                       data_args.bad_sample_policy, skip_log)
    flatten = bool(data_args.data_flatten or data_args.data_packing)
    collator = make_collator(flatten, processor.tokenizer.pad_token_id)
    return {"train_dataset": train, "eval_dataset": evaluation, "data_collator": collator}


def sample_token_counts(sample: dict, renderer: SampleRenderer) -> dict:
    """Text and visual token counts of a rendered sample (for previews and logging)."""
    ids = sample["input_ids"]
    visual = int(np.count_nonzero((ids == renderer.tokens.image_pad).numpy() | (ids == renderer.tokens.video_pad).numpy()))
    return {"tokens": int(ids.shape[0]), "visual_tokens": visual, "text_tokens": int(ids.shape[0]) - visual,
            "trained_tokens": int((sample["labels"] != -100).sum())}
