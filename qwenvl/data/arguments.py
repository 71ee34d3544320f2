"""The data flags of ``train_qwen.py``, with the official names and meanings.

This dataclass is parsed by ``transformers.HfArgumentParser`` next to the model and
training arguments; the data side reads only this object, never the Trainer's.
Defaults follow the official qwen-vl-finetune code unless a comment says why not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl.data.errors import DataConfigError


@dataclass
class DataArguments:
    help_heading = "Data: datasets, images and video"  # --help's heading (not a flag)
    dataset_use: str = field(
        default="",
        metadata={"help": "Comma list of dataset names from the dictionary, each with an optional %%rate: "
                          "'a%%50,b%%250,c' (50%% subsample, 2.5x repeat, the entry's own rate)."})
    dataset_dictionary: str | None = field(
        default=None,
        metadata={"help": "Path to a dataset_dictionary.json (default: the one at the repository root)."})
    eval_dataset_use: str = field(
        default="", metadata={"help": "Datasets to evaluate on during training, same syntax as --dataset_use."})
    data_flatten: bool = field(
        default=False,
        metadata={"help": "Concatenate each micro-batch's samples into one row (no padding); samples stay "
                          "isolated through 4-row position ids."})
    data_packing: bool = field(
        default=False,
        metadata={"help": "Train on packed annotation files (each record a list of samples), through the "
                          "flattened path."})
    max_pixels: int = field(default=28 * 28 * 576, metadata={"help": "Most pixels per image (after resizing)."})
    min_pixels: int = field(default=28 * 28 * 16, metadata={"help": "Fewest pixels per image (after resizing)."})
    video_max_frames: int = field(default=8, metadata={"help": "Most frames sampled per video."})
    video_min_frames: int = field(default=4, metadata={"help": "Fewest frames sampled per video."})
    video_max_pixels: int = field(default=1024 * 28 * 28, metadata={"help": "Most pixels per video frame."})
    video_min_pixels: int = field(default=256 * 28 * 28, metadata={"help": "Fewest pixels per video frame."})
    video_fps: float = field(default=2.0, metadata={"help": "Frames sampled per second of video."})
    video_backend: str = field(
        default="auto", metadata={"help": "Video decoder: auto, torchcodec, decord or pyav."})
    enable_thinking: str = field(
        default="auto",
        metadata={"help": "Qwen3.5/3.6 thinking mode of the trained answers: 'auto' trains answers with "
                          "reasoning (reasoning_content, or <think>...</think> in the answer) in thinking mode and "
                          "the others in non-thinking mode (their empty think block is prompt); 'true' trains "
                          "every answer in thinking mode; 'false' drops reasoning and trains non-thinking. "
                          "Other families: 'auto' (reasoning_content is refused there)."})
    bad_sample_policy: str = field(
        default="error",
        metadata={"help": "'error' stops at the first bad sample, naming it; 'skip' drops it and counts it."})
    media_timeout: float = field(
        default=120.0,
        metadata={"help": "Seconds one media read (an image, a video's download and decoding) may take before "
                          "the sample is bad (a stalled server or disk, a FIFO); 120 by default."})

    def __post_init__(self):
        problems = []
        if self.min_pixels > self.max_pixels:
            problems.append(f"--min_pixels {self.min_pixels} is above --max_pixels {self.max_pixels}: swap them.")
        if self.video_min_pixels > self.video_max_pixels:
            problems.append(f"--video_min_pixels {self.video_min_pixels} is above --video_max_pixels "
                            f"{self.video_max_pixels}: swap them.")
        if self.video_min_frames > self.video_max_frames:
            problems.append(f"--video_min_frames {self.video_min_frames} is above --video_max_frames "
                            f"{self.video_max_frames}: swap them.")
        if self.video_fps <= 0:
            problems.append(f"--video_fps must be positive, got {self.video_fps}.")
        if self.video_backend not in ("auto", "torchcodec", "decord", "pyav"):
            problems.append(f"--video_backend must be auto, torchcodec, decord or pyav, not {self.video_backend!r}.")
        if self.enable_thinking not in ("auto", "true", "false"):
            problems.append(f"--enable_thinking must be auto, true or false, not {self.enable_thinking!r}.")
        if self.bad_sample_policy not in ("error", "skip"):
            problems.append(f"--bad_sample_policy must be 'error' or 'skip', not {self.bad_sample_policy!r}.")
        if not self.media_timeout > 0:
            problems.append(f"--media_timeout must be a positive number of seconds, got {self.media_timeout}.")
        if problems:
            raise DataConfigError(problems)


def parse_tool_flags(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """The data tools' flags (audit, preview, pack_data) parsed into ``dataclass_types``' instances.

    A flag none of them has raises DataConfigError naming it (the tools print it and exit 2);
    HfArgumentParser raised a plain ValueError, which ended the tools in a traceback."""
    from transformers import HfArgumentParser

    parsed = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv, return_remaining_strings=True)
    *instances, unknown = parsed
    if unknown:
        raise DataConfigError([f"unknown flag(s) {' '.join(unknown)}: see --help for this tool's flags."])
    return tuple(instances)
