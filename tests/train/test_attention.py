"""The varlen attention function: registration, selection and signature detection on CPU;
its plumbing through the tiny models on CPU with a reference kernel of the same signature;
the real PyTorch kernel against SDPA on a GPU (``-m gpu``)."""
from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwenvl.train import attention as attn
from qwenvl.train.attention import (
                                    VARLEN_ATTENTION,
                                    VarlenKernel,
                                    apply_attn_implementation,
                                    choose_attn_implementation,
                                    layout_from_position_ids,
                                    loadable_attn_implementation,
                                    make_attention_forward,
                                    register_attention,
                                    )
from tests.conftest import load_processor

REFERENCE = "flash_varlen_reference"  # "flash" in the name: the vision towers pass cu_seqlens
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- a CPU reference of varlen_attn, in the three signatures torch has shipped -------------------
def _reference(q, k, v, cu_q, cu_k, *, scale=None, window=(-1, -1), gqa=False):
    """Loop over sequences with SDPA; window (left, right) as FlashAttention reads it,
    aligned bottom-right (query i of Lq sits at key position Lk - Lq + i)."""
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError("this reference kernel was not told enable_gqa")
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
        vs = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        pos = torch.arange(lq)[:, None] + (lk - lq)
        key = torch.arange(lk)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if window[1] >= 0:
            allowed &= key <= pos + window[1]
        if window[0] >= 0:
            allowed &= key >= pos - window[0]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


def varlen_v210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10: is_causal, no scale, no GQA."""
    return _reference(query, key, value, cu_seq_q, cu_seq_k, window=(-1, 0) if is_causal else (-1, -1))


def varlen_v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), k_cache=None, v_cache=None, seqused_k=None):
    """torch 2.11: window_size and scale, no GQA."""
    assert isinstance(window_size, tuple), "2.11 detects causal with window_size == (-1, 0)"
    return _reference(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window=window_size)


def varlen_v214(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.14: window_size, scale and enable_gqa."""
    return _reference(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window=window_size, gqa=enable_gqa)


SIGNATURES = {"2.10": varlen_v210, "2.11": varlen_v211, "2.14": varlen_v214}


class _Module(torch.nn.Module):
    is_causal = True


def _blocked_sdpa(q, k, v, segment_ids, causal, scale):
    """SDPA over (B, H, L, D) with an explicit block-diagonal (causal) mask and GQA."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        same &= torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same, scale=scale, enable_gqa=True).transpose(1, 2)


# -- CPU: signature detection -------------------------------------------------------------------
def test_signature_detection_of_each_torch_release():
    assert VarlenKernel.from_function(varlen_v210) == VarlenKernel(varlen_v210, "is_causal", False, False)
    assert VarlenKernel.from_function(varlen_v211) == VarlenKernel(varlen_v211, "window_size", True, False)
    assert VarlenKernel.from_function(varlen_v214) == VarlenKernel(varlen_v214, "window_size", True, True)
    with pytest.raises(TypeError, match="neither window_size nor is_causal"):
        VarlenKernel.from_function(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)


def test_installed_torch_kernel_is_detected():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        assert attn.torch_varlen_kernel() is None and not attn.varlen_available()
        return
    kernel = attn.torch_varlen_kernel()
    params = inspect.signature(varlen_attn).parameters
    assert kernel.fn is varlen_attn and kernel.needs_half
    assert kernel.causal_style == ("window_size" if "window_size" in params else "is_causal")
    assert kernel.has_gqa == ("enable_gqa" in params) and kernel.has_scale == ("scale" in params)


@pytest.mark.parametrize("version", SIGNATURES)
@pytest.mark.parametrize("causal", [True, False])
def test_each_signature_gives_the_same_packed_attention(version, causal):
    """Packed samples, GQA (8 query heads on 2 kv heads) and a non-default scale, through the
    spelling of each release: equal to SDPA with an explicit block-diagonal mask."""
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    q, k, v = torch.randn(1, 8, total, 16), torch.randn(1, 2, total, 16), torch.randn(1, 2, total, 16)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    fn = make_attention_forward(VarlenKernel.from_function(SIGNATURES[version], needs_half=False))
    out, weights = fn(_Module(), q, k, v, None, scaling=0.3, is_causal=causal, position_ids=positions)
    assert weights is None and out.shape == (1, total, 8, 16)
    torch.testing.assert_close(out, _blocked_sdpa(q, k, v, segments, causal, 0.3), rtol=1e-5, atol=1e-5)


def test_vision_windows_from_cu_seqlens_are_not_causal():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 4, 10, 16], dtype=torch.int32)  # an empty window, as Qwen2.5-VL can make
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    segments = torch.repeat_interleave(torch.arange(4), torch.diff(cu).long())[None]
    fn = make_attention_forward(VarlenKernel.from_function(varlen_v214, needs_half=False))
    module = _Module()
    module.is_causal = False
    out, _ = fn(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=6, max_length_k=6, is_causal=False)
    torch.testing.assert_close(out, _blocked_sdpa(q, k, v, segments, False, 0.5), rtol=1e-5, atol=1e-5)


def test_unpacked_rows_and_padded_rows():
    torch.manual_seed(0)
    fn = make_attention_forward(VarlenKernel.from_function(varlen_v214, needs_half=False))
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    # No positions, no mask: each row one causal sequence.
    out, _ = fn(_Module(), q, k, v, None, scaling=None)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A right-padded row: real tokens match, padding rows are zeros.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out, _ = fn(_Module(), q, k, v, mask, scaling=None)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    short = F.scaled_dot_product_attention(q[1:, :, :4], k[1:, :, :4], v[1:, :, :4], is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out[1:, :4], short, rtol=1e-5, atol=1e-5)
    assert not out[1, 4:].any()


def test_sliding_window_matches_transformers_convention():
    """sliding_window=W keeps the last W keys (the query's own included), as transformers' masks do."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    fn = make_attention_forward(VarlenKernel.from_function(varlen_v214, needs_half=False))
    out, _ = fn(_Module(), q, k, v, None, scaling=None, sliding_window=3)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 3)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="2.11"):
        make_attention_forward(VarlenKernel.from_function(varlen_v210, needs_half=False))(
            _Module(), q, k, v, None, sliding_window=3)


def test_refuses_dropout_and_4d_masks():
    fn = make_attention_forward(VarlenKernel.from_function(varlen_v214, needs_half=False))
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        fn(_Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="2D padding mask"):
        fn(_Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_missing_kernel_says_which_torch():
    fn = make_attention_forward(lambda: None)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="torch >= 2.10"):
        fn(_Module(), q, q, q, None)


def test_position_layout_splits_where_positions_restart():
    layout = layout_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert layout.cu_q.tolist() == [0, 3, 5, 9] and layout.max_q == 4 and layout.cu_q.dtype == torch.int32
    # Two rows: each row start begins a sequence even where positions continue.
    layout = layout_from_position_ids(torch.tensor([[0, 1, 2], [3, 4, 0]]))
    assert layout.cu_q.tolist() == [0, 3, 5, 6]


def test_position_layout_is_derived_once_per_forward():
    cache = attn._PositionLayoutCache()
    positions = torch.tensor([[0, 1, 0, 1, 2]])
    first = cache.get(positions, 1)
    assert cache.get(positions, 1) is first  # the next layer
    positions.add_(0)  # an in-place change bumps the version: derived again
    assert cache.get(positions, 1) is not first
    assert cache.get(positions.clone(), 1) is not first


# -- CPU: registration and selection ----------------------------------------------------------------
def test_register_is_idempotent_and_registers_a_mask_function():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert "flash" in VARLEN_ATTENTION
    assert register_attention() == VARLEN_ATTENTION
    fn = AttentionInterface._global_mapping[VARLEN_ATTENTION]
    assert register_attention() == VARLEN_ATTENTION
    assert AttentionInterface._global_mapping[VARLEN_ATTENTION] is fn
    assert AttentionMaskInterface._global_mapping[VARLEN_ATTENTION] is attn.padding_mask_only
    assert attn.padding_mask_only(1, 3, 3, attention_mask=torch.ones(1, 3, dtype=torch.bool)) is None
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert torch.equal(attn.padding_mask_only(1, 3, 3, attention_mask=mask), mask)


def test_asking_for_the_torch_kernel_by_name_builds_it_before_any_forward():
    """In a fresh process, --attn_implementation flash_varlen_torch (registration, no forward yet) leaves
    PyTorch's kernel built: built inside a compiled layer's first forward instead, torch 2.11's dynamo
    failed on it (test_compile.py::test_compiled_first_forward_with_the_torch_kernel_asked_for_by_name)."""
    import subprocess
    import sys

    code = ("from qwenvl.train import attention as a; a.choose_attn_implementation(a.VARLEN_ATTENTION, True); "
            "k = a._TORCH_KERNEL; print(len(k), k and k[0] is not None and k[0].fn.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    expected = "1 varlen_attn" if attn.varlen_available() else "1 None"
    assert out.stdout.split("\n")[-2] == expected, out.stdout + out.stderr


@pytest.mark.parametrize("flash_attn, varlen, cuda_, requested, expected", [
    (True, True, True, "eager", "eager"),
    (True, True, True, None, "flash_attention_2"),
    (False, True, True, None, VARLEN_ATTENTION),
    (False, False, True, None, "sdpa"),
    (True, True, False, None, "sdpa"),
    (False, True, False, None, "sdpa"),
])
def test_choose_attn_implementation(monkeypatch, flash_attn, varlen, cuda_, requested, expected):
    monkeypatch.setattr(attn, "flash_attn_importable", lambda: flash_attn)
    monkeypatch.setattr(attn, "varlen_available", lambda: varlen)
    monkeypatch.setattr(attn, "_cuda_supports_flash", lambda: True)
    assert choose_attn_implementation(requested, device_is_cuda=cuda_) == expected


def test_transformers_refuses_our_name_at_load_so_we_load_with_sdpa(tiny_model_dir):
    """Documents the reason for loadable_attn_implementation: if transformers ever accepts
    custom "flash" names at load time, this test fails and the workaround can go."""
    from transformers import AutoModelForImageTextToText

    register_attention()
    with pytest.raises(ValueError, match="flash attention implementation"):
        AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_5_vl"), attn_implementation=VARLEN_ATTENTION)
    assert loadable_attn_implementation(VARLEN_ATTENTION) == "sdpa"
    assert loadable_attn_implementation("flash_attention_2") == "flash_attention_2"
    assert loadable_attn_implementation(None) is None


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_apply_reaches_vision_tower_and_language_model(tiny_model_dir, model_type):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(model_type), attn_implementation="sdpa")
    apply_attn_implementation(model, VARLEN_ATTENTION)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    assert configs and all(c._attn_implementation == VARLEN_ATTENTION for c in configs)
    assert model.model.visual.config._attn_implementation == VARLEN_ATTENTION
    apply_attn_implementation(model, "eager")  # and back, through transformers' own checks
    assert all(m.config._attn_implementation == "eager" for m in model.modules() if hasattr(m, "config"))


# -- whole tiny models: a packed batch through our function equals SDPA -------------------------------------
def _flattened_batch(path, big_images: bool, count: int = 3):
    """A flattened batch of the first ``count`` of three chats (image, text only, two images)."""
    from transformers import AutoConfig

    from qwenvl.data.batch.collate import FlattenedCollator
    from qwenvl.data.catalog.formats import Conversation
    from qwenvl.data.render.sample import SampleRenderer

    processor = load_processor(path)
    renderer = SampleRenderer(processor, AutoConfig.from_pretrained(path))
    # 224 px = 16 patches a side: several 112-px windows in the Qwen2.5-VL tower.
    w, h = (224, 168) if big_images else (56, 84)
    img = lambda c: Image.new("RGB", (w, h), c)  # noqa: E731
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": img((200, 10, 10))},
                                      {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red, a warm colour"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "What is 7 times 6?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "42"}]}],
        [{"role": "user", "content": [{"type": "image", "image": img((10, 10, 200))},
                                      {"type": "image", "image": img((10, 200, 10))},
                                      {"type": "text", "text": "Same colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
    ]
    samples = [renderer.render(Conversation(messages=c, origin=f"chat {i}")) for i, c in enumerate(chats[:count])]
    return FlattenedCollator()(samples)


def _run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def _batch_on(path, device, dtype):
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _flattened_batch(path, big_images=True).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def _load(path, dtype, device):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device)
    model.config.use_cache = False
    return model


def _check_grads_cover_both_towers(grads):
    assert any("visual" in n for n in grads) and any("language_model" in n for n in grads)


def _compare_with_sdpa(path, name, dtype, device, tol):
    """Same model, same batch: SDPA, then attention ``name``; logits, loss and grads agree."""
    batch = _batch_on(path, device, dtype)
    model = _load(path, dtype, device)
    ref_logits, ref_loss, ref_grads = _run(model, batch)
    apply_attn_implementation(model, name)
    logits, loss, grads = _run(model, batch)

    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys()
    _check_grads_cover_both_towers(grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=tol, atol=tol, msg=n)


def _relative_error(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def _compare_bf16_errors(path, name, device):
    """bf16 cannot be compared exactly, so both bf16 runs are measured against an fp32 SDPA
    run of the same weights: ours may be at most twice as far off as bf16 SDPA (+ a floor)."""
    batch32 = _batch_on(path, device, torch.float32)
    ref_logits, ref_loss, ref_grads = _run(_load(path, torch.float32, device), batch32)
    batch16 = _batch_on(path, device, torch.bfloat16)
    model = _load(path, torch.bfloat16, device)
    sdpa = _run(model, batch16)
    apply_attn_implementation(model, name)
    ours = _run(model, batch16)

    report = {}
    for what, ref, a, b in [("loss", ref_loss, sdpa[1], ours[1]), ("logits", ref_logits, sdpa[0], ours[0])] + [
            (n, ref_grads[n], sdpa[2][n], ours[2][n]) for n in ref_grads]:
        e_sdpa, e_ours = _relative_error(a, ref), _relative_error(b, ref)
        report[what] = (e_sdpa, e_ours)
        assert e_ours <= 2 * e_sdpa + 5e-3, f"{what}: ours {e_ours:.2e} vs bf16 sdpa {e_sdpa:.2e} (from fp32)"
    _check_grads_cover_both_towers(ours[2])
    return report


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_model_through_reference_kernel_equals_sdpa(tiny_model_dir, model_type):
    """The whole plumbing on CPU (fp32): the vision tower's cu_seqlens call, the language
    model's boundaries from text positions, GQA; only the kernel is a reference."""
    calls = []

    @functools.wraps(varlen_v214)  # keeps the signature the kernel is detected from
    def spy(*args, **kwargs):
        calls.append(args[3].numel() - 1)  # sequences in this call
        return varlen_v214(*args, **kwargs)

    register_attention(REFERENCE, kernel=VarlenKernel.from_function(spy, needs_half=False))
    _compare_with_sdpa(tiny_model_dir(model_type), REFERENCE, torch.float32, "cpu", 1e-5)
    # One call per layer (2 vision blocks + 2 decoder layers), never one per window, and
    # both halves saw several sequences (3 samples; 3 images in windows).
    assert len(calls) == 4, calls
    assert all(n >= 3 for n in calls), calls


# -- GPU: the real kernel ------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_gpu_packed_model_equals_sdpa_in_bf16(tiny_model_dir, model_type):
    assert attn.varlen_available(), f"torch {torch.__version__} has no torch.nn.attention.varlen"
    report = _compare_bf16_errors(tiny_model_dir(model_type), register_attention(), "cuda")
    worst = max(report.items(), key=lambda kv: kv[1][1])
    print(f"{model_type}: worst relative error from fp32: {worst[0]} ours {worst[1][1]:.2e} sdpa {worst[1][0]:.2e}")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_kernel_equals_blocked_sdpa_at_qwen_7b_shapes(causal):
    """28 query heads on 4 kv heads, head_dim 128, packed samples of random lengths: forward
    and gradients of q/k/v against SDPA with a block-diagonal mask, both in bf16."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 400, (9,)).tolist()
    total = sum(lengths)
    dev = "cuda"
    q = torch.randn(1, 28, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(dev)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(dev)
    module = _Module()
    fn = make_attention_forward(attn.torch_varlen_kernel())
    scale = 1 / math.sqrt(128)
    out, _ = fn(module, q, k, v, None, scaling=scale, is_causal=causal, position_ids=positions)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    same = segments[:, None, :, None] == segments[:, None, None, :]
    if causal:
        same &= torch.ones(total, total, dtype=torch.bool, device=dev).tril()
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=same, scale=scale, enable_gqa=True).transpose(1, 2)
    rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), grad.float())
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, err
