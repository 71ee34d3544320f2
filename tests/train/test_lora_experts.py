"""LoRA on the routed experts of MoE models (``--lora_target_parameters``, qwenvl/train/lora_experts.py).

Tiny qwen3_vl_moe and qwen3_5_moe models, real computation: adapters on both fused expert weights of
every MoE layer, frozen base weights, the adapter really in the forward of each experts kernel of
transformers, training changes it, merge_lora and chat reload it, bad values stop the run at start-up.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.train.arguments import ConfigError, ModelArguments
from qwenvl.train.lora_experts import expert_weight_names, resolve_target_parameters
from qwenvl.train.model import load_model, model_class_for, prepare_model
from qwenvl.train.trainer import QwenVLTrainer

from .conftest import ChatCollator, conversations, load_processor, snapshot

MOE_FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _param_wrappers(model) -> dict[tuple[int, str], torch.nn.Module]:
    """{(layer index, wrapped parameter name): peft ParamWrapper} over the model."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = int(name.split(".layers.")[1].split(".")[0])
            found[(layer, module.parameter_name)] = module
    return found


def _non_square_moe(model_type: str, tiny_model_dir, experts_implementation: str | None = None):
    """The tiny family model with moe_intermediate_size 16, so that no expert weight is square (a swapped
    in/out dimension in the adapter could not hide), float32, random weights from seed 0."""
    config = AutoConfig.from_pretrained(tiny_model_dir(model_type))
    config.text_config.moe_intermediate_size = 16
    torch.manual_seed(0)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return model_class_for(model_type)._from_config(config, dtype=torch.float32, **kwargs)


def _lora(model, make_training_args, **overrides):
    values = dict(lora_enable=True, lora_r=2, lora_alpha=4, lora_dropout=0.0, lora_target_modules=["q_proj"],
                  lora_target_parameters=["experts"])
    values.update(overrides)
    model_args = ModelArguments(model_name_or_path="unused", tune_mm_llm=True)
    return prepare_model(model, model_args, make_training_args(**values))


def _text_batch(model_type, tiny_model_dir, n=6):
    tokenizer = load_processor(tiny_model_dir(model_type)).tokenizer
    return tokenizer(["red green blue square circle " * n], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_every_moe_layer_gets_adapters_on_both_expert_weights(tiny_model_dir, make_training_args, model_type):
    model = _non_square_moe(model_type, tiny_model_dir)
    layers = model.config.text_config.num_hidden_layers
    assert expert_weight_names(model) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    peft_model = _lora(model, make_training_args)

    wrappers = _param_wrappers(peft_model)
    assert set(wrappers) == {(i, w) for i in range(layers) for w in EXPERT_WEIGHTS}
    experts = model.config.text_config.num_experts
    for (_, weight), wrapper in wrappers.items():
        assert wrapper.num_experts == experts
        base = wrapper.get_param()
        assert not base.requires_grad  # the fused base weight stays frozen
        assert wrapper.get_delta_weight("default").shape == base.shape  # one rank-2 pair per expert
        for part in ("lora_A", "lora_B"):
            assert getattr(wrapper, part)["default"].weight.requires_grad
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    assert sum(".experts." in n for n in trainable) == 2 * 2 * layers  # A and B of both weights per layer
    assert json.loads(json.dumps(peft_model.peft_config["default"].target_parameters)) == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


@pytest.mark.parametrize("experts_implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_expert_adapter_is_in_the_forward_of_every_experts_kernel(tiny_model_dir, make_training_args, model_type,
                                                                  experts_implementation):
    """The adapted model computes what the base model computes with W + scaling * B @ A written into its
    expert weights: the kernels read ``self.gate_up_proj`` / ``self.down_proj`` and see the adapter."""
    ids = _text_batch(model_type, tiny_model_dir)
    reference = _non_square_moe(model_type, tiny_model_dir, experts_implementation).eval()
    peft_model = _lora(_non_square_moe(model_type, tiny_model_dir, experts_implementation), make_training_args,
                       lora_target_modules=[]).eval()  # experts only: nothing else changes the output
    assert peft_model.config.text_config._experts_implementation == experts_implementation
    wrappers = _param_wrappers(peft_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for wrapper in wrappers.values():
            wrapper.lora_B["default"].weight.normal_(0, 0.2)  # B starts at zero; a trained adapter is not
        for (layer, weight), wrapper in wrappers.items():
            experts = reference.model.language_model.layers[layer].mlp.experts
            getattr(experts, weight).add_(wrapper.get_delta_weight("default"))
        adapted = peft_model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output ...
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)  # ... exactly as W + delta would


@pytest.mark.parametrize("checkpointing", [False, True])
def test_what_the_memory_warning_says(tiny_model_dir, make_training_args, caplog, checkpointing):
    """Without checkpointing the backward keeps W + B A of every layer's expert stack (the bytes of all
    expert weights, outside the parameters) and a warning says so; with checkpointing none is kept."""
    model = _non_square_moe("qwen3_vl_moe", tiny_model_dir)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    with caplog.at_level("WARNING", logger="qwenvl.train.lora_experts"):
        peft_model = _lora(model, make_training_args, gradient_checkpointing=checkpointing).train()
    assert ("without --gradient_checkpointing" in caplog.text) == (not checkpointing)
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.data_ptr() for p in peft_model.parameters()}
    experts = model.config.text_config.num_experts
    kept = {}

    def pack(tensor):
        if tensor.data_ptr() not in params and tensor.dim() == 3 and tensor.shape[0] == experts:
            kept[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    ids = _text_batch("qwen3_vl_moe", tiny_model_dir)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert sum(kept.values()) == (0 if checkpointing else expert_bytes)


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_training_changes_the_expert_adapters_only(tiny_model_dir, make_training_args, model_type):
    path = tiny_model_dir(model_type)
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_llm=True)
    training_args = make_training_args(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=4,
                                       learning_rate=1e-2, lora_target_modules=["q_proj"],
                                       lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                       gradient_checkpointing=True)
    processor = load_processor(path)
    model = prepare_model(load_model(model_args, training_args), model_args, training_args)
    collator = ChatCollator(processor)
    probe = collator(conversations(2, seed=0))
    model.eval()
    with torch.no_grad():
        loss_before = model(**probe).loss
    before = snapshot(model)
    QwenVLTrainer(model=model, args=training_args, processing_class=processor, train_dataset=conversations(4),
                  data_collator=collator).train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expert_adapters = {n for n in trained if ".mlp.experts." in n}
    assert len(expert_adapters) == 2 * 2 * model.config.text_config.num_hidden_layers
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trained)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n not in trained)
    for wrapper in _param_wrappers(model).values():  # B left zero: the expert weights are really adapted now
        assert wrapper.get_delta_weight("default").abs().max() > 0
    model.eval()
    with torch.no_grad():
        assert model(**probe).loss < loss_before  # trained on these very chats


def test_bad_target_parameters_name_the_flag_and_the_candidates(tiny_model_dir):
    model = _non_square_moe("qwen3_vl_moe", tiny_model_dir)
    assert resolve_target_parameters(model, ["experts", "mlp.experts.down_proj"]) == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert resolve_target_parameters(model, ["gate_up_proj"]) == ["gate_up_proj"]
    for bad, says in (("mlp.experts.up_proj", "'mlp.experts.up_proj' matches no parameter"),
                      ("q_proj.weight", "not a 3-D expert weight"),
                      ("weight", "not a 3-D expert weight")):  # every Linear weight
        with pytest.raises(ConfigError) as err:
            resolve_target_parameters(model, [bad])
        message = str(err.value)
        assert message.startswith("--lora_target_parameters") and says in message
        assert "mlp.experts.down_proj, mlp.experts.gate_up_proj" in message
    qwen3_5 = _non_square_moe("qwen3_5_moe", tiny_model_dir)
    with pytest.raises(ConfigError, match="conv1d.weight .shape .*not a 3-D expert weight"):
        resolve_target_parameters(qwen3_5, ["linear_attn.conv1d.weight"])  # 3-D, but not an expert weight
    dense = model_class_for("qwen3_vl")._from_config(AutoConfig.from_pretrained(tiny_model_dir("qwen3_vl")))
    with pytest.raises(ConfigError, match="has no routed experts"):
        resolve_target_parameters(dense, ["experts"])


def test_flag_parses_comma_lists_and_is_checked_with_the_other_lora_flags(tiny_model_dir, tmp_path):
    from qwenvl.train.arguments import parse_args

    base = ["--model_name_or_path", str(tiny_model_dir("qwen3_vl_moe")), "--tune_mm_llm", "True",
            "--output_dir", str(tmp_path / "out")]
    training = parse_args(base + ["--lora_enable", "True", "--lora_dropout", "0", "--lora_target_parameters",
                                  "mlp.experts.gate_up_proj,mlp.experts.down_proj"]).training
    assert training.lora_target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert parse_args(base).training.lora_target_parameters == []  # off by default
    # Experts only: no Linear target is then fine.
    training = parse_args(base + ["--lora_enable", "True", "--lora_dropout", "0", "--lora_target_modules", "",
                                  "--lora_target_parameters", "experts"]).training
    assert training.lora_target_modules == [] and training.lora_target_parameters == ["experts"]
    with pytest.raises(ConfigError, match="--lora_target_parameters puts LoRA adapters .* add --lora_enable True"):
        parse_args(base + ["--lora_target_parameters", "experts"])
    with pytest.raises(ConfigError, match=r"needs --lora_dropout 0 \(got 0.05\)"):
        parse_args(base + ["--lora_enable", "True", "--lora_target_parameters", "experts"])


def _train_argv(base, tmp_path, *extra):
    from PIL import Image

    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "red.png")
    records = [{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                                      {"from": "gpt", "value": "red"}]}] * 4
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "dictionary.json").write_text(json.dumps({"d": {"annotation_path": "data.json", "data_path": "."}}))
    return ["--model_name_or_path", str(base), "--dataset_use", "d", "--dataset_dictionary",
            str(tmp_path / "dictionary.json"), "--output_dir", str(tmp_path / "run"), "--lora_enable", "True",
            "--lora_r", "4", "--lora_alpha", "8", "--tune_mm_llm", "True", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--max_pixels", str(56 * 56),
            "--min_pixels", str(56 * 56), "--save_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--use_cpu", "True", *extra]


@pytest.mark.parametrize("extra,says", [
    (["--lora_target_parameters", "mlp.experts.gate_proj", "--lora_dropout", "0"],
     "'mlp.experts.gate_proj' matches no parameter"),
    (["--lora_target_parameters", "mlp.gate.weight", "--lora_dropout", "0"], "not a 3-D expert weight"),
    (["--lora_target_parameters", "experts"], "needs --lora_dropout 0"),
])
def test_bad_flag_stops_the_run_before_any_data_work(tiny_model_dir, tmp_path, capsys, extra, says):
    from qwenvl.train.train_qwen import train

    with pytest.raises(SystemExit) as exit_info:
        train(_train_argv(tiny_model_dir("qwen3_vl_moe"), tmp_path, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lora_target_parameters" in err and says in err
    if "--lora_dropout" not in says:
        assert "mlp.experts.down_proj, mlp.experts.gate_up_proj" in err  # the candidates
    assert not (tmp_path / "run" / "run_args.json").exists()  # stopped before the folder was taken
    assert not any(p.name.endswith((".idx", ".lengths")) for p in tmp_path.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_expert_lora_run_merges_and_reloads_for_chat(tiny_model_dir, tmp_path, model_type):
    """train --lora_target_parameters experts -> merge_lora -> Auto classes; and chat's adapter loading."""
    from qwenvl.tools import chat
    from qwenvl.tools.merge_lora import merge_lora
    from qwenvl.train.train_qwen import train

    base = tiny_model_dir(model_type)
    out = train(_train_argv(base, tmp_path, "--lora_target_parameters", "experts", "--lora_dropout", "0",
                            "--lora_target_modules", "q_proj"))
    assert chat.is_adapter_dir(out) and chat.written_by_training(out)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model_class_for(model_type).from_pretrained(base), out).eval()
    assert len(_param_wrappers(adapted)) == 2 * adapted.config.text_config.num_hidden_layers
    merged = AutoModelForImageTextToText.from_pretrained(merge_lora(out, tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    plain = AutoModelForImageTextToText.from_pretrained(base).eval()
    chat_model, _ = chat.load_checkpoint(out, device="cpu")
    ids = _text_batch(model_type, tiny_model_dir)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(chat_model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3  # not simply the base model
        # The merged expert weights are the base ones plus the trained delta (so the experts were trained).
        changed = [not torch.equal(a, b) for (n, a), (_, b) in zip(merged.named_parameters(), plain.named_parameters())
                   if ".mlp.experts." in n]
    assert changed and all(changed)


@pytest.mark.slow
def test_compiled_layers_train_expert_adapters_as_eager(tiny_model_dir, make_training_args, caplog):
    """--compile_layers with expert adapters: peft's per-forward parametrization breaks the compiled graphs
    (a warning says so at start-up), but loss and every gradient equal the eager model's."""
    ids = _text_batch("qwen3_vl_moe", tiny_model_dir)

    def build(**flags):
        model = _lora(_non_square_moe("qwen3_vl_moe", tiny_model_dir), make_training_args, **flags)
        torch.manual_seed(1)
        with torch.no_grad():
            for wrapper in _param_wrappers(model).values():
                wrapper.lora_B["default"].weight.normal_(0, 0.2)
        return model.train()

    def step(model):
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want_grads = step(build())
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="qwenvl.train.lora_experts"):
        compiled = build(compile_layers=True)
    assert "--compile_layers with --lora_target_parameters" in caplog.text
    assert "without --gradient_checkpointing" in caplog.text  # the memory note, too
    for _ in range(2):  # the second step runs what the first compiled (and recompiles)
        loss, grads = step(compiled)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == want_grads.keys() and any(".experts.lora_B" in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- sharded and resumed runs
EXPERT_LORA = ["--tune_mm_llm", "True", "--lora_enable", "True", "--lora_r", "4", "--lora_dropout", "0",
               "--lora_target_parameters", "experts"]


def _losses(out) -> list[float]:
    return [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def _expert_adapters(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if ".mlp.experts." in k}


@pytest.mark.slow
def test_fsdp2_trains_expert_adapters_like_ddp(tiny_model_dir, tmp_path):
    """Two CPU processes, FSDP2 (the experts' base weights sharded, peft's parametrization applied to the
    gathered weight): losses and saved expert adapters equal a DDP run's."""
    from tests.conftest import copy_demo_annotations

    from .test_fsdp2 import FSDP, REPO, _env, _flags, _run, _torchrun

    model_dir = tiny_model_dir("qwen3_vl_moe")
    dictionary = copy_demo_annotations(tmp_path / "data")
    flags = [*EXPERT_LORA, "--max_steps", "3", "--save_strategy", "no"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(model_dir, ddp, dictionary, *flags, "--use_cpu", "True")), _env())
    _run(_torchrun("-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *FSDP,
                   *_flags(model_dir, fsdp, dictionary, *flags)), _env(), timeout=600)
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)
    want, got = _expert_adapters(ddp), _expert_adapters(fsdp)
    assert len(want) == 2 * 2 * 2 and got.keys() == want.keys()  # A and B of both weights, 2 layers
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.slow
def test_zero3_trains_expert_adapters(tiny_model_dir, tmp_path):
    """ZeRO-3 in one CPU process (expert weights partitioned; the flag is judged on the loaded model):
    every expert adapter is trained and saved, and the adapter merges."""
    import sys

    from qwenvl.tools.merge_lora import merge_lora

    from .conftest import free_port
    from .test_train_qwen import _env, _flags, _run

    # Not qwen3_vl_moe: its tiny checkpoint is in transformers 5's expert layout, which ZeRO-3's loader transposes
    # regardless (Transpose(check_dims) compares with the empty partitioned parameter); released checkpoints load.
    model_dir = tiny_model_dir("qwen3_5_moe")
    out = tmp_path / "z3"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    _run([sys.executable, "-m", "qwenvl.train.train_qwen",
          *_flags(model_dir, out, *EXPERT_LORA, "--learning_rate", "5e-3", "--max_steps", "2",
                  "--save_strategy", "no", "--deepspeed", "scripts/zero3.json")], env)
    adapters = _expert_adapters(out)
    assert len(adapters) == 2 * 2 * 4  # A and B of both weights, 4 layers
    assert all(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    merged = AutoModelForImageTextToText.from_pretrained(merge_lora(out, tmp_path / "merged"))
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    experts = merged.model.language_model.layers[0].mlp.experts
    assert not torch.equal(experts.gate_up_proj, base.model.language_model.layers[0].mlp.experts.gate_up_proj)


@pytest.mark.slow
def test_resumed_expert_lora_run_equals_a_straight_one(tiny_model_dir, tmp_path):
    from qwenvl.train.train_qwen import train

    from .test_train_qwen import _flags

    out, straight = tmp_path / "out", tmp_path / "straight"
    flags = _flags(tiny_model_dir("qwen3_vl_moe"), out, *EXPERT_LORA, "--learning_rate", "5e-3", "--save_steps", "2",
                   "--lr_scheduler_type", "constant")
    train(flags + ["--max_steps", "2"])
    train(flags + ["--max_steps", "3"])  # resumes from checkpoint-2
    train(flags + ["--output_dir", str(straight), "--max_steps", "3"])
    resumed, expected = _expert_adapters(out), _expert_adapters(straight)
    assert resumed.keys() == expected.keys() and len(resumed) == 2 * 2 * 2
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def _padded_fla_backward_blocked() -> bool:
    """fla installed where its gated delta rule backward raises (Hopper, Triton 3.4-3.7.0, fla #640): the
    padded Qwen3.5 forward below goes through fla there (training refuses padded batches on such a stack)."""
    from qwenvl.train.linear_attention import fla_available, fla_backward_blocker_here

    return torch.cuda.is_available() and fla_available() and fla_backward_blocker_here() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", [
    "qwen3_vl_moe",
    pytest.param("qwen3_5_moe", marks=pytest.mark.skipif(
        _padded_fla_backward_blocked(), reason="fla's backward is blocked on this stack (fla #640); needs Triton "
                                               ">= 3.7.1, tilelang, or no fla")),
])
def test_expert_adapters_on_gpu_with_grouped_mm_in_bf16(tiny_model_dir, make_training_args, model_type):
    """On a GPU, bf16 weights, transformers' default grouped_mm experts kernel (torch's CUDA grouped GEMM):
    the adapter is in the forward (the adapted model is W + delta's, to bf16 rounding, and far from the base),
    and one backward reaches every expert adapter."""
    ids = _text_batch(model_type, tiny_model_dir).cuda()
    reference = _non_square_moe(model_type, tiny_model_dir, "grouped_mm").to("cuda", torch.bfloat16).eval()
    model = _non_square_moe(model_type, tiny_model_dir, "grouped_mm").to("cuda", torch.bfloat16)
    peft_model = _lora(model, make_training_args, lora_target_modules=[], use_cpu=False)
    wrappers = _param_wrappers(peft_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for wrapper in wrappers.values():
            wrapper.lora_B["default"].weight.normal_(0, 0.2)
        for (layer, weight), wrapper in wrappers.items():
            experts = reference.model.language_model.layers[layer].mlp.experts
            getattr(experts, weight).add_(wrapper.get_delta_weight("default").to(torch.bfloat16))
        peft_model.eval()
        adapted = peft_model(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits.float()
    effect = (adapted - base).abs().max()
    assert effect > 1e-1 and (adapted - expected).abs().max() < 0.1 * effect, (effect, (adapted - expected).abs().max())

    peft_model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if ".experts." in n and p.requires_grad}
    assert len(grads) == 2 * 2 * model.config.text_config.num_hidden_layers
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
