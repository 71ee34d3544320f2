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

Qwen3.5 / Qwen3.6 (``qwen3_5``, ``qwen3_5_moe``) add three terms, all in ``N_llm`` or below:

* Gated full attention: ``q_proj`` also yields the output gate (2 x heads x head_dim wide),
  and only the full-attention layers (one in four) count in the attention term.
* Gated DeltaNet (linear-attention) layers: their projections (``in_proj_qkv``, ``in_proj_z``,
  ``in_proj_b``, ``in_proj_a``, ``out_proj``) are in ``N_llm``; per token and layer, the
  depthwise causal convolution costs 2 * conv_dim * kernel forward, and the gated delta rule
  in the chunked form every kernel uses (fla's and transformers' reference, chunk C = 64; per
  value head, q and k repeated to the value heads):

      forward per token = 2 C (2 d_k + d_v) + 6 d_k d_v     (Q K^T and K_beta K^T in the chunk,
                                                          the chunk's attention times V, and three
                                                          d_k x d_v products with the state)

  counted over the tokens of each sample rounded up to whole chunks (``StepWork.chunk_tokens``;
  the kernel computes full chunks), and tripled for training like every other term.  The
  triangular solve inside a chunk (C^2 (d_k + d_v) per chunk) is left out, as torch's FLOP
  counter leaves it out.
* Mixture of experts (``qwen3_vl_moe``, ``qwen3_5_moe``): ``N_llm`` counts the weights a token
  is multiplied with, not the model's weights: the router (hidden x experts), the
  ``num_experts_per_tok`` routed experts (3 x hidden x moe_intermediate each), the shared
  expert and its gate where there is one (Qwen3.5), and dense MLPs in layers without experts.

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


LINEAR_ATTENTION_CHUNK = 64  # the chunk of fla's and transformers' chunked gated delta rule


@dataclass(frozen=True)
class LinearAttentionShape:
    """Gated DeltaNet layers (Qwen3.5): how many, and their widths."""

    layers: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    chunk: int = LINEAR_ATTENTION_CHUNK

    @property
    def conv_dim(self) -> int:
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    def matmul_params(self, hidden: int) -> int:
        """Per layer: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a and out_proj."""
        value = self.v_heads * self.v_dim
        return hidden * self.conv_dim + hidden * value + 2 * hidden * self.v_heads + value * hidden

    def forward_flops(self, tokens: int, chunk_tokens: int) -> float:
        """Forward FLOPs of one layer's convolution (over ``tokens``) and delta rule (over
        ``chunk_tokens``, each sample rounded up to whole chunks)."""
        conv = 2.0 * self.conv_dim * self.conv_kernel * tokens
        per_token = 2 * self.chunk * (2 * self.k_dim + self.v_dim) + 6 * self.k_dim * self.v_dim
        return conv + float(self.v_heads * per_token) * chunk_tokens


@dataclass(frozen=True)
class ExpertShape:
    """The mixture-of-experts MLPs: the weights one token meets in a layer with experts."""

    layers: int  # layers whose MLP has experts
    experts: int
    top_k: int
    intermediate: int  # per expert
    shared_intermediate: int = 0  # the shared expert (Qwen3.5), gated by a hidden x 1 linear

    def active_params(self, hidden: int) -> int:
        shared = 3 * hidden * self.shared_intermediate + hidden if self.shared_intermediate else 0
        return hidden * self.experts + self.top_k * 3 * hidden * self.intermediate + shared


def _moe_layers(text_config) -> int:
    layers = text_config.num_hidden_layers
    dense = set(getattr(text_config, "mlp_only_layers", None) or ())
    step = getattr(text_config, "decoder_sparse_step", 1) or 1
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


@dataclass(frozen=True)
class LanguageShape:
    """The dimensions of a decoder that set its FLOPs.

    ``full_layers``: layers with softmax attention (None: all); ``gated_query``: ``q_proj``
    also yields the attention output gate (Qwen3.5); ``linear`` and ``moe`` as above.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    full_layers: int | None = None
    gated_query: bool = False
    linear: LinearAttentionShape | None = None
    moe: ExpertShape | None = None

    @classmethod
    def from_config(cls, text_config) -> "LanguageShape":
        """From a Qwen2/Qwen2.5/Qwen3-VL(-MoE)/Qwen3.5(-MoE) text config."""
        c = text_config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        types = list(getattr(c, "layer_types", None) or [])
        linear = None
        if "linear_attention" in types:
            linear = LinearAttentionShape(layers=types.count("linear_attention"), k_heads=c.linear_num_key_heads,
                                          v_heads=c.linear_num_value_heads, k_dim=c.linear_key_head_dim,
                                          v_dim=c.linear_value_head_dim, conv_kernel=c.linear_conv_kernel_dim)
        moe = None
        if getattr(c, "num_experts", None):
            moe = ExpertShape(layers=_moe_layers(c), experts=c.num_experts, top_k=c.num_experts_per_tok,
                              intermediate=c.moe_intermediate_size,
                              shared_intermediate=getattr(c, "shared_expert_intermediate_size", 0) or 0)
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=getattr(c, "intermediate_size", 0) or 0, vocab=c.vocab_size,
                   full_layers=c.num_hidden_layers - linear.layers if linear else None,
                   gated_query=c.model_type.startswith("qwen3_5"), linear=linear, moe=moe)

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def attention_layers(self) -> int:
        return self.layers if self.full_layers is None else self.full_layers

    @property
    def matmul_params(self) -> int:
        """Matmul weights one token meets: q (with its gate), k, v, o in the full-attention
        layers, the linear-attention projections, the MLP (active experts), plus the lm_head."""
        query = self.hidden * self.attn_width * (2 if self.gated_query else 1)
        attention = query + self.hidden * self.attn_width + self.hidden * self.kv_heads * self.head_dim * 2
        moe_layers = self.moe.layers if self.moe else 0
        mlp = (self.layers - moe_layers) * 3 * self.hidden * self.intermediate
        if self.moe:
            mlp += moe_layers * self.moe.active_params(self.hidden)
        linear = self.linear.layers * self.linear.matmul_params(self.hidden) if self.linear else 0
        return self.attention_layers * attention + linear + mlp + self.vocab * self.hidden


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
        elif model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):  # Qwen3.5: no deepstack
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
    chunk_tokens: int = 0  # tokens with each sample rounded up to whole linear-attention chunks

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple:
        return (self.tokens, self.visual_tokens, self.pairs, self.patches, self.window_pairs, self.full_pairs,
                self.chunk_tokens)


def chunk_tokens(lengths: Iterable[int], chunk: int = LINEAR_ATTENTION_CHUNK) -> int:
    """Tokens of sequences of these lengths, each rounded up to whole chunks."""
    return sum(-(-int(s) // chunk) * chunk for s in lengths)


def language_flops(work: StepWork, lang: LanguageShape) -> float:
    """Training FLOPs of the language model: 6 N T + 12 L_full d_attn P (+ 3 x the linear-attention
    layers' convolution and delta rule)."""
    total = 6.0 * lang.matmul_params * work.tokens + 12.0 * lang.attention_layers * lang.attn_width * work.pairs
    if lang.linear:
        chunked = work.chunk_tokens or work.tokens
        total += 3.0 * lang.linear.layers * lang.linear.forward_flops(work.tokens, chunked)
    return total


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
