"""FSDP2 (``--fsdp "full_shard auto_wrap" --fsdp_config scripts/fsdp2.json``) through the Trainer.

On CPU: two torchrun processes over gloo (``tests/train/fsdp_cpu.py`` says why a test-only
trainer is needed there), a tiny Qwen2.5-VL with its own (untied) ``lm_head`` as the released
7B, so the fused loss reads a head that FSDP2 shards on its own.  On GPUs (marked ``gpu``):
the compiled path, in bf16, on two GPUs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwenvl.train.arguments import ConfigError, parse_args
from tests.conftest import copy_demo_annotations

from .conftest import free_port
from .test_train_qwen import REPO, _env, _run

FSDP = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(REPO / "scripts" / "fsdp2.json")]


def _flags(model_dir, out, dictionary, *extra):
    return ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_shapes%8,demo_text%8",
            "--dataset_dictionary", str(dictionary), "--output_dir", str(out), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none",
            "--model_max_length", "512", "--dataloader_num_workers", "0", "--disable_tqdm", "True",
            "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--seed", "0",
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "False",
            "--data_flatten", "True", "--token_budget_samples", "4", "--save_steps", "2", *extra]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _params(folder) -> dict[str, torch.Tensor]:
    return dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


def _assert_trained_alike(sharded: Path, ddp: Path, steps: int) -> None:
    """The sharded run's float32 losses and saved weights equal the DDP run's (same data, seed, steps)."""
    want, got = _losses(ddp), _losses(sharded)
    assert len(want) == len(got) == steps
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    trained, reference = _params(sharded), _params(ddp)
    for name, param in reference.items():
        torch.testing.assert_close(trained[name], param, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_fsdp2_trains_like_ddp_saves_plain_checkpoints_and_resumes(untied_model_dir, tmp_path):
    """Two CPU processes: FSDP2 with the fused loss (Liger's place taken by our chunked kernel, which
    multiplies the head's weight outside lm_head's forward: a DTensor shard there until gathered),
    token-budget batches (some ranks' micro-batches without an image: the dummy vision calls
    must keep the all-gathers paired), frozen vision tower replicated (left out of fully_shard)
    next to a trainable merger sharded in the root group.  The run is stopped after the checkpoint of step 2 and resumed from its sharded
    state to step 3; losses and weights equal a DDP run of 3 steps."""
    dictionary = copy_demo_annotations(tmp_path / "data")
    env = _env()
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    fused = ["--optim", "adamw_torch_fused"]  # the fast recipes' optimizer: one kernel over the DTensor shards
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(untied_model_dir, ddp, dictionary, "--max_steps", "3", "--use_cpu", "True", *fused)), env)
    harness = ["-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *FSDP, *fused]
    first = _run(_torchrun(*harness, *_flags(untied_model_dir, fsdp, dictionary, "--max_steps", "2")), env)
    assert "model and processor saved" in first.stdout
    assert "replicated on every GPU, not sharded" in first.stdout  # the frozen tower (scripts/fsdp2.json's default)

    # Each checkpoint: a plain model that loads with the Auto classes, and the sharded state.
    checkpoint = fsdp / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert (checkpoint / "chat_template.jinja").is_file()
    saved = _params(checkpoint)
    base = _params(untied_model_dir)
    assert saved.keys() == base.keys()
    assert all(torch.equal(p, base[n]) for n, p in saved.items() if ".visual." in n and ".merger." not in n)
    assert any(not torch.equal(p, base[n]) for n, p in saved.items() if "lm_head" in n)

    resumed = _run(_torchrun(*harness, *_flags(untied_model_dir, fsdp, dictionary, "--max_steps", "3")), env)
    assert f"resuming from {checkpoint}" in resumed.stdout
    _assert_trained_alike(fsdp, ddp, steps=3)


@pytest.mark.slow
def test_fsdp2_lora_with_trainable_vision_tower_and_merger_equals_ddp(untied_model_dir, tmp_path):
    """LoRA on the language model, vision tower and merger trained fully (peft ``modules_to_save``):
    under FSDP2 (peft's wrap policy makes the trainable vision modules units of their own) ranks
    whose micro-batch has no image run the tower on a dummy input; its zero term enters the
    embeddings, so the units' reduce-scatters come in the same order on every rank (added to
    the loss, the ranks' orders differed: a collective mismatch at the second step, which raised
    or hung)."""
    from safetensors.torch import load_file

    dictionary = copy_demo_annotations(tmp_path / "data")
    env = _env()
    lora = ["--lora_enable", "True", "--lora_r", "4", "--tune_mm_vision", "True", "--max_steps", "3",
            "--save_strategy", "no"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(untied_model_dir, ddp, dictionary, *lora, "--use_cpu", "True")), env)
    # A collective mismatch can hang gloo instead of raising: the timeout turns that into a failure.
    _run(_torchrun("-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *FSDP,
                   *_flags(untied_model_dir, fsdp, dictionary, *lora)), env, timeout=600)
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)
    want, got = load_file(ddp / "adapter_model.safetensors"), load_file(fsdp / "adapter_model.safetensors")
    assert got.keys() == want.keys() and any(".visual.blocks." in k for k in got)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.slow
def test_fsdp2_qwen3_vl_moe_with_trainable_vision_equals_ddp(tiny_model_dir, tmp_path):
    """Qwen3-VL-MoE, everything trained: a rank without images runs the tower on a dummy input, and
    its deepstack mergers must get a (zero) gradient too, or that rank's reduce-scatter of the root
    group is smaller than the other's (a collective mismatch at the first step)."""
    model_dir = tiny_model_dir("qwen3_vl_moe")
    dictionary = copy_demo_annotations(tmp_path / "data")
    env = _env()
    flags = ["--tune_mm_vision", "True", "--max_steps", "3", "--save_strategy", "no"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(model_dir, ddp, dictionary, *flags, "--use_cpu", "True")), env)
    _run(_torchrun("-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *FSDP,
                   *_flags(model_dir, fsdp, dictionary, *flags)), env, timeout=600)
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)


def test_fsdp_config_file_shards_every_family_by_its_own_layer_classes():
    """scripts/fsdp2.json names no classes: accelerate then wraps the model's ``_no_split_modules``,
    which for each family are exactly its decoder layer and vision block."""
    import transformers

    from qwenvl.train.model import SUPPORTED_MODEL_TYPES

    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text())
    assert config["fsdp_version"] == 2 and config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "transformer_layer_cls_to_wrap" not in config
    assert config["state_dict_type"] == "SHARDED_STATE_DICT"  # resume state; the model is saved whole anyway
    for class_name in SUPPORTED_MODEL_TYPES.values():
        no_split = getattr(transformers, class_name)._no_split_modules
        assert len(no_split) == 2 and any(n.endswith("DecoderLayer") for n in no_split) \
            and any(n.endswith("VisionBlock") for n in no_split), (class_name, no_split)


def test_fsdp_flags_parse_and_compiled_layers_are_allowed(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("qwen2_5_vl"))
    args = parse_args(["--model_name_or_path", model, "--output_dir", str(tmp_path), "--tune_mm_llm", "True",
                       "--compile_layers", "True", "--activation_memory_budget", "0.5", *FSDP]).training
    assert args.fsdp and args.fsdp_config["version"] == 2 and args.compile_layers
    from qwenvl.train.sharding import fsdp_version, mixed_precision_policy

    assert fsdp_version(args) == 2 and mixed_precision_policy(args) is None  # fp32 run: no casts
    args.bf16 = True
    policy = mixed_precision_policy(args)
    # scripts/fsdp2.json reduces in bf16, as DeepSpeed ZeRO does in bf16 runs
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.bfloat16, None)
    args.fsdp_config = {k: v for k, v in args.fsdp_config.items() if k != "reduce_dtype"}
    assert mixed_precision_policy(args).reduce_dtype == torch.float32  # a config without the key: full precision
    args.fsdp_config["reduce_dtype"] = "fp8"
    with pytest.raises(ConfigError, match="reduce_dtype must be one of float32, bfloat16"):
        mixed_precision_policy(args)


@pytest.mark.parametrize("fsdp, config, requested, backend", [
    ("full_shard auto_wrap", {"cpu_offload": True}, None, "cuda:nccl,cpu:gloo"),
    ("full_shard auto_wrap", {"fsdp_cpu_offload": "true"}, None, "cuda:nccl,cpu:gloo"),
    ("full_shard auto_wrap offload", {}, None, "cuda:nccl,cpu:gloo"),
    ("full_shard auto_wrap", "file", None, "cuda:nccl,cpu:gloo"),
    ("full_shard auto_wrap", {"cpu_offload": True}, "nccl", "cuda:nccl,cpu:gloo"),  # NCCL alone cannot
    ("full_shard auto_wrap", {"cpu_offload": True}, "cuda:nccl", "cuda:nccl,cpu:gloo"),  # nor spelled per device
    ("full_shard auto_wrap", {"cpu_offload": True}, "gloo", "gloo"),  # a backend the user chose otherwise is theirs
    ("full_shard auto_wrap", {"cpu_offload": False}, None, None),
    ("", {"cpu_offload": True}, None, None),  # no FSDP
])
def test_cpu_offload_gives_the_process_group_gloo_beside_nccl(tmp_path, fsdp, config, requested, backend):
    """FSDP2's CPU offload keeps gradients in host memory: the gradient-norm all-reduce and the final
    save's gather then run on CPU tensors, which a NCCL-only group refused on 2 H200s at the first
    step ("No backend type associated with device type cpu")."""
    from qwenvl.train.sharding import process_group_backend

    if config == "file":  # --fsdp_config as the path the command line gives, before the Trainer reads it
        config = tmp_path / "fsdp.json"
        config.write_text(json.dumps(json.loads((REPO / "scripts" / "fsdp2.json").read_text()) | {"cpu_offload": True}))
        config = str(config)
    assert process_group_backend(fsdp, config, requested, use_cpu=False, distributed=True) == backend
    assert process_group_backend(fsdp, config, requested, use_cpu=True, distributed=True) == requested  # gloo
    assert process_group_backend(fsdp, config, requested, use_cpu=False, distributed=False) == requested


def test_the_run_arguments_carry_the_offload_backend_when_launched_by_torchrun(tiny_model_dir, tmp_path, monkeypatch):
    """The backend is chosen in the arguments, before the Trainer's own __post_init__ starts the
    process group; a single process (no LOCAL_RANK) starts none and keeps the default."""
    from qwenvl.train.arguments import TrainingArguments

    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text()) | {"cpu_offload": True}
    (tmp_path / "fsdp.json").write_text(json.dumps(config))
    flags = ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir", str(tmp_path / "o"),
             "--tune_mm_llm", "True", "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp.json")]
    args = parse_args(flags).training
    assert args.ddp_backend is None and args.fsdp_config["cpu_offload"] is True
    chosen = {}
    monkeypatch.setattr(TrainingArguments, "_setup_devices", property(lambda self: chosen.setdefault("backend",
                                                                                                 self.ddp_backend)))
    monkeypatch.setenv("LOCAL_RANK", "0")  # what torchrun sets
    parse_args(flags)
    assert chosen["backend"] == "cuda:nccl,cpu:gloo"


@pytest.mark.parametrize("value, world, local, layout", [
    (None, 8, 8, None), (1, 8, 8, None), ("nodes", 8, 8, None),  # one node: plain full shard
    ("nodes", 16, 8, (2, 8)), ("nodes", 64, 8, (8, 8)), (2, 4, 4, (2, 2)), ("4", 16, 8, (4, 4)),
])
def test_hsdp_layout_shards_inside_groups_and_replicates_them(value, world, local, layout):
    from qwenvl.train.sharding import hsdp_layout

    assert hsdp_layout(value, world, local) == layout


@pytest.mark.parametrize("value, world, error", [
    (3, 8, "does not divide the 8 processes"), (4, 4, "every shard group would hold one GPU"),
    ("two", 4, "positive whole number"), (0, 4, "positive whole number"), (True, 4, "positive whole number"),
    (1.5, 4, "positive whole number"),
])
def test_hsdp_layout_refuses_what_cannot_shard_by_name(value, world, error):
    from qwenvl.train.sharding import hsdp_layout

    with pytest.raises(ConfigError, match=error):
        hsdp_layout(value, world, world)


def test_a_malformed_hsdp_replicas_stops_before_the_model_loads(tmp_path):
    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text())
    path = tmp_path / "fsdp_hsdp.json"
    path.write_text(json.dumps(dict(config, hsdp_replicas="per node")))
    with pytest.raises(ConfigError, match="hsdp_replicas must be a positive whole number"):
        parse_args(["--model_name_or_path", "Qwen/x", "--output_dir", str(tmp_path), "--tune_mm_llm", "True",
                    "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(path)])


@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_trains_like_ddp_on_four_processes(untied_model_dir, tmp_path):
    """Four CPU processes: "hsdp_replicas": 2 gives fully_shard a 2-D mesh (2 replicas x 2 shards, as
    2 nodes of 2 GPUs would), and the losses and trained weights equal DDP's on 4 processes."""
    dictionary = copy_demo_annotations(tmp_path / "data")
    env = _env()
    config = tmp_path / "hsdp.json"
    config.write_text(json.dumps(dict(json.loads((REPO / "scripts" / "fsdp2.json").read_text()), hsdp_replicas=2)))
    more = ["--max_steps", "2", "--dataset_use", "demo_shapes%16,demo_text%16", "--save_strategy", "no"]

    def four(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                str(free_port()), *args]

    ddp, hsdp = tmp_path / "ddp", tmp_path / "hsdp"
    _run(four(str(REPO / "qwenvl/train/train_qwen.py"),
              *_flags(untied_model_dir, ddp, dictionary, *more, "--use_cpu", "True")), env)
    result = _run(four("-m", "tests.train.fsdp_cpu", "--use_cpu", "True", "--fsdp", "full_shard auto_wrap",
                       "--fsdp_config", str(config), *_flags(untied_model_dir, hsdp, dictionary, *more)), env)
    assert "device mesh of dp_replicate=2 x dp_shard_cp=2: HSDP" in result.stdout, result.stdout[-3000:]
    _assert_trained_alike(hsdp, ddp, steps=2)


def _tiny(model_dir, tmp_path, *flags):
    from qwenvl.train.model import load_model, prepare_model

    args = parse_args(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path), "--use_cpu", "True",
                       *FSDP, *flags])
    return prepare_model(load_model(args.model, args.training), args.model, args.training), args.training


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe"])
def test_frozen_vision_tower_is_replicated_and_its_blocks_are_not_wrapping_units(tiny_model_dir, tmp_path, family):
    """Frozen tower next to a trained merger: the largest all-frozen vision submodules (blocks, patch
    and position embeddings) are handed to accelerate as ignored modules (moved to the device, since
    fully_shard moves only what it shards), and the block class leaves the wrapping classes; the
    merger and the language model stay sharded."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from qwenvl.train.sharding import configure_fsdp2_plugin

    model, args = _tiny(tiny_model_dir(family), tmp_path, "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
                        "--tune_mm_vision", "False")
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    names = configure_fsdp2_plugin(plugin, model, args, torch.device("cpu"))
    assert names and all(".visual." in f".{n}." and "merger" not in n for n in names), names
    ignored = {id(p) for m in plugin.ignored_modules for p in m.parameters()}
    for name, param in model.named_parameters():
        is_tower = ".visual." in f".{name}" and "merger" not in name
        assert (id(param) in ignored) == is_tower, name
    block = next(n for n in model._no_split_modules if n.endswith("VisionBlock"))
    assert block not in plugin.transformer_cls_names_to_wrap
    assert any(n.endswith("DecoderLayer") for n in plugin.transformer_cls_names_to_wrap)


def test_training_or_opted_out_vision_tower_and_lora_base_weights_stay_sharded(tiny_model_dir, tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from qwenvl.train.sharding import configure_fsdp2_plugin, replicated_frozen_modules

    model, args = _tiny(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_llm", "True", "--tune_mm_vision", "True")
    assert replicated_frozen_modules(model, args) == []
    model, args = _tiny(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_llm", "True", "--lora_enable", "True",
                        "--tune_mm_vision", "True")
    # LoRA with a trained tower: peft's frozen original copy of it is never called, so it stays sharded (free)
    assert replicated_frozen_modules(model, args) == []
    model, args = _tiny(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_llm", "True", "--lora_enable", "True")
    # LoRA: the language model's frozen base weights stay sharded (that is most of the model); the tower is replicated
    names = [n for n, _ in replicated_frozen_modules(model, args)]
    assert names and all(".visual." in f".{n}." for n in names), names
    model, args = _tiny(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_llm", "True")
    args.fsdp_config["replicate_frozen_vision"] = False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert configure_fsdp2_plugin(plugin, model, args, torch.device("cpu")) == [] and plugin.ignored_modules is None


def test_fsdp_without_gpus_is_refused_not_silently_ddp(tiny_model_dir, tmp_path, capsys):
    """accelerate drops the FSDP plugin on CPU processes; the run stops instead of training unsharded."""
    from qwenvl.train.train_qwen import train

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        train(["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir", str(tmp_path / "o"),
               "--dataset_use", "demo_text%2", "--tune_mm_llm", "True", "--use_cpu", "True", "--max_steps", "1",
               "--report_to", "none", "--dataloader_num_workers", "0", *FSDP])
    assert exit_info.value.code == 2 and "--fsdp needs GPUs" in capsys.readouterr().err


# -- GPU: the compiled FSDP2 path ---------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
GPU_COMMON = ["--bf16", "True", "--compile_layers", "True", "--activation_memory_budget", "0.5",
              "--max_steps", "6", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def gpu_ddp_losses(untied_model_dir, tmp_path_factory):
    """The 6 losses of the compiled bf16 run under DDP on 2 GPUs: the reference both GPU FSDP2 runs follow."""
    root = tmp_path_factory.mktemp("gpu_ddp")
    dictionary = copy_demo_annotations(root / "data")
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(untied_model_dir, root / "ddp", dictionary, *GPU_COMMON)), _env(), timeout=600)
    return _losses(root / "ddp")


@pytest.mark.gpu
@pytest.mark.slow
@two_gpus
def test_compiled_fsdp2_with_fused_loss_matches_ddp_and_exits(untied_model_dir, gpu_ddp_losses, tmp_path):
    """bf16, compiled layers, fused loss (Liger when installed), token budget, on 2 GPUs: FSDP2's
    losses follow DDP's within bf16 noise, the saved model loads, and both processes exit."""
    dictionary = copy_demo_annotations(tmp_path / "data")
    fsdp = tmp_path / "fsdp"
    result = _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                            *_flags(untied_model_dir, fsdp, dictionary, *GPU_COMMON, *FSDP)), _env(), timeout=600)
    assert "model and processor saved" in result.stdout
    got = _losses(fsdp)
    assert len(got) == len(gpu_ddp_losses) == 6
    assert got == pytest.approx(gpu_ddp_losses, rel=2e-2), (got, gpu_ddp_losses)
    saved = _params(fsdp)
    assert saved.keys() == _params(untied_model_dir).keys()


@pytest.mark.gpu
@pytest.mark.slow
@two_gpus
def test_compiled_fsdp2_with_cpu_offload_on_gpus_matches_ddp(untied_model_dir, gpu_ddp_losses, tmp_path):
    """``"cpu_offload": true`` with the product's own offload policy (pinned host memory, which the CPU
    test cannot use), compiled layers and the fused loss, whose lm_head gather must bring the
    offloaded shard to the GPU: losses follow DDP's within bf16 noise and the model is saved whole."""
    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text()) | {"cpu_offload": True}
    (tmp_path / "fsdp2_offload.json").write_text(json.dumps(config))
    offload = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp2_offload.json")]
    dictionary = copy_demo_annotations(tmp_path / "data")
    fsdp = tmp_path / "fsdp_offload"
    result = _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                            *_flags(untied_model_dir, fsdp, dictionary, *GPU_COMMON, "--optim", "adamw_torch_fused",
                                    *offload)), _env(), timeout=600)
    assert "optimizer state in CPU memory" in result.stdout
    assert "process group cuda:nccl,cpu:gloo" in result.stdout
    assert "model and processor saved" in result.stdout
    got = _losses(fsdp)
    assert len(got) == len(gpu_ddp_losses) == 6
    assert got == pytest.approx(gpu_ddp_losses, rel=2e-2), (got, gpu_ddp_losses)
    assert _params(fsdp).keys() == _params(untied_model_dir).keys()


one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.slow
@one_gpu
def test_compiled_fsdp2_with_cpu_offload_under_torchrun_on_one_gpu_matches_the_plain_run(untied_model_dir,
                                                                                       tmp_path):
    """CPU offload on a GPU, launched by torchrun, in one process (so it runs where one GPU is lent):
    the product's ``cuda:nccl,cpu:gloo`` group starts on a GPU (accelerate and torch take the
    mixed backend), and the compiled, fused-loss run with shards, gradients and optimizer state in
    host memory trains as the same bf16 run without torchrun or FSDP, and saves the model whole.
    What it cannot show: at one process the gradient-norm all-reduce and the save's gather skip
    their collectives (an NCCL-only group passed there too on an H200), so the NCCL-only failure
    itself takes two GPUs (``test_compiled_fsdp2_with_cpu_offload_on_gpus_matches_ddp``)."""
    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text()) | {"cpu_offload": True}
    (tmp_path / "fsdp2_offload.json").write_text(json.dumps(config))
    offload = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp2_offload.json")]
    dictionary = copy_demo_annotations(tmp_path / "data")
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp_offload"
    fused = ["--optim", "adamw_torch_fused"]
    _run([sys.executable, str(REPO / "qwenvl/train/train_qwen.py"),
          *_flags(untied_model_dir, plain, dictionary, *GPU_COMMON, *fused)], _env(), timeout=600)
    one_process = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                   str(free_port())]
    result = _run([*one_process, str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(untied_model_dir, fsdp, dictionary, *GPU_COMMON, *fused, *offload)], _env(), timeout=600)
    assert "optimizer state in CPU memory" in result.stdout
    assert "process group cuda:nccl,cpu:gloo" in result.stdout
    assert "model and processor saved" in result.stdout
    want, got = _losses(plain), _losses(fsdp)
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=2e-2), (got, want)
    assert _params(fsdp).keys() == _params(untied_model_dir).keys()


@pytest.mark.slow
def test_fsdp2_with_cpu_offload_trains_like_ddp(untied_model_dir, tmp_path):
    """``"cpu_offload": true`` in the FSDP config (the README's way to fit a 32B on two GPUs):
    FSDP2's CPU offload policy keeps the shards, their gradients and the optimizer state in host
    memory and steps there; losses and saved weights equal DDP's."""
    config = json.loads((REPO / "scripts" / "fsdp2.json").read_text()) | {"cpu_offload": True}
    (tmp_path / "fsdp2_offload.json").write_text(json.dumps(config))
    offload = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp2_offload.json")]
    dictionary = copy_demo_annotations(tmp_path / "data")
    env = _env()
    flags = ["--max_steps", "3", "--save_strategy", "no", "--optim", "adamw_torch_fused"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_torchrun(str(REPO / "qwenvl/train/train_qwen.py"),
                   *_flags(untied_model_dir, ddp, dictionary, *flags, "--use_cpu", "True")), env)
    run = _run(_torchrun("-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *offload,
                         *_flags(untied_model_dir, fsdp, dictionary, *flags)), env, timeout=600)
    assert "full shard; shards, their gradients and the optimizer state in CPU memory" in run.stdout
    _assert_trained_alike(fsdp, ddp, steps=3)
