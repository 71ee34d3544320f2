"""Training throughput on one GPU: our trainer (padded, flattened, token budget) against TRL's SFTTrainer.

    python -m benchmarks.train_throughput --model 3b                       # the default table
    python -m benchmarks.train_throughput --model 7b --configs ours_flat_bs4,trl_bs4
    python -m benchmarks.train_throughput --model_dir DIR --annotation my.json --data_path images/
    python -m benchmarks.train_throughput --model_dir /tmp/tiny25 --device cpu --steps 2 --warmup 1 \\
        --configs ours_flat_bs4,trl_bs4                                    # CPU smoke run

What runs.  ``--model 3b|7b`` builds the released Qwen2.5-VL-3B/-7B architecture from
its config with random weights, directly on the GPU in bf16 (no hub, no weights on
disk; the parameter counts of the released models are asserted on the meta device
first).  ``--model_dir`` loads a checkpoint directory instead (any family our trainer
supports).  Each configuration then trains ``--warmup`` + ``--steps`` optimizer steps:

* ``ours_padded_bsB`` / ``ours_flat_bsB``: our entry point's objects, built the way
  ``train_qwen.py`` builds them: flags through ``parse_args``, the data through
  ``make_supervised_data_module`` (padded, or ``--data_flatten``), the model class
  ``qwenvl.train.steps.model_class_for_run`` picks (as ``load_model``: the training subclass with the fused loss), frozen by
  ``prepare_model`` (trainable weights in fp32, the rest bf16), ``steps.build_trainer`` with
  ``steps.train_batch_sampler``;
* ``ours_budget``: flattened micro-batches packed up to ``--max_tokens_per_batch``
  tokens (7168 by default, about 16 reference samples) over the length cache,
  accumulation 1; the samples per step vary and are measured;
* ``NAME@LABEL``: configuration NAME of ours with the extra flags of ``--variant
  LABEL="--flag value ..."``, so several settings run side by side in one run;
* ``trl_bsB``: TRL's ``SFTTrainer`` and the vision-language collator it picks, on the
  same architecture (same seed, same init), the same samples in the same order
  (converted to TRL's ``messages`` + ``images`` format), the same optimizer, learning
  rate, bf16 autocast, gradient checkpointing and frozen vision tower (merger trains).
  The model stays in bf16 as in TRL's VLM recipe (``--trl_fp32_weights`` gives it
  fp32 trainable weights like ours); attention is ``--trl_attn_implementation``.

Samples per optimizer step are the same for every configuration
(``--samples_per_step``, 16 = batch 4 x accumulation 4 or batch 16 x 1).  Data:
``--data reference`` (the field's measurement: one image, <= 256 visual tokens,
about 430 tokens per sample) or ``--data mix`` (SFT-like mix; see bench_data.py), or
your own ``--annotation``.  Both trainers read the data sequentially.

Measured per configuration, over the timed steps after warm-up (wall time between
the ends of optimizer steps, after ``torch.cuda.synchronize``; data loading, logging
and the optimizer included): seconds per step, samples, text and visual tokens per
second (real tokens, padding excluded), peak ``torch.cuda.max_memory_allocated``
(model, optimizer state and activations) and MFU (``benchmarks/mfu.py``).  An OOM or
an error ends that configuration only; its row says why.  Results are printed as a
table (last) and written as JSON (``--output``; default ``$OUT/train_throughput.json``
when ``OUT`` is set, else ``benchmarks/results/train_throughput.json``) after every
configuration, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __package__ in (None, ""):  # run as a file (python benchmarks/train_throughput.py) from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import bench_data  # noqa: E402
from benchmarks.mfu import (LINEAR_ATTENTION_CHUNK, LanguageShape, StepWork, VisionShape, mfu,  # noqa: E402
                            peak_bf16_flops, training_flops, vision_attention_pairs)

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30

# The released Qwen2.5-VL architectures (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct),
# and their parameter counts (DESIGN.md): total, language model (with lm_head), vision tower (with merger).
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
               tokens_per_second=2, hidden_act="silu")
_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0,
             use_sliding_window=False, sliding_window=32768,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
RELEASED = {
    "3b": {"text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, vocab_size=151936, max_window_layers=70),
           "tie_word_embeddings": True, "params": (3_754_622_976, 3_085_938_688, 668_684_288)},
    "7b": {"text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_window_layers=28),
           "tie_word_embeddings": False, "params": (8_292_166_656, 7_615_616_512, 676_550_144)},
}
# The released Qwen3.5 architectures.  Text: transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig
# defaults, which are the 9B's and the 35B-A3B's (their docstrings name Qwen/Qwen3.5-27B and -35B-A3B;
# the 9B's hidden 4096, 32 layers, 16 heads, 4 KV heads, head_dim 256, MLP 12288, linear attention 16
# key / 32 value heads of 128, vocabulary 248,320 checked against its published model card), with the
# published rotary settings (theta 1e7, a quarter of head_dim rotated, interleaved mRoPE [11, 11, 10],
# 262,144 positions).  Vision: transformers' Qwen3_5VisionConfig defaults (27 blocks of 1152) with the
# merger projecting to the language model's width.  No published parameter counts are asserted.
_QWEN35_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10], "mrope_interleaved": True}
QWEN35 = {
    "qwen3_5_9b": {"model_type": "qwen3_5", "text": dict(hidden_size=4096, num_hidden_layers=32)},
    "qwen3_5_35b_a3b": {"model_type": "qwen3_5_moe", "text": dict(hidden_size=2048, num_hidden_layers=40)},
}
DEFAULT_CONFIGS = "ours_padded_bs4,ours_flat_bs4,ours_flat_bs16,ours_budget,trl_bs4,trl_bs16"
REFERENCE_MAX_PIXELS = 200704  # 256 visual tokens of 28 x 28 pixels
SETUP_SECONDS = 60  # allowance per configuration for building the model and starting the data loaders
_CONFIG = re.compile(r"^(?:(ours)_(padded|flat)_bs(\d+)|(trl)_bs(\d+)|(ours)_(budget))$")


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def qwen3_5_config(name: str, token_ids: dict | None = None, layers: int | None = None):
    """The config of a released Qwen3.5 architecture (``QWEN35``); ``layers`` keeps only the first
    ``layers`` decoder layers (a multiple of 4: the 3 linear + 1 full attention pattern)."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    spec = QWEN35[name]
    text = dict(spec["text"], rope_parameters=dict(_QWEN35_ROPE), max_position_embeddings=262144,
                tie_word_embeddings=False)
    if layers:
        if layers % 4 or layers > text["num_hidden_layers"]:
            raise ValueError(f"--layers must be a multiple of 4 and at most {text['num_hidden_layers']}, got {layers}")
        text["num_hidden_layers"] = layers
    ids = dict(token_ids or {})
    for key in ("bos_token_id", "eos_token_id"):
        if key in ids:
            text[key] = ids.pop(key)
    vision = {"out_hidden_size": text["hidden_size"]}
    cls = Qwen3_5Config if spec["model_type"] == "qwen3_5" else Qwen3_5MoeConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def released_config(name: str, token_ids: dict | None = None, layers: int | None = None):
    """The config of the released ``3b`` or ``7b`` Qwen2.5-VL, or of a Qwen3.5 in ``QWEN35``
    (token ids: the config's own by default)."""
    from transformers import Qwen2_5_VLConfig

    if name in QWEN35:
        return qwen3_5_config(name, token_ids, layers)
    spec = RELEASED[name]
    text = dict(_TEXT, **spec["text"], tie_word_embeddings=spec["tie_word_embeddings"])
    vision = dict(_VISION, out_hidden_size=spec["text"]["hidden_size"])
    ids = dict(token_ids or {})
    for key in ("bos_token_id", "eos_token_id"):
        if key in ids:
            text[key] = ids.pop(key)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=spec["tie_word_embeddings"], **ids)


def component_params(model) -> tuple[int, int, int]:
    """(total, language model incl. lm_head, vision tower incl. merger) parameter counts."""
    from qwenvl.train.model import parameter_counts

    c = parameter_counts(model)
    llm = c["llm"]["total"] + c["lm_head"]["total"]
    vision = c["vision"]["total"] + c["merger"]["total"]
    return llm + vision, llm, vision


def check_released_params(config, name: str) -> None:
    """Build ``config`` on the meta device (no memory) and assert the released model's parameter counts."""
    from qwenvl.hf_internals import build_from_config
    from qwenvl.train.model import model_class_for

    with torch.device("meta"):
        model = build_from_config(model_class_for(config.model_type), copy.deepcopy(config), dtype=torch.bfloat16)
    got, want = component_params(model), RELEASED[name]["params"]
    assert got == want, (f"Qwen2.5-VL-{name.upper()} built from config has (total, language model, vision) = "
                         f"{got} parameters; the released model has {want}")


def write_model_dir(name: str, folder: Path, layers: int | None = None) -> Path:
    """A model directory without weights: the released config and the family's processor (real tokenizer)."""
    from qwenvl.tools import make_tiny_model as tiny

    family = QWEN35[name]["model_type"] if name in QWEN35 else "qwen2_5_vl"
    if family not in tiny.FAMILIES:
        raise SystemExit(f"--model {name} needs the {family} tokenizer and processor of make_tiny_model "
                         f"(not in this checkout); pass --model_dir with a {family} checkpoint instead")
    folder.mkdir(parents=True, exist_ok=True)
    tiny.write_family_tokenizer(family, folder)
    processor = tiny.build_processor(family, folder)
    config = released_config(name, tiny.special_token_ids(processor.tokenizer), layers)
    if name in RELEASED:
        check_released_params(config, name)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def choose_attention(requested: str | None, device: str) -> str:
    """``requested``, else our trainer's automatic choice for this device (what ``load_model`` uses)."""
    from qwenvl.train.attention import choose_attn_implementation

    return choose_attn_implementation(requested, device_is_cuda=device == "cuda")


def build_model(ctx, cls, dtype: torch.dtype, attn: str):
    """``cls`` on ``ctx.device`` with attention ``attn``: random weights from the config (seeded),
    created directly on the device, or the checkpoint's weights (``--weights load``)."""
    from transformers import set_seed

    from qwenvl.hf_internals import build_from_config
    from qwenvl.train.attention import apply_attn_implementation, loadable_attn_implementation

    set_seed(ctx.seed)
    if ctx.weights == "random":
        with torch.device(ctx.device):
            model = build_from_config(cls, copy.deepcopy(ctx.config), dtype=dtype,
                                      attn_implementation=loadable_attn_implementation(attn))
    else:
        model = cls.from_pretrained(ctx.model_dir, dtype=dtype, attn_implementation=loadable_attn_implementation(attn),
                                    device_map=ctx.device)
    apply_attn_implementation(model, attn)
    from qwenvl.train.linear_attention import make_linear_attention_packable

    make_linear_attention_packable(model)  # as load_model: Qwen3.5's packed samples stay apart
    return model


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class Meter:
    """Work per micro-batch (tokens, attention pairs, patches), kept on the device until the end.

    Nothing here copies to or from the GPU while training runs (such a copy would
    synchronise the stream): counts stay device tensors or Python ints until ``total``.
    """

    def __init__(self, visual_ids: list[int]):
        self.visual_ids = visual_ids
        self._ids_on = {}  # device -> tensor of the visual placeholder ids
        self.records = []  # (optimizer steps done before this micro-batch, counts, grids)

    def record(self, inputs: dict, steps_done: int) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        positions = inputs.get("position_ids")
        rows, length = ids.shape
        if mask is not None:
            m = mask.to(torch.long)
            tokens, samples = m.sum(), rows
            pairs = (m * m.cumsum(-1)).sum()  # s (s + 1) / 2 per row
            lengths = m.sum(-1)
        elif positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
            text = positions[0].to(torch.long)  # restarts at 0 for every packed sample
            tokens, samples = ids.numel(), (text == 0).sum()
            pairs = (text + 1).sum()
            # a sample ends where the next position restarts at 0 (or the row ends)
            ends = torch.nn.functional.pad(text[:, 1:] == 0, (0, 1), value=True)
            lengths = (text + 1)[ends]
        else:
            tokens, samples, pairs = ids.numel(), rows, rows * length * (length + 1) // 2
            lengths = torch.full((rows,), length, device=ids.device)
        chunk = LINEAR_ATTENTION_CHUNK  # Qwen3.5's linear attention works on whole chunks per sample
        chunked = ((lengths + chunk - 1) // chunk * chunk).sum()
        if ids.device not in self._ids_on:
            self._ids_on[ids.device] = torch.tensor(self.visual_ids, device=ids.device)
        visual = torch.isin(ids, self._ids_on[ids.device]).sum()
        grids = [inputs[k].detach() for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
        self.records.append((steps_done, (tokens, visual, pairs, samples, ids.numel(), chunked), grids))

    def total(self, first: int, last: int, vision: VisionShape | None) -> tuple[StepWork, int, int]:
        """Work of optimizer steps first+1 .. last; also (samples, token slots including padding)."""
        sums = [0] * 6
        grids = []
        for steps_done, counts, batch_grids in self.records:
            if first <= steps_done < last:
                sums = [s + int(c) for s, c in zip(sums, counts)]
                grids += [row for g in batch_grids for row in g.tolist()]
        tokens, visual, pairs, samples, slots, chunked = sums
        patches = sum(t * h * w for t, h, w in grids)
        window_pairs, full_pairs = vision_attention_pairs(grids, vision) if vision is not None else (0, 0)
        return StepWork(tokens, visual, pairs, patches, window_pairs, full_pairs, chunked), samples, slots


def metered(trainer_cls):
    """``trainer_cls`` whose ``training_step`` first records the micro-batch in ``self.meter``."""

    class Metered(trainer_cls):
        meter: Meter

        def training_step(self, model, inputs, *args, **kwargs):
            self.meter.record(inputs, self.state.global_step)
            return super().training_step(model, inputs, *args, **kwargs)

    Metered.__name__ = f"Metered{trainer_cls.__name__}"
    return Metered


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_timer(device: str, label: str, total_steps: int, timeout: float):
    """A callback keeping the time at the end of every optimizer step; stops a run past ``timeout`` seconds."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = {}
            self.stopped_early = False
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.start = time.perf_counter()
            self.times[0] = self.start

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            now = time.perf_counter()
            step = state.global_step
            last = self.times.get(step - 1, self.start)
            self.times[step] = now
            print(f"    {label}: step {step}/{total_steps} {now - last:.2f} s", flush=True)
            if now - self.start > timeout and step < total_steps:
                print(f"    {label}: stopping after {now - self.start:.0f} s (time limit {timeout:.0f} s)", flush=True)
                self.stopped_early = True
                control.should_training_stop = True

    return StepTimer()


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    name: str
    trainer: str  # "ours" | "trl"
    layout: str  # "padded" | "flat" | "budget"
    batch: int
    accumulation: int
    flags: list[str] = dataclasses.field(default_factory=list)  # the variant's extra train_qwen.py flags


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """``--variant LABEL="flags"`` items -> {label: flags}; raises ValueError on a malformed item."""
    variants = {}
    for item in items:
        label, sep, flags = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
            raise ValueError(f"--variant {item!r}: write LABEL=\"--flag value ...\" (label of letters, digits, _.-)")
        variants[label] = shlex.split(flags)
    return variants


def parse_configs(text: str, samples_per_step: int, variants: dict[str, list[str]] | None = None
                  ) -> list[RunConfig | str]:
    """Configurations from a comma list; a name that does not parse is returned as an error string.

    ``NAME@LABEL`` runs configuration NAME of ours with the extra flags of ``--variant LABEL=...``
    (after ``--our_flags``), so several settings are timed side by side in one run.
    """
    variants = variants or {}
    out = []
    for name in [n.strip() for n in text.split(",") if n.strip()]:
        base, _, label = name.partition("@")
        m = _CONFIG.match(base)
        if not m:
            out.append(f"{name}: unknown configuration (ours_padded_bsN, ours_flat_bsN, ours_budget, trl_bsN, "
                       "each of ours optionally @LABEL of a --variant)")
            continue
        if label and label not in variants:
            out.append(f"{name}: no --variant {label}=... given")
            continue
        if label and not (m.group(1) or m.group(6)):
            out.append(f"{name}: variants are flags of our trainer; TRL configurations take none")
            continue
        flags = list(variants.get(label, []))
        if m.group(7):
            out.append(RunConfig(name, "ours", "budget", samples_per_step, 1, flags))
            continue
        trainer = m.group(1) or m.group(4)
        layout = m.group(2) or "padded"
        batch = int(m.group(3) or m.group(5))
        if batch < 1 or samples_per_step % batch:
            out.append(f"{name}: batch {batch} does not divide --samples_per_step {samples_per_step}")
            continue
        out.append(RunConfig(name, trainer, layout, batch, samples_per_step // batch, flags))
    return out


def _has_training_field(name: str) -> bool:
    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclasses.dataclass
class Context:
    """Everything the configurations share."""

    args: argparse.Namespace
    device: str
    model_dir: str
    config: object
    weights: str  # "random" | "load"
    seed: int
    dictionary: str
    dataset_use: str
    max_pixels: int
    min_pixels: int
    workdir: Path
    attn: str
    trl_attn: str
    lang: LanguageShape | None
    vision: VisionShape | None
    peak: float | None
    trl_rows: object = None  # a datasets.Dataset, or the reason TRL cannot run


def our_flags(cfg: RunConfig, ctx: Context) -> list[str]:
    """The train_qwen.py flags of one configuration of ours."""
    a = ctx.args
    total = a.warmup + a.steps
    flags = ["--model_name_or_path", ctx.model_dir, "--dataset_use", ctx.dataset_use,
             "--dataset_dictionary", ctx.dictionary, "--output_dir", str(ctx.workdir / "out" / cfg.name),
             "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", str(a.tune_mm_vision),
             "--bf16", str(a.precision == "bf16"), "--gradient_checkpointing", str(a.gradient_checkpointing),
             "--per_device_train_batch_size", str(cfg.batch), "--gradient_accumulation_steps", str(cfg.accumulation),
             "--max_steps", str(total), "--learning_rate", str(a.learning_rate), "--weight_decay", "0",
             "--lr_scheduler_type", "constant", "--max_grad_norm", "1.0", "--optim", a.optim,
             "--max_pixels", str(ctx.max_pixels), "--min_pixels", str(ctx.min_pixels),
             "--model_max_length", str(a.model_max_length), "--dataloader_num_workers", str(a.num_workers),
             "--logging_steps", str(total), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
             "--seed", str(ctx.seed), "--data_flatten", str(cfg.layout in ("flat", "budget")),
             "--attn_implementation", ctx.attn]
    if _has_training_field("train_sampling_strategy"):
        flags += ["--train_sampling_strategy", "sequential"]
    if ctx.device == "cpu":
        flags += ["--use_cpu", "True"]
    if cfg.layout == "budget":
        flags += ["--max_tokens_per_batch", str(a.max_tokens_per_batch)]
    return flags + list(a.our_flags or []) + cfg.flags


def _static_memory(model) -> int:
    """Bytes of weights, gradients and the two AdamW moments (trainable), and of the frozen weights."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())


def _check_fits(ctx: Context, model) -> None:
    """Refuse to start a run whose weights, gradients and optimizer state alone exceed the GPU."""
    if ctx.device != "cuda":
        return
    need = _static_memory(model)
    have = torch.cuda.get_device_properties(0).total_memory
    if need > have:
        raise torch.OutOfMemoryError(
            f"weights + gradients + AdamW state alone need {need / GIB:.0f} GiB and the GPU has "
            f"{have / GIB:.0f} GiB: not started")


def run_ours(cfg: RunConfig, ctx: Context, timer) -> tuple[object, Meter]:
    from transformers import AutoProcessor

    from qwenvl.data.dataset import make_supervised_data_module
    from qwenvl.train.arguments import parse_args
    from qwenvl.train.model import load_dtype, load_model, prepare_model
    from qwenvl.train.steps import build_trainer, model_class_for_run, train_batch_sampler
    from qwenvl.train.trainer import QwenVLTrainer

    model_args, data_args, training_args, _ = parse_args(our_flags(cfg, ctx))
    processor = AutoProcessor.from_pretrained(ctx.model_dir)
    data_module = make_supervised_data_module(
        processor, data_args, model_config=ctx.config, model_max_length=training_args.model_max_length,
        seed=training_args.seed, output_dir=training_args.output_dir)
    if ctx.weights == "load":
        model = load_model(model_args, training_args)  # exactly train_qwen.py's model
    else:
        model = build_model(ctx, model_class_for_run(ctx.config, model_args, training_args),
                            load_dtype(training_args), ctx.attn)
    model = prepare_model(model, model_args, training_args)
    _check_fits(ctx, model)
    meter = Meter(_visual_ids(ctx.config))
    sampler = train_batch_sampler(data_module["train_dataset"], training_args)  # token budget: packs by length
    trainer = build_trainer(model, training_args, processor, data_module, sampler,
                            trainer_class=metered(QwenVLTrainer), callbacks=[timer])
    trainer.meter = meter
    trainer.train()
    return trainer, meter


def trl_dataset(ctx: Context, rows: int):
    """The first ``rows`` samples of our dataset (the order both trainers read) as TRL's messages + images."""
    import datasets
    from transformers import AutoProcessor

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_supervised_data_module
    from qwenvl.data.render.prompt import template_messages

    data_args = DataArguments(dataset_use=ctx.dataset_use, dataset_dictionary=ctx.dictionary,
                              max_pixels=ctx.max_pixels, min_pixels=ctx.min_pixels)
    processor = AutoProcessor.from_pretrained(ctx.model_dir)
    dataset = make_supervised_data_module(processor, data_args, model_config=ctx.config, seed=ctx.seed)["train_dataset"]
    messages, images = [], []
    for i in range(rows):
        conversation = dataset.conversations(i % len(dataset))
        if isinstance(conversation, list):
            return "not available: packed records"
        turns, image_refs, video_refs = template_messages(conversation)
        if video_refs:
            return "not available: TRL's vision-language collator takes images only and the data has video"
        messages.append(turns)
        images.append(image_refs)
    if not any(images):
        return "not available: no images in the data (TRL would treat it as a text dataset)"
    if all(isinstance(ref, str) for refs in images for ref in refs):
        table = datasets.Dataset.from_dict({"messages": messages, "images": images})
        return table.cast_column("images", datasets.Sequence(datasets.Image()))
    return datasets.Dataset.from_list([{"messages": m, "images": i} for m, i in zip(messages, images)])


def run_trl(cfg: RunConfig, ctx: Context, timer) -> tuple[object, Meter]:
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.render.processor_settings import configure_processor

    if isinstance(ctx.trl_rows, str):
        raise _NotAvailable(ctx.trl_rows)
    a = ctx.args
    total = a.warmup + a.steps
    extra = {"train_sampling_strategy": "sequential"} if _has_training_field("train_sampling_strategy") else {}
    config = SFTConfig(
        output_dir=str(ctx.workdir / "out" / cfg.name), per_device_train_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.accumulation, max_steps=total, learning_rate=a.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim=a.optim,
        bf16=a.precision == "bf16", gradient_checkpointing=a.gradient_checkpointing, seed=ctx.seed,
        max_length=None,  # a length limit would cut image placeholders out of the ids
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=a.num_workers, logging_steps=total, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=ctx.device == "cpu", **extra)
    processor = configure_processor(AutoProcessor.from_pretrained(ctx.model_dir),
                                    DataArguments(max_pixels=ctx.max_pixels, min_pixels=ctx.min_pixels))
    from qwenvl.train.model import model_class_for

    model = build_model(ctx, model_class_for(ctx.config.model_type),
                        torch.bfloat16 if a.precision == "bf16" else torch.float32, ctx.trl_attn)
    # TRL's VLM recipe: freeze the vision tower, train the merger(s) and the language model
    # (the components ours trains with --tune_mm_llm --tune_mm_mlp).
    visual = model.model.visual
    for p in visual.parameters():
        p.requires_grad_(a.tune_mm_vision)
    for name in ("merger", "deepstack_merger_list"):
        for p in getattr(visual, name).parameters() if hasattr(visual, name) else ():
            p.requires_grad_(True)
    if a.trl_fp32_weights:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    _check_fits(ctx, model)
    meter = Meter(_visual_ids(ctx.config))
    trainer = metered(SFTTrainer)(model=model, args=config, train_dataset=ctx.trl_rows, processing_class=processor,
                                  callbacks=[timer])
    trainer.meter = meter
    trainer.train()
    return trainer, meter


class _NotAvailable(Exception):
    pass


def _visual_ids(config) -> list[int]:
    return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if i is not None]


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_config(cfg: RunConfig, ctx: Context, timeout: float) -> dict:
    """Train one configuration (at most ``timeout`` seconds of training) and measure it.

    An OOM or an error becomes the row's status instead of ending the benchmark.
    """
    a = ctx.args
    total = a.warmup + a.steps
    budget = cfg.layout == "budget"
    row = {"config": cfg.name, "trainer": cfg.trainer, "layout": cfg.layout, "batch": None if budget else cfg.batch,
           "accumulation": cfg.accumulation,
           "nominal_samples_per_step": None if budget else cfg.batch * cfg.accumulation,
           "attention": ctx.attn if cfg.trainer == "ours" else ctx.trl_attn,
           "status": "ok"}
    if cfg.trainer == "ours" and (a.our_flags or cfg.flags):
        row["flags"] = " ".join(list(a.our_flags or []) + cfg.flags)
    if budget:
        row["max_tokens_per_batch"] = a.max_tokens_per_batch
    started = time.perf_counter()
    _cleanup(ctx.device)
    from torch._dynamo.utils import counters

    counters.clear()  # graph breaks and graphs of this configuration only (--compile_layers)
    timer = make_timer(ctx.device, cfg.name, total, timeout)
    trainer = meter = None
    try:
        trainer, meter = (run_ours if cfg.trainer == "ours" else run_trl)(cfg, ctx, timer)
    except _NotAvailable as err:
        row["status"] = str(err)
    except torch.OutOfMemoryError as err:
        row["status"] = "OOM"
        row["error"] = str(err).strip().splitlines()[0][:300]
    except Exception as err:  # keep the other configurations going; the traceback goes to stderr
        traceback.print_exc()
        row["status"] = "error"
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    if ctx.device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    if counters["stats"].get("unique_graphs"):
        row["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if trainer is not None:
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        row["trainable_params"] = sum(p.numel() for p in trainable)
        # Read from the trained model, not inferred from flags (a variant may override --master_weights).
        row["trainable_dtype"] = str(trainable[0].dtype).removeprefix("torch.") if trainable else None
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        row["loss"] = round(float(losses[-1]), 4) if losses else None
        _measure(row, timer, meter, ctx, cfg)
    del trainer, meter
    _cleanup(ctx.device)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _measure(row: dict, timer, meter: Meter, ctx: Context, cfg: RunConfig) -> None:
    a = ctx.args
    done = max(timer.times) if timer.times else 0
    first, last = min(a.warmup, done), done
    if timer.stopped_early:
        row["note"] = f"stopped by the time limit after {done} steps"
    if last <= first or first not in timer.times:
        row["status"] = row["status"] if row["status"] != "ok" else "no timed steps"
        return
    steps = last - first
    seconds = timer.times[last] - timer.times[first]
    durations = [timer.times[k] - timer.times[k - 1] for k in range(first + 1, last + 1)]
    work, samples, slots = meter.total(first, last, ctx.vision)
    row.update({
        "timed_steps": steps, "warmup_steps": first,
        "step_s": round(seconds / steps, 4),
        "step_s_min": round(min(durations), 4), "step_s_max": round(max(durations), 4),
        "samples_per_step": round(samples / steps, 2),
        "samples_per_s": round(samples / seconds, 3),
        "tokens_per_s": round(work.tokens / seconds, 1),
        "text_tokens_per_s": round((work.tokens - work.visual_tokens) / seconds, 1),
        "visual_tokens_per_s": round(work.visual_tokens / seconds, 1),
        "tokens_per_sample": round(work.tokens / max(samples, 1), 1),
        "visual_tokens_per_sample": round(work.visual_tokens / max(samples, 1), 1),
        "padding_fraction": round(1 - work.tokens / slots, 4) if slots else None,
        "vision_patches_per_s": round(work.patches / seconds, 1),
    })
    if ctx.lang is not None:
        flops = training_flops(work, ctx.lang, ctx.vision, train_vision=a.tune_mm_vision)
        row["model_tflops_per_step"] = round(flops / steps / 1e12, 3)
        row["achieved_tflops"] = round(flops / seconds / 1e12, 2)
        value = mfu(flops, seconds, ctx.peak)
        row["mfu"] = round(value, 4) if value is not None else None


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The results as a fixed-width table."""
    head = (f"{'config':<26}{'samples/step':>13}{'s/step':>9}{'samples/s':>11}{'text tok/s':>12}"
            f"{'visual tok/s':>14}{'peak GiB':>10}{'MFU %':>7}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        nominal = r.get("nominal_samples_per_step")
        if nominal is None:  # the token budget: what the packs held
            per_step = _fmt(r.get("samples_per_step"), ".1f")
        else:  # batch x accumulation = samples (measured when the configuration ran)
            per_step = f"{r['batch']}x{r['accumulation']}={r.get('samples_per_step', nominal):g}"
        status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
        status += f"; {r['note']}" if r.get("note") else ""
        mfu_pct = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(f"{r['config']:<26}{per_step:>13}{_fmt(r.get('step_s'), '.3f'):>9}"
                     f"{_fmt(r.get('samples_per_s'), '.2f'):>11}{_fmt(r.get('text_tokens_per_s'), ',.0f'):>12}"
                     f"{_fmt(r.get('visual_tokens_per_s'), ',.0f'):>14}{_fmt(r.get('peak_gib'), '.1f'):>10}"
                     f"{_fmt(mfu_pct, '.1f'):>7}  {status}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           **{name: version(name) for name in ("transformers", "trl", "accelerate", "datasets", "peft",
                                               "liger-kernel", "flash-attn")},
           "device": device, "host_cpus": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / GIB, 1))
    return env


def default_output() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "train_throughput.json") if out else str(REPO / "benchmarks" / "results" /
                                                                     "train_throughput.json")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(RELEASED) + sorted(QWEN35), default=None,
                     help="released architecture with random weights: Qwen2.5-VL 3b/7b, Qwen3.5 qwen3_5_9b or "
                          "qwen3_5_35b_a3b (default: 3b)")
    p.add_argument("--layers", type=int, default=None,
                   help="with a Qwen3.5 --model: keep only this many decoder layers (a multiple of 4), e.g. 12 to "
                        "fit the 35B-A3B on one GPU")
    src.add_argument("--model_dir", help="a checkpoint directory (any family our trainer supports)")
    p.add_argument("--weights", choices=("load", "random"), default=None,
                   help="with --model_dir: load its weights (default) or initialise randomly from its config")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list (default {DEFAULT_CONFIGS})")
    p.add_argument("--baseline", choices=("trl", "none"), default="trl", help="'none' drops the trl_* configurations")
    p.add_argument("--samples_per_step", type=int, default=16, help="samples per optimizer step, for every trainer")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--data", choices=("reference", "mix"), default="reference",
                   help="generated data: 'reference' (one image <= 256 visual tokens, ~430 tokens/sample) or 'mix'")
    p.add_argument("--video", action="store_true", help="with --data mix: include short mp4 clips (TRL rows skip)")
    p.add_argument("--samples", type=int, default=None,
                   help="generated samples (default: 1.25 x (warmup + steps) x samples_per_step; the fixed-batch "
                        "configurations read the first ones once, in order)")
    p.add_argument("--annotation", help="your own annotation file (LLaVA or messages format) instead of generated data")
    p.add_argument("--data_path", default=".", help="folder the --annotation media paths are relative to")
    p.add_argument("--max_pixels", type=int, default=None,
                   help=f"most pixels per image (default: {REFERENCE_MAX_PIXELS} for --data reference, else "
                        "our trainer's default)")
    p.add_argument("--min_pixels", type=int, default=None, help="fewest pixels per image (default: the trainer's)")
    p.add_argument("--model_max_length", type=int, default=8192)
    p.add_argument("--max_tokens_per_batch", type=int, default=7168,
                   help="token budget of the ours_budget micro-batch (7168: about 16 reference samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON results (default: $OUT/train_throughput.json or "
                                                  "benchmarks/results/train_throughput.json)")
    p.add_argument("--attn_implementation", default=None, help="ours (default: our automatic choice)")
    p.add_argument("--trl_attn_implementation", default="sdpa",
                   help="TRL's attention (default sdpa: what from_pretrained gives without flash-attn); "
                        "'same' uses ours")
    p.add_argument("--our_flags", type=shlex.split, default=[],
                   help='extra train_qwen.py flags for our configurations, e.g. --our_flags="--master_weights bf16"')
    p.add_argument("--variant", action="append", default=[], metavar='LABEL="FLAGS"',
                   help='flags of a variant of ours, named in --configs as NAME@LABEL, e.g. --variant '
                        'fast="--compile_layers True --gradient_checkpointing False" --configs '
                        'ours_flat_bs16,ours_flat_bs16@fast,trl_bs16 (repeatable)')
    p.add_argument("--trl_fp32_weights", action="store_true",
                   help="give TRL fp32 trainable weights like ours (default: bf16, TRL's recipe)")
    p.add_argument("--gradient_checkpointing", type=_bool, default=True)
    p.add_argument("--tune_mm_vision", type=_bool, default=False)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--optim", default=None, help="both trainers (default: our trainer's default)")
    p.add_argument("--num_workers", type=int, default=8, help="dataloader workers, both trainers")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="both trainers (default: bf16 on cuda; fp32 on cpu, where bf16 matmuls crawl)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: from the GPU name, 989 for H100 SXM/H200)")
    p.add_argument("--config_timeout", type=float, default=150.0,
                   help="seconds of training after which a configuration stops and reports the steps it timed")
    p.add_argument("--time_budget", type=float, default=540.0,
                   help="wall-clock budget of the whole run: each configuration's training is cut to fit it, "
                        "and one that cannot get 30 s is skipped (its row says so)")
    args = p.parse_args(argv)
    if args.model is None and args.model_dir is None:
        args.model = "3b"
    if args.weights is None:
        args.weights = "load" if args.model_dir else "random"
    elif args.model and args.weights == "load":
        p.error("--weights load needs --model_dir (--model builds random weights)")
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as err:
        p.error(str(err))
    if args.layers and args.model not in QWEN35:
        p.error(f"--layers applies to a Qwen3.5 --model ({', '.join(sorted(QWEN35))})")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.optim is None:
        from qwenvl.train.arguments import TrainingArguments

        args.optim = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    return args


MIN_SAMPLE_TOKENS = 128  # fewer tokens than a generated sample (reference ones: an image and ~155 answer words, ~380 in all)


def generated_samples(args, configs) -> int:
    """How many samples to generate so that no configuration's warm-up and timed steps cross an epoch.

    An epoch boundary restarts the data loader's workers: a multi-second stall inside the timed
    steps (seen on the Qwen3.5-9B: 180 samples, 16k-token batches of ~43 samples, every 4th step
    2.5 s slower than the others).  A token-budget batch takes as many samples as fit, so it is sized
    for ``--max_tokens_per_batch`` of the shortest possible samples; 25% to spare."""
    per_step = args.samples_per_step
    if any(isinstance(c, RunConfig) and c.layout == "budget" for c in configs):
        per_step = max(per_step, args.max_tokens_per_batch // MIN_SAMPLE_TOKENS)
    return -(-5 * (args.warmup + args.steps) * per_step // 4)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_cli(argv)
    t0 = time.perf_counter()
    from qwenvl.train.train_qwen import default_allocator_settings

    default_allocator_settings()  # as train_qwen.py runs (before the first CUDA allocation)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {text}", flush=True)

    from transformers import AutoConfig

    from qwenvl.data.arguments import DataArguments

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; pass --device cpu for a smoke run")
    output = args.output or default_output()
    workdir = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    defaults = {f.name: f.default for f in dataclasses.fields(DataArguments)}

    if args.model_dir:
        model_dir = os.path.abspath(args.model_dir)
        say(f"model: {model_dir} ({args.weights} weights)")
    else:
        depth = f" at {args.layers} layers" if args.layers else ""
        say(f"model: released {args.model} architecture{depth}, random weights")
        model_dir = str(write_model_dir(args.model, workdir / "model", args.layers))
        if args.model in RELEASED:
            say(f"parameter counts match the released model: {RELEASED[args.model]['params'][0]:,}")
    config = AutoConfig.from_pretrained(model_dir)

    if args.annotation:
        dictionary = bench_data.write_dictionary(workdir / "data", args.annotation, args.data_path)
        dataset_use, data_summary = "user_data", {"annotation": os.path.abspath(args.annotation)}
    else:
        n = args.samples or generated_samples(args, parse_configs(args.configs, args.samples_per_step, args.variants))
        say(f"generating {n} samples ({args.data}{', with video' if args.video else ''})")
        data = bench_data.generate(workdir / "data", n, args.data, args.seed, args.video)
        dictionary, dataset_use = data.dictionary, data.name
        words = data.answer_words
        data_summary = {"mode": args.data, "samples": n, "kinds": data.counts, "images": data.images,
                        "videos": data.videos, "answer_words_mean": round(sum(words) / len(words), 1)}
        say(f"data: {data.counts}, {data.images} images, {data.videos} videos")
    max_pixels = args.max_pixels or (REFERENCE_MAX_PIXELS if args.data == "reference" and not args.annotation
                                     else defaults["max_pixels"])
    min_pixels = min(args.min_pixels or defaults["min_pixels"], max_pixels)

    try:
        lang = LanguageShape.from_config(config.get_text_config())
        vision = VisionShape.from_config(config.vision_config, config.model_type)
    except (ValueError, AttributeError) as err:
        say(f"MFU not computed: {err}")
        lang = vision = None
    env = environment(args.device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(env.get("gpu"))
    attn = choose_attention(args.attn_implementation, args.device)
    trl_attn = attn if args.trl_attn_implementation == "same" else args.trl_attn_implementation
    ctx = Context(args=args, device=args.device, model_dir=model_dir, config=config, weights=args.weights,
                  seed=args.seed, dictionary=str(dictionary), dataset_use=dataset_use, max_pixels=max_pixels,
                  min_pixels=min_pixels, workdir=workdir, attn=attn, trl_attn=trl_attn, lang=lang, vision=vision,
                  peak=peak)

    configs = parse_configs(args.configs, args.samples_per_step, args.variants)
    if args.baseline == "none":
        configs = [c for c in configs if not (isinstance(c, RunConfig) and c.trainer == "trl")]
    if any(isinstance(c, RunConfig) and c.trainer == "trl" for c in configs):
        try:
            import trl  # noqa: F401

            ctx.trl_rows = trl_dataset(ctx, (args.warmup + args.steps) * args.samples_per_step)
        except Exception as err:  # no TRL (or one of its dependencies), or data TRL cannot take
            traceback.print_exc()
            ctx.trl_rows = f"not available: {type(err).__name__}: {str(err).strip()[:200]}"
    say(f"attention: ours {attn}, TRL {trl_attn}; {max_pixels} max pixels; peak "
        f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")

    payload = {"benchmark": "train_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
               "args": vars(args), "environment": env, "model": args.model or model_dir,
               "model_type": config.model_type, "data": data_summary, "max_pixels": max_pixels,
               "min_pixels": min_pixels, "samples_per_step": args.samples_per_step,
               "peak_flops": peak, "rows": []}
    rows = payload["rows"]
    for cfg in configs:
        if isinstance(cfg, str):
            rows.append({"config": cfg.split(":")[0], "status": "error", "error": cfg})
            continue
        # Model building, data-loader start-up and clean-up take up to about a minute besides training.
        timeout = min(args.config_timeout, args.time_budget - (time.perf_counter() - t0) - SETUP_SECONDS)
        if timeout < 30:
            rows.append({"config": cfg.name, "trainer": cfg.trainer, "status": f"skipped: --time_budget "
                         f"{args.time_budget:.0f} s used up", "batch": cfg.batch, "accumulation": cfg.accumulation})
            continue
        say(f"{cfg.name}: {cfg.trainer}, {cfg.layout}, batch {cfg.batch} x accumulation {cfg.accumulation}")
        row = run_config(cfg, ctx, timeout)
        rows.append(row)
        say(f"{cfg.name}: {row['status']}" + (f", {row['samples_per_s']} samples/s, {row['step_s']} s/step"
                                               if "samples_per_s" in row else ""))
        write_json(output, payload)
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(output, payload)

    gpu = env.get("gpu", "CPU")
    print(f"\nresults: {output}")
    print(f"{payload['model']} on {gpu}; {args.samples_per_step} samples per optimizer step for every trainer "
          f"(batch x accumulation); {args.steps} timed steps after {args.warmup} warm-up; data {payload['data']}; "
          f"attention ours={attn} TRL={trl_attn}; gradient checkpointing {args.gradient_checkpointing}; "
          f"vision tower {'trained' if args.tune_mm_vision else 'frozen'}")
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
