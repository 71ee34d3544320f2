"""--compile_layers: each decoder layer and vision block compiled in place, on CPU with inductor.

The attention kernel here is the CPU reference of test_attention.py wrapped as an opaque
custom op (as PyTorch's own varlen_attn is), so a graph break would come from our model-side
plumbing, not from the reference kernel's Python loops.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForImageTextToText

from qwenvl.train.attention import VarlenKernel, apply_attn_implementation, register_attention
from qwenvl.train.compile import compile_layers, is_compiled, repeated_layers

from tests.conftest import FAMILIES

from .test_attention import _flattened_batch, _reference

TRACEABLE = "flash_varlen_traceable_reference"


# -- the reference kernel as an opaque op with its own backward op --------------------------------
@torch.library.custom_op("qwenvl_tests::varlen_ref", mutates_args=())
def _varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                scale: float, left: int, right: int) -> torch.Tensor:
    return _reference(q, k, v, cu_q, cu_k, scale=scale, window=(left, right), gqa=True)


@_varlen_ref.register_fake
def _(q, k, v, cu_q, cu_k, scale, left, right):
    return torch.empty_like(q)


@torch.library.custom_op("qwenvl_tests::varlen_ref_backward", mutates_args=())
def _varlen_ref_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                         cu_k: torch.Tensor, scale: float, left: int, right: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op's body runs below the autograd key, so differentiate with torch.func.
    def attention(q, k, v):
        return _reference(q, k, v, cu_q, cu_k, scale=scale, window=(left, right), gqa=True)

    _, vjp = torch.func.vjp(attention, q, k, v)
    return tuple(g.contiguous() for g in vjp(grad))


@_varlen_ref_backward.register_fake
def _(grad, q, k, v, cu_q, cu_k, scale, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.scale, ctx.left, ctx.right = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)


def _backward(ctx, grad):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    gq, gk, gv = _varlen_ref_backward(grad, q, k, v, cu_q, cu_k, ctx.scale, ctx.left, ctx.right)
    return gq, gk, gv, None, None, None, None, None


_varlen_ref.register_autograd(_backward, setup_context=_setup)


def traceable_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.14's varlen_attn signature over the opaque reference op."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _varlen_ref(query, key, value, cu_seq_q, cu_seq_k, scale, window_size[0], window_size[1])


@pytest.fixture(scope="module")
def traceable_attention():
    return register_attention(TRACEABLE, kernel=VarlenKernel.from_function(traceable_varlen, needs_half=False))


# -- helpers ---------------------------------------------------------------------------------------------
def _load(path, attention):
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    apply_attn_implementation(model, attention)
    model.config.use_cache = False
    model.train()
    return model


def _step(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _graph_count() -> int:
    return int(counters["stats"]["unique_graphs"])


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_checkpointing", "checkpointing"])
def test_compiled_layers_equal_eager_without_graph_breaks(tiny_model_dir, traceable_attention, model_type,
                                                          checkpointing):
    """Same weights, same packed batch: loss and every gradient as eager (fp32), no graph break
    anywhere in the compiled layers (with checkpointing too, where a break would silently run the
    layer eagerly), and a batch of another length reuses the graphs (dynamic shapes)."""
    path = tiny_model_dir(model_type)
    batch = _flattened_batch(path, big_images=True)
    want_loss, want_grads = _step(_load(path, traceable_attention), batch)

    torch._dynamo.reset()
    counters.clear()
    model = _load(path, traceable_attention)
    if checkpointing:
        model.gradient_checkpointing_enable()
    layers = repeated_layers(model)
    assert compile_layers(model) == len(layers) > 0 and all(is_compiled(m) for _, m in layers)
    loss, grads = _step(model, batch)

    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph per kind of layer (decoder layer; vision block), not one per layer.
    assert 0 < _graph_count() <= 2 * len({type(m) for _, m in layers}), _graph_count()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)

    graphs = _graph_count()
    shorter = _flattened_batch(path, big_images=True, count=2)  # other token counts, same graphs
    assert shorter["input_ids"].shape[1] != batch["input_ids"].shape[1]
    _step(model, shorter)
    assert _graph_count() == graphs and not counters["graph_break"]


def test_every_layer_gets_the_boundaries_once_per_forward(tiny_model_dir, traceable_attention, monkeypatch):
    """The language model's pre-hook derives the packed boundaries once and every decoder layer's
    attention receives them as kwargs (the per-layer fallback is never asked); the vision blocks
    keep their own cu_seqlens."""
    from qwenvl.train import attention as attn

    class NoFallback:
        def get(self, *args):
            raise AssertionError("a layer derived the boundaries itself: the pre-hook did not supply them")

    derived = []

    def counting(position_ids):
        derived.append(position_ids.shape)
        return layout_from_position_ids(position_ids)

    layout_from_position_ids = attn.layout_from_position_ids
    monkeypatch.setattr(attn, "_POSITION_LAYOUTS", NoFallback())
    monkeypatch.setattr(attn, "layout_from_position_ids", counting)
    path = tiny_model_dir("qwen2_5_vl")
    model = _load(path, traceable_attention)
    seen = []

    @functools.wraps(traceable_varlen)
    def spy(*args, **kwargs):
        seen.append(args[3].tolist())
        return traceable_varlen(*args, **kwargs)

    register_attention(TRACEABLE, kernel=VarlenKernel.from_function(spy, needs_half=False))
    try:
        batch = _flattened_batch(path, big_images=False)
        with torch.no_grad():
            model(**batch)
    finally:
        register_attention(TRACEABLE, kernel=VarlenKernel.from_function(traceable_varlen, needs_half=False))
    text = batch["position_ids"][0, 0]
    starts = [i for i in range(len(text)) if text[i] == 0] + [len(text)]
    layers = model.config.text_config.num_hidden_layers
    assert seen[-layers:] == [starts] * layers  # the decoder layers come last
    assert all(cu != starts for cu in seen[:-layers])  # vision blocks: image windows, not samples
    assert len(derived) == 1, derived


@pytest.mark.slow
def test_train_qwen_with_compiled_layers_saves_a_plain_checkpoint(tiny_model_dir, tmp_path):
    """Through train_qwen.py, with checkpointing every other layer: the run trains, and the saved
    weights have the released names (no ``_orig_mod.``) and load without this package's help."""
    from qwenvl.train.train_qwen import train

    from .test_train_qwen import _flags

    base = tiny_model_dir("qwen2_5_vl")
    out = train(_flags(base, tmp_path / "out", "--tune_mm_llm", "True", "--data_flatten", "True",
                       "--compile_layers", "True", "--max_steps", "3", "--gradient_checkpointing", "True",
                       "--activation_checkpointing_kwargs", '{"every_n_layers": 2}', "--save_strategy", "no"))
    trained = AutoModelForImageTextToText.from_pretrained(out)
    original = AutoModelForImageTextToText.from_pretrained(base)
    assert trained.state_dict().keys() == original.state_dict().keys()
    moved = [n for n, p in trained.named_parameters()
             if "language_model.layers" in n and not torch.equal(p, original.get_parameter(n))]
    assert moved, "no decoder-layer weight changed"


# -- GPU: PyTorch's own varlen kernel inside compiled layers ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_compiled_layers_on_gpu_with_torch_varlen_kernel(tiny_model_dir, model_type):
    """bf16 on CUDA with checkpointing: no graph break around torch's varlen_attn, and the loss and
    gradients as eager within bf16 tolerance."""
    from qwenvl.train.attention import VARLEN_ATTENTION

    from .test_attention import _batch_on, _relative_error

    path = tiny_model_dir(model_type)
    batch = _batch_on(path, "cuda", torch.bfloat16)
    register_attention()

    def load():
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa",
                                                            dtype=torch.bfloat16).cuda()
        apply_attn_implementation(model, VARLEN_ATTENTION)
        model.config.use_cache = False
        model.train()
        model.gradient_checkpointing_enable()
        return model

    want_loss, want_grads = _step(load(), batch)
    torch._dynamo.reset()
    counters.clear()
    model = load()
    compile_layers(model)
    loss, grads = _step(model, batch)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _relative_error(loss.float(), want_loss.float()) < 1e-2
    worst = max(_relative_error(grads[n].float(), want_grads[n].float()) for n in want_grads)
    assert worst < 5e-2, worst


_FIRST_FORWARD_COMPILED = """
import sys, torch
from qwenvl.train.attention import VARLEN_ATTENTION, apply_attn_implementation, choose_attn_implementation
from qwenvl.train.compile import compile_layers
from tests.train.test_attention import _batch_on, _load
name = choose_attn_implementation(VARLEN_ATTENTION, device_is_cuda=True)  # as --attn_implementation does
model = _load(sys.argv[1], torch.bfloat16, "cuda")
apply_attn_implementation(model, name)
model.train()
compile_layers(model)
loss = model(**_batch_on(sys.argv[1], "cuda", torch.bfloat16)).loss
loss.backward()
print("LOSS", float(loss))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_first_forward_with_the_torch_kernel_asked_for_by_name(tiny_model_dir):
    """A fresh process whose first forward is compiled, with --attn_implementation flash_varlen_torch given (so
    nothing asked for the kernel before): it trains. Before, the kernel object was built inside the trace and
    torch 2.11's dynamo failed on it ("'VarlenKernel' object has no attribute 'fn'")."""
    from tests.commands import run_command

    from .test_train_qwen import _env  # keeps the caller's PYTHONPATH

    result = run_command([sys.executable, "-c", _FIRST_FORWARD_COMPILED, str(tiny_model_dir("qwen2_5_vl"))],
                         env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = float(result.stdout.split("LOSS ")[-1])
    assert 0 < loss < 20


def test_compiling_layers_raises_the_recompile_limit_and_keeps_a_higher_one(tiny_model_dir):
    """All layers share one compiled function, whose 8 versions (torch's default) real image sizes
    used up on a GPU (the test below): compile_layers leaves room for them."""
    from qwenvl.train.compile import RECOMPILE_LIMIT

    for before, after in ((8, RECOMPILE_LIMIT), (RECOMPILE_LIMIT * 2, RECOMPILE_LIMIT * 2)):
        with torch._dynamo.config.patch(recompile_limit=before):
            compile_layers(_load(tiny_model_dir("qwen2_5_vl"), "sdpa"))
            assert torch._dynamo.config.recompile_limit == after


_PATCH_COUNTS = [(16, 16), (40, 40), (64, 64), (60, 58), (140, 140), (20, 30)]  # 256 to 19,600 patches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_vision_blocks_stay_compiled_through_every_image_size_and_evaluation():
    """Qwen2.5-VL vision blocks at released widths (4 of them, bf16, torch's varlen kernel), compiled as
    training compiles them, meet images of 256 to 19,600 patches with gradients, then under no_grad as
    in an evaluation: dynamo never reaches its recompile limit (after which the blocks would run eagerly
    for good), and the evaluation gets graphs of its own. Measured before the limit was raised (H200,
    torch 2.11): 8 graphs in training, and the evaluation hit the limit."""
    import logging

    from benchmarks.train_throughput import released_config
    from qwenvl.hf_internals import build_from_config
    from qwenvl.train.attention import VARLEN_ATTENTION
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = released_config("7b")
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 4, [3]
    config.text_config.num_hidden_layers = 1
    register_attention()
    torch._dynamo.reset()
    counters.clear()
    with torch.device("cuda"):
        model = build_from_config(Qwen2_5_VLForConditionalGeneration, config, dtype=torch.bfloat16,
                                  attn_implementation="sdpa")
    apply_attn_implementation(model, VARLEN_ATTENTION)
    model.train()
    compile_layers(model)

    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        def run(grad: bool):
            for h, w in _PATCH_COUNTS:
                pixels = torch.randn(h * w, 1176, device="cuda", dtype=torch.bfloat16)
                with torch.set_grad_enabled(grad):
                    out = model.model.visual(pixels, grid_thw=torch.tensor([[1, h, w]], device="cuda"))
                    if grad:
                        out.pooler_output.float().sum().backward()

        run(grad=True)
        trained = _graph_count()
        run(grad=False)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert not [w for w in warnings if "recompile_limit" in w], warnings
    assert _graph_count() > trained > 2, (trained, _graph_count())


@pytest.mark.slow
def test_compiled_layers_under_deepspeed_zero2(tiny_model_dir, tmp_path):
    """ZeRO-2 (one CPU process) with compiled layers: the run trains the language model and
    saves a checkpoint with the released parameter names."""
    import sys

    from .conftest import free_port
    from .test_train_qwen import _changed, _env, _flags, _run

    base = tiny_model_dir("qwen2_5_vl")
    out = tmp_path / "out"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = _run([sys.executable, "-m", "qwenvl.train.train_qwen",
                   *_flags(base, out, "--tune_mm_llm", "True", "--data_flatten", "True", "--compile_layers", "True",
                           "--max_steps", "2", "--save_strategy", "no", "--deepspeed", "scripts/zero2.json")], env)
    assert "loss: first" in result.stdout
    assert _changed(base, out) == {"llm"}
    saved = AutoModelForImageTextToText.from_pretrained(out).state_dict().keys()
    assert saved == AutoModelForImageTextToText.from_pretrained(base).state_dict().keys()


# -- vision blocks whose attention loops over images ---------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_vision_blocks_stay_eager_where_their_attention_loops_over_images(tiny_model_dir, traceable_attention,
                                                                          model_type):
    """sdpa/eager vision attention runs image by image in a Python loop: those blocks are left
    uncompiled (the loop length would be a guard); with a "flash" (varlen) name everything compiles."""
    path = tiny_model_dir(model_type)
    looping = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    compile_layers(looping)
    compiled = {type(layer).__name__: is_compiled(layer) for _, layer in repeated_layers(looping)}
    assert {name: done for name, done in compiled.items() if "Vision" in name} == {
        name: False for name in compiled if "Vision" in name} != {}
    assert all(done for name, done in compiled.items() if "Vision" not in name)
    varlen = _load(path, traceable_attention)
    compile_layers(varlen)
    assert all(is_compiled(layer) for _, layer in repeated_layers(varlen))


@pytest.mark.slow
def test_sdpa_compiled_layers_do_not_recompile_as_the_image_count_changes(tiny_model_dir):
    """Three batches with 1, 2 and 3 images through a model compiled with sdpa attention: after the
    first step's graphs, nothing recompiles (the per-image loop of the vision blocks used to)."""
    from PIL import Image
    from transformers import AutoConfig

    from qwenvl.data.batch.collate import FlattenedCollator
    from qwenvl.data.catalog.formats import Conversation
    from qwenvl.data.render.sample import SampleRenderer
    from tests.conftest import load_processor

    path = tiny_model_dir("qwen2_5_vl")
    renderer = SampleRenderer(load_processor(path), AutoConfig.from_pretrained(path))

    def batch(images: int):
        content = [{"type": "image", "image": Image.new("RGB", (56, 84), (200, 10 * i, 10))} for i in range(images)]
        chat = [{"role": "user", "content": content + [{"type": "text", "text": "Colours?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red " * images}]}]
        return FlattenedCollator()([renderer.render(Conversation(messages=chat, origin=f"{images} images"))])

    torch._dynamo.reset()
    counters.clear()
    model = _load(path, "sdpa")
    compile_layers(model)
    _step(model, batch(1))
    first = _graph_count()
    for images in (2, 3):
        _step(model, batch(images))
    assert _graph_count() == first, dict(counters["recompiles"]) if "recompiles" in counters else first
