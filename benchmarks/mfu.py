"""Model FLOPs of a Qwen-VL training step, and MFU (model FLOPs utilisation).

MFU = (model FLOPs of the work done) / (step time) / (peak dense bf16 FLOP/s of the GPU).

Model FLOPs count the arithmetic the model needs, not what the kernels run: the
recomputation of gradient checkpointing and the work spent on padding tokens are
*not* counted, so both show up as lower MFU (as in PaLM's definition).  A
multiply-add is 2 FLOPs.

Language model, per step (the LLM trains):

    6 * N_llm * T  +  12 * L * d_attn * P

* ``N_llm`` = matmul weights of the language model: per layer q, k, v, o projections and
  the gate/up/down MLP, plus the lm_head (counted even when tied to the embeddings,
  since it is a matmul); embedding lookups, norms and biases are left out.  A token
  costs 2 N forward and 4 N backward (gradients of activations and of weights).
* ``T`` = real (non-padding) tokens of the step, text and visual placeholders alike.
* Attention: forward ``Q K^T`` and ``A V`` are 2 * d_attn FLOPs each per (query, key)
  pair, per layer (``d_attn`` = heads * head_dim); backward is twice the forward, so
  12 * d_attn per pair per layer.  ``P`` = causal pairs = sum over sequences of
  s (s + 1) / 2 (about s^2 / 2: "halved for causal").  Samples packed into one row
  attend only within themselves, so ``s`` is a sample's length, never the row's.

Vision tower (Qwen2.5-VL: windowed attention except in the full-attention blocks):

    forward = 2 * N_patch * patches  +  4 * d_vis * (L_window * W + L_full * F)

* ``N_patch`` = matmul weights applied to every patch: the patch embedding (a Conv3d
  of 3 x 2 x 14 x 14 inputs per patch, i.e. a matmul) and every block's qkv, proj
  and MLP weights.
* ``W`` = sum over attention windows of n^2 (n = patches in the window; 8 x 8 patches
  for a 112-pixel window, smaller at the right and bottom edges), ``F`` = the same
  over whole frames (full-attention blocks attend within one temporal frame of one
  image or video); vision attention is not causal, so all n^2 pairs count.
* The vision tower only runs forward when it is frozen (the default here); with
  ``--tune_mm_vision`` its backward adds twice the forward (x3 in all).
* The merger (``N_merger`` weights, applied per merged token = patches / 4) trains:
  6 * N_merger per merged token.

Peak: 989 TFLOP/s dense bf16 for the H100 SXM and the H200 (NVIDIA's datasheet
figure without sparsity); other GPUs in ``PEAK_BF16``, or give the figure yourself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
# Checked in order: the first match wins, so the PCIe/NVL variants come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name, or None when unknown (e.g. a CPU)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


@dataclass(frozen=True)
class LanguageShape:
    """The dimensions of a dense decoder that set its FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> "LanguageShape":
        """From a Qwen2/Qwen2.5/Qwen3-VL text config; raises ValueError for mixture-of-experts models."""
        if getattr(text_config, "num_experts", None) or getattr(text_config, "moe_intermediate_size", None):
            raise ValueError("mixture-of-experts language models are not covered by this FLOP formula")
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(layers=text_config.num_hidden_layers, hidden=text_config.hidden_size, heads=heads,
                   kv_heads=getattr(text_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=text_config.intermediate_size, vocab=text_config.vocab_size)

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def matmul_params(self) -> int:
        """Matmul weights: q, k, v, o and gate/up/down per layer, plus the lm_head."""
        attention = self.hidden * self.attn_width * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden


@dataclass(frozen=True)
class VisionShape:
    """The dimensions of a Qwen-VL vision tower that set its FLOPs."""

    depth: int
    width: int  # attention width (heads * head_dim = hidden size of the tower)
    patch_params: int  # matmul weights applied to every patch (patch embedding + blocks)
    merger_params: int  # matmul weights applied to every merged token (merger, deepstack mergers)
    merge_size: int  # patches per merged token = merge_size ** 2
    window: int | None  # window side in merged tokens (Qwen2.5-VL: 112 // 14 // 2 = 4); None: no windows
    full_blocks: int  # blocks with full (per-frame) attention; the others are windowed

    @property
    def window_blocks(self) -> int:
        return self.depth - self.full_blocks if self.window else 0

    @classmethod
    def from_config(cls, vision_config, model_type: str) -> "VisionShape":
        """From the vision config of a qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_vl_moe model."""
        v = vision_config
        m = v.spatial_merge_size
        patch_in = getattr(v, "in_channels", getattr(v, "in_chans", 3)) * v.temporal_patch_size * v.patch_size ** 2
        if model_type == "qwen2_vl":
            width = v.embed_dim
            mlp = 2 * width * int(width * v.mlp_ratio)
            out = v.hidden_size
            mergers = 1
        elif model_type == "qwen2_5_vl":
            width = v.hidden_size
            mlp = 3 * width * v.intermediate_size
            out = v.out_hidden_size
            mergers = 1
        elif model_type in ("qwen3_vl", "qwen3_vl_moe"):
            width = v.hidden_size
            mlp = 2 * width * v.intermediate_size
            out = v.out_hidden_size
            mergers = 1 + len(getattr(v, "deepstack_visual_indexes", []) or [])
        else:
            raise ValueError(f"no vision FLOP formula for model_type {model_type!r}")
        block = 4 * width * width + mlp  # qkv (3 w^2) + proj (w^2) + MLP
        merged_in = width * m * m
        merger = mergers * (merged_in * merged_in + merged_in * out)
        window = None
        full = v.depth
        if model_type == "qwen2_5_vl":
            window = v.window_size // m // v.patch_size
            full = len(v.fullatt_block_indexes)
        return cls(depth=v.depth, width=width, patch_params=patch_in * width + v.depth * block,
                   merger_params=merger, merge_size=m, window=window, full_blocks=full)


def causal_pairs(lengths: Iterable[int]) -> int:
    """(query, key) pairs of causal attention over sequences of these lengths: sum of s (s + 1) / 2."""
    return sum(int(s) * (int(s) + 1) // 2 for s in lengths)


def _window_extents(n: int, window: int) -> list[int]:
    return [min(window, n - start) for start in range(0, n, window)]


def vision_attention_pairs(grids: Iterable[Sequence[int]], shape: VisionShape) -> tuple[int, int]:
    """(window pairs, full pairs) for images/videos with patch grids (t, h, w).

    Full attention runs within each temporal frame: t * (h w)^2 pairs.  Windowed
    attention (Qwen2.5-VL) tiles each frame's (h/m) x (w/m) merged tokens into windows
    of ``window`` x ``window``, smaller at the edges; a window of r x c merged tokens
    holds r c m^2 patches, so a frame gives m^4 * (sum r_i^2) * (sum c_j^2) pairs.
    """
    window_pairs = full_pairs = 0
    m = shape.merge_size
    for t, h, w in grids:
        t, h, w = int(t), int(h), int(w)
        full_pairs += t * (h * w) ** 2
        if shape.window:
            rows = sum(r * r for r in _window_extents(h // m, shape.window))
            cols = sum(c * c for c in _window_extents(w // m, shape.window))
            window_pairs += t * m ** 4 * rows * cols
    return window_pairs, full_pairs


@dataclass
class StepWork:
    """What one optimizer step processed (summed over its micro-batches)."""

    tokens: int = 0  # real tokens through the language model
    visual_tokens: int = 0  # of which image/video placeholders
    pairs: int = 0  # causal attention pairs, sum over samples of s (s + 1) / 2
    patches: int = 0  # vision-tower patches
    window_pairs: int = 0  # see vision_attention_pairs
    full_pairs: int = 0

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple:
        return (self.tokens, self.visual_tokens, self.pairs, self.patches, self.window_pairs, self.full_pairs)


def language_flops(work: StepWork, lang: LanguageShape) -> float:
    """Training FLOPs of the language model: 6 N T + 12 L d_attn P."""
    return 6.0 * lang.matmul_params * work.tokens + 12.0 * lang.layers * lang.attn_width * work.pairs


def vision_flops(work: StepWork, vision: VisionShape, train_vision: bool = False, train_merger: bool = True) -> float:
    """FLOPs of the vision tower (forward, x3 when it trains) and the merger (x3 when it trains)."""
    forward = 2.0 * vision.patch_params * work.patches + 4.0 * vision.width * (
        vision.window_blocks * work.window_pairs + vision.full_blocks * work.full_pairs)
    merged = work.patches / vision.merge_size ** 2
    merger = 2.0 * vision.merger_params * merged
    return forward * (3 if train_vision else 1) + merger * (3 if (train_merger or train_vision) else 1)


def training_flops(work: StepWork, lang: LanguageShape, vision: VisionShape | None,
                   train_vision: bool = False, train_merger: bool = True) -> float:
    """Model FLOPs of the work in ``work`` (see the module docstring)."""
    total = language_flops(work, lang)
    if vision is not None and work.patches:
        total += vision_flops(work, vision, train_vision, train_merger)
    return total


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak or time."""
    if not peak or not seconds or seconds <= 0:
        return None
    return flops / seconds / peak
