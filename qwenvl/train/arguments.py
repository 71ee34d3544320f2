"""The model and training flags of ``train_qwen.py``, and one parser for all three groups.

Flag names, meanings and defaults follow the official qwen-vl-finetune ``argument.py``
(``tune_mm_llm/mlp/vision`` all default to False there too; the official scripts set
them explicitly).  Where this port differs, the field's help says so.

``parse_args`` reads the command line, or a single ``.json`` / ``.yaml`` file holding
the whole run (optionally followed by flags that override it), then checks the
combination and reports every problem at once, each with its fix.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import transformers

from qwenvl.data.arguments import DataArguments
from qwenvl.train.eval_schedule import schedule_evaluation
from qwenvl.train.help import USAGE, GroupedHelpParser
from qwenvl.train.official_flags import (
    drop_frozen_learning_rates,
    expand_file_products,
    expand_pixel_products,
    pop_no_effect_flags,
)
from qwenvl.train.sharding import process_group_backend

# The language model's attention and MLP projections (every dense family), matched by the
# last component of a module's name inside the language model only: the Qwen2.5-VL vision
# blocks also have gate/up/down_proj, and those must not get adapters by accident.
# Every Linear layer of the language model: attention, MLP, and on Qwen3.5/3.6 the Gated DeltaNet
# projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj), which are 3 of every 4 layers
# there: leaving them out would adapt a quarter of the decoder. Names a family lacks match nothing.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]

RUN_FILE_SUFFIXES = (".json", ".yaml", ".yml")


class ConfigError(ValueError):
    """Invalid flags (or an unusable model directory); the message lists every problem with its fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems with the arguments:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


@dataclass
class ModelArguments:
    help_heading = "Model: what to load and which parts to train"  # --help's heading (not a flag)
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct",
        metadata={"help": "Checkpoint directory or hub id. The family is read from its config.json "
                          "(model_type), never guessed from the name."})
    tune_mm_llm: bool = field(
        default=False,
        metadata={"help": "Train the language model (decoder layers, embeddings, final norm, lm_head). With "
                          "--lora_enable: LoRA adapters on its projections instead of full training."})
    tune_mm_mlp: bool = field(
        default=False,
        metadata={"help": "Train the vision-language merger (model.visual.merger, and Qwen3-VL's deepstack "
                          "mergers). Trained fully, also with --lora_enable."})
    tune_mm_vision: bool = field(
        default=False,
        metadata={"help": "Train the vision tower (patch embedding, position embedding, blocks; not the merger). "
                          "Trained fully, also with --lora_enable."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: flash_attention_2, flash_varlen_torch, sdpa, eager, or any registered "
                          "name. Default on CUDA: flash_attention_2 when flash_attn is installed, else "
                          "flash_varlen_torch (PyTorch's varlen kernel, torch >= 2.10, Ampere or newer); else sdpa."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (as the official code: adamw_torch)."})
    model_max_length: int = field(
        default=512,
        metadata={"help": "Most tokens per sample (official default 512; the official scripts pass 8192)."})
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the merger (default: --learning_rate)."})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (default: --learning_rate)."})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (official: 64)."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (official: 128)."})
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "LoRA dropout (0.05: the value the official code trains with, whose `or 0.05` "
                          "turned its 0.0 default into 0.05)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names (last name component) inside the language model that get adapters. "
                          "Default: every Linear layer of the language model: q,k,v,o,gate,up,down_proj and, on "
                          "Qwen3.5/3.6, the linear-attention in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,out_proj "
                          "(the official code used q,k,v,o only). MoE routed experts are not Linear layers: "
                          "--lora_target_parameters reaches them (the shared expert is Linear)."})
    lora_target_parameters: list[str] = field(
        default_factory=list,
        metadata={"help": "MoE models (qwen3_vl_moe, qwen3_5_moe): fused 3-D routed-expert weights that get "
                          "adapters, one rank-r pair per expert (peft target_parameters), by the end of their "
                          "name: mlp.experts.gate_up_proj,mlp.experts.down_proj, or 'experts' for both. Needs "
                          "--lora_dropout 0; use with --gradient_checkpointing True (without it the backward keeps "
                          "a second copy of all expert weights). Default: none."})
    online_packing: bool = field(
        default=False,
        metadata={"help": "Pack micro-batches on the fly up to --max_tokens_per_batch tokens (default: "
                          "--model_max_length), using the length cache; needs --data_flatten True. One pack per "
                          "step and rank; --per_device_train_batch_size is then not used."})
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "Token budget of each micro-batch (token-budget batching). Turns on --online_packing."})
    token_budget_samples: int | None = field(
        default=None,
        metadata={"help": "Token-budget batching sized from the data: each optimizer step takes this many samples "
                          "per process on average (the budget is this x the mean tokens per sample, from the length "
                          "cache, / --gradient_accumulation_steps). The sft*.sh recipes pass their batch size x "
                          "accumulation here, so the official samples per step hold. Not with --max_tokens_per_batch."})
    max_patches_per_pack: int | None = field(
        default=None,
        metadata={"help": "Optional second budget of each packed micro-batch: vision patches (what the vision "
                          "tower's memory follows)."})
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "Batch samples of similar length together, text-only apart from multimodal (uses the "
                          "length cache)."})
    master_weights: str = field(
        default="fp32",
        metadata={"help": "Without DeepSpeed, with --bf16/--fp16: 'fp32' keeps trainable weights in float32 under "
                          "autocast (updates smaller than bf16's resolution are kept: the official 2e-7 learning rate "
                          "needs this); 'bf16' trains the half-precision weights directly (faster and about half the "
                          "memory, so --gradient_checkpointing False fits; small updates may round away)."})
    loss_kernel: str = field(
        default="auto",
        metadata={"help": "How the training loss is computed: 'fused' never materialises the logits (Liger's "
                          "fused kernel on CUDA when liger-kernel is installed, else a chunked one); 'model' is the "
                          "released forward's loss; 'auto' = fused except under ZeRO-3 (lm_head is partitioned; under FSDP2 the "
                          "loss gathers it)."})
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE models (qwen3_vl_moe, qwen3_5_moe): weight of the router load-balancing loss added to "
                          "the training loss (logged as router_aux_loss). Default: the checkpoint's "
                          "router_aux_loss_coef (0.001 in the released configs); 0 turns it off."})
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer and vision block in place (regional compilation): fuses "
                          "the element-wise work around the matmuls (RMSNorm, rotary embedding, SiLU-and-multiply) and "
                          "saves fewer activations. Costs a minute or two of compilation at the first steps. With "
                          "FSDP2 (--fsdp_config scripts/fsdp2.json) or ZeRO-2, not with ZeRO-3."})
    activation_memory_budget: float | None = field(
        default=None,
        metadata={"help": "With --compile_layers: the fraction (0-1] of its activations each compiled layer keeps for "
                          "the backward pass; the compiler recomputes the rest, cheapest first. Finer than "
                          "--gradient_checkpointing (whole layers); use one or the other. Default: keep all."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir that no run of ours wrote (no run_args.json), "
                          "overwriting its files. Without it such a folder is refused."})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Official-script flag, gone from transformers 5: sets --warmup_steps to this "
                          "fraction of the run. Give one of the two."})
    # The collator decides what reaches the model; the Trainer's default (True) would drop
    # dataset keys by the forward signature before the collator sees them.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Leave False: the collator builds exactly the model's inputs."})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError(f"--warmup_ratio {self.warmup_ratio} and --warmup_steps {self.warmup_steps} "
                                 "both set: give one (the scripts set --warmup_steps 0.03; override it with "
                                 "--warmup_steps, where a value below 1 is a fraction of the run).")
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            # transformers 5 reads a warmup_steps below 1 as a fraction of the total steps.
            self.warmup_steps = self.warmup_ratio
        # Before the parent's __post_init__: it starts the process group (``self.device``).
        self.ddp_backend = process_group_backend(self.fsdp, self.fsdp_config, self.ddp_backend, self.use_cpu)
        super().__post_init__()

    def __getstate__(self):
        # training_args.bin is a pickle of this object saved in every checkpoint: keep
        # hub credentials out of it (push_to_hub falls back to HF_TOKEN / the login cache).
        state = dict(self.__dict__)
        for key in list(state):
            if key.endswith("_token") and isinstance(state[key], str):
                state[key] = None
        return state


class ParsedArgs(NamedTuple):
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    explicit: dict  # the values the user gave (file and flags), for run_args.json


class _Parser(GroupedHelpParser):
    """HfArgumentParser whose usage errors become a ConfigError instead of ``sys.exit(2)``."""

    def error(self, message):
        if message.endswith("expected one argument"):
            # argparse takes "-1e-5" for a flag, so "--learning_rate -1e-5" reads as a missing value.
            message += (" (a value that starts with '-', such as a negative number, is written with '=': "
                        "--flag=-1e-5)")
        raise ConfigError(message)


def _read_run_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"run file {path} does not exist.")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # a syntax error: say which file and why
        raise ConfigError(f"cannot read run file {path}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"run file {path} must hold a mapping of flag names to values, not {type(values).__name__}.")
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}


def flash_attn_available() -> bool:
    """True when flash_attention_2 can run here: flash_attn importable and a CUDA device present."""
    import torch

    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name


def _deepspeed_problem(value) -> str | None:
    if not isinstance(value, str):
        return None
    if not os.path.isfile(value):
        return (f"--deepspeed {value}: no such file. Use one of scripts/zero2.json, scripts/zero3.json, "
                "scripts/zero3_offload.json, scripts/zero3_offload_optimizer.json, or leave --deepspeed out.")
    try:
        json.loads(Path(value).read_text())
    except ValueError as err:
        return f"--deepspeed {value} is not valid JSON: {err}"
    return None


def _json_config(value) -> dict:
    """A config flag's mapping: the dict itself, or a JSON file's or string's contents; {} when unreadable."""
    if isinstance(value, str):
        text = value
        if not value.lstrip().startswith("{"):
            try:
                text = Path(value).read_text()
            except OSError:
                return {}
        try:
            value = json.loads(text)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _zero_stage(value) -> int | None:
    """The ZeRO stage of a --deepspeed file or dict, None when absent or unreadable."""
    stage = _json_config(value).get("zero_optimization", {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def _cross_checks(v: dict) -> list[str]:
    """Problems of flag combinations, read from the raw values (so they show even if a dataclass failed)."""
    problems = []
    tune = {k: bool(v.get(k)) for k in ("tune_mm_llm", "tune_mm_mlp", "tune_mm_vision")}
    if not any(tune.values()):
        problems.append("nothing to train: --tune_mm_llm, --tune_mm_mlp and --tune_mm_vision are all False. "
                        "Set at least one to True (the official scripts use --tune_mm_llm True --tune_mm_mlp True).")
    if v.get("lora_enable") and not tune["tune_mm_llm"]:
        problems.append("--lora_enable puts adapters on the language model, but --tune_mm_llm is False. Pass "
                        "--tune_mm_llm True, or drop --lora_enable to train only the merger / vision tower fully.")
    for name in ("learning_rate", "vision_tower_lr", "mm_projector_lr"):
        value = v.get(name)
        if value is not None and not float(value) > 0:
            problems.append(f"--{name} must be positive, got {value}.")
    if v.get("bf16") and v.get("fp16"):
        problems.append("--bf16 and --fp16 are both set: choose one (bf16 on Ampere or newer GPUs).")
    problem = _deepspeed_problem(v.get("deepspeed"))
    if problem:
        problems.append(problem)
    elif v.get("deepspeed"):
        from .deepspeed_schedule import rate_problems, zero_adagrad_problem

        # A "scheduler" section that would give every group one rate, or an Adagrad that ZeRO would collapse into
        # one group (and then crash on), before any data work.
        deepspeed = v["deepspeed"]
        source = deepspeed if isinstance(deepspeed, str) else "(--deepspeed)"
        problems += rate_problems(_json_config(deepspeed), v, source)
        # LoRA on the language model alone trains one group (adapter weights, none undecayed): Adagrad keeps it.
        one_group = bool(v.get("lora_enable")) and not v.get("tune_mm_mlp") and not v.get("tune_mm_vision")
        adagrad = zero_adagrad_problem(_json_config(deepspeed), v.get("optim"), source, one_group)
        if adagrad:
            problems.append(adagrad)
    if v.get("lora_enable"):
        if int(v.get("lora_r", 1)) <= 0:
            problems.append(f"--lora_r must be positive, got {v.get('lora_r')}.")
        if float(v.get("lora_alpha", 1)) <= 0:
            problems.append(f"--lora_alpha must be positive, got {v.get('lora_alpha')}.")
        if not 0 <= float(v.get("lora_dropout", 0)) < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {v.get('lora_dropout')}.")
        if not v.get("lora_target_modules") and not v.get("lora_target_parameters"):
            problems.append("--lora_target_modules is empty: name at least one module, e.g. q_proj v_proj.")
        if v.get("lora_target_parameters") and float(v.get("lora_dropout", 0)) != 0:
            # peft's ParamWrapper adds B @ A to the weight, so there is no input to drop out; it raises.
            problems.append(f"--lora_target_parameters {','.join(v['lora_target_parameters'])} needs --lora_dropout "
                            f"0 (got {v.get('lora_dropout')}): peft adds the expert adapters to the weights, where "
                            "dropout cannot apply. Pass --lora_dropout 0 (it then applies to every adapter).")
    elif v.get("lora_target_parameters"):
        problems.append("--lora_target_parameters puts LoRA adapters on expert weights: add --lora_enable True.")
    if int(v.get("model_max_length", 1)) <= 0:
        problems.append(f"--model_max_length must be positive, got {v.get('model_max_length')}.")
    packing = bool(v.get("online_packing")) or v.get("max_tokens_per_batch") is not None \
        or v.get("token_budget_samples") is not None
    if packing and not (v.get("data_flatten") or v.get("data_packing")):
        problems.append("--online_packing / --max_tokens_per_batch / --token_budget_samples pack samples into one "
                        "row: add --data_flatten True.")
    if v.get("token_budget_samples") is not None:
        if int(v["token_budget_samples"]) <= 0:
            problems.append(f"--token_budget_samples must be positive, got {v['token_budget_samples']}.")
        if v.get("max_tokens_per_batch") is not None:
            problems.append("--token_budget_samples and --max_tokens_per_batch both set the token budget: give one.")
    if v.get("fsdp") and v.get("deepspeed"):
        problems.append("--fsdp and --deepspeed both shard the model: choose one (scripts/fsdp2.json or a ZeRO "
                        "config).")
    if v.get("fsdp"):
        from .sharding import parse_hsdp_replicas

        try:  # the value's form, before the model loads; the process count is checked at the start
            parse_hsdp_replicas(_json_config(v.get("fsdp_config")).get("hsdp_replicas"))
        except ConfigError as err:
            problems.append(str(err))
    if v.get("max_tokens_per_batch") is not None and int(v["max_tokens_per_batch"]) <= 0:
        problems.append(f"--max_tokens_per_batch must be positive, got {v['max_tokens_per_batch']}.")
    if packing and v.get("group_by_modality_length"):
        problems.append("--group_by_modality_length and online packing both decide the batches: choose one.")
    grouping = v.get("group_by_modality_length") or str(v.get("train_sampling_strategy")) == "group_by_length"
    if v.get("auto_find_batch_size") and (packing or grouping):
        # transformers retries after an out-of-memory error with half the Trainer's batch size; our batch
        # sampler (steps.train_batch_sampler) never reads it, so each retry would run out of memory alike.
        made_by = "the token budget" if packing else "the length-grouping sampler"
        fix = ("lower --max_tokens_per_batch (or --token_budget_samples) until a step fits" if packing else
               "lower --per_device_train_batch_size until a step fits")
        problems.append(f"--auto_find_batch_size halves --per_device_train_batch_size after an out-of-memory error, "
                        f"but this run's micro-batches are made by {made_by}, which it does not change: every "
                        f"retry would run out of memory the same way. Drop --auto_find_batch_size and {fix}.")
    if v.get("master_weights", "fp32") not in ("fp32", "bf16"):
        problems.append(f"--master_weights must be fp32 or bf16, not {v.get('master_weights')!r}.")
    kernel = v.get("loss_kernel", "auto")
    if kernel not in ("auto", "fused", "model"):
        problems.append(f"--loss_kernel must be auto, fused or model, not {kernel!r}.")
    elif kernel == "fused" and _zero_stage(v.get("deepspeed")) == 3:
        problems.append("--loss_kernel fused cannot run under ZeRO-3 (lm_head's weight is partitioned outside "
                        "its own forward): use --loss_kernel auto or model, or ZeRO-2.")
    if v.get("compile_layers") and _zero_stage(v.get("deepspeed")) == 3:
        problems.append("--compile_layers cannot run under ZeRO-3 (its parameter-gathering hooks run inside each "
                        "layer): drop --compile_layers, or use ZeRO-2 or no DeepSpeed.")
    budget = v.get("activation_memory_budget")
    if budget is not None:
        if not v.get("compile_layers"):
            problems.append("--activation_memory_budget is applied by the compiler: add --compile_layers True.")
        if not 0 < float(budget) <= 1:
            problems.append(f"--activation_memory_budget must be in (0, 1], got {budget}.")
    attn = v.get("attn_implementation")
    if attn == "flash_attention_2" and not flash_attn_available():
        problems.append("--attn_implementation flash_attention_2 needs the flash_attn package and a CUDA GPU; "
                        "pass --attn_implementation sdpa, or leave it out to choose automatically.")
    elif attn and not _known_attention(str(attn)):
        problems.append(f"--attn_implementation {attn} is not an attention kernel transformers or this package "
                        "knows: use sdpa, eager, flash_attention_2 (CUDA, flash_attn installed), flash_varlen_torch "
                        "(CUDA) or flex_attention, or leave it out to choose automatically.")
    report = v.get("report_to")
    unknown = [r for r in ([report] if isinstance(report, str) else report or []) if not _known_report_to(str(r))]
    if unknown:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        problems.append(f"--report_to {', '.join(map(str, unknown))}: unknown; use none, all, or any of "
                        f"{', '.join(INTEGRATION_TO_CALLBACK)} (several: --report_to wandb,tensorboard).")
    model = str(v.get("model_name_or_path") or "")
    if not model:
        problems.append("--model_name_or_path is empty: give a checkpoint directory or hub id.")
    elif _looks_like_local_path(model) and os.path.isfile(os.path.expanduser(model)):
        problems.append(f"--model_name_or_path {model} is a file: give the folder that holds the checkpoint "
                        f"({os.path.dirname(model) or '.'}).")
    elif _looks_like_local_path(model) and not os.path.isdir(os.path.expanduser(model)):
        problems.append(f"--model_name_or_path {model}: no such directory.")
    problems += _schedule_problems(v)
    return problems


def _known_attention(name: str) -> bool:
    """An attention name transformers registers (or a hub kernel, "org/repo"), eager, or one of ours."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .attention import VARLEN_ATTENTION

    known = {"eager", VARLEN_ATTENTION, *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    return "/" in name or name in known or name.removeprefix("paged|") in known


def _known_report_to(name: str) -> bool:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return name in ("none", "all") or name in INTEGRATION_TO_CALLBACK


def _schedule_problems(v: dict) -> list[str]:
    """Batch sizes, run length and evaluation that the Trainer would take without a word, or fail on deep inside
    (a division by zero, a sampler's error, an untrained model saved as if trained)."""
    problems = []
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = v.get(name)
        if value is not None and int(value) < 1:
            problems.append(f"--{name} must be at least 1, got {value}.")
    workers = v.get("dataloader_num_workers")
    if workers is not None and int(workers) < 0:
        problems.append(f"--dataloader_num_workers must be 0 (load in the training process) or more, got {workers}.")
    seed = v.get("seed")
    if seed is not None and not 0 <= int(seed) < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {seed} (numpy's seeds are unsigned 32-bit).")
    max_steps = v.get("max_steps")
    if max_steps is not None and int(max_steps) == 0:
        problems.append("--max_steps 0 trains nothing: give a positive number of optimizer steps, or leave it out "
                        "(-1) to train --num_train_epochs epochs.")
    elif (max_steps is None or int(max_steps) < 0) and v.get("num_train_epochs") is not None \
            and not float(v["num_train_epochs"]) > 0:
        problems.append(f"--num_train_epochs {v['num_train_epochs']} trains nothing (the untrained model would be "
                        "saved as the result): give a positive number of epochs, or --max_steps N.")
    if v.get("output_dir") is not None and not str(v["output_dir"]).strip():  # None: the Trainer's default folder
        problems.append("--output_dir is empty: give the folder for the checkpoints and the final model.")
    if getattr(v.get("save_strategy"), "value", v.get("save_strategy")) == "best":
        if not v.get("metric_for_best_model"):
            problems.append("--save_strategy best saves when --metric_for_best_model improves: name it (e.g. "
                            "--metric_for_best_model loss, the eval loss), or use --save_strategy steps.")
        if not v.get("eval_dataset_use"):
            problems.append("--save_strategy best compares evaluations: name the evaluation data with "
                            "--eval_dataset_use, or use --save_strategy steps.")
    strategy = getattr(v.get("eval_strategy"), "value", v.get("eval_strategy"))
    if strategy not in (None, "no") and not v.get("eval_dataset_use"):
        problems.append(f"--eval_strategy {strategy} needs evaluation data: name it with --eval_dataset_use (datasets "
                        "of the dictionary, e.g. my_data_eval), or pass --eval_strategy no.")
    return problems


def _normalise(values: dict) -> dict:
    """Flag values as the dataclasses expect them (comma lists split)."""
    for flag in ("lora_target_modules", "lora_target_parameters"):
        targets = values.get(flag)
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None:
            values[flag] = [t.strip() for item in targets for t in str(item).split(",") if t.strip()]
    # --report_to wandb,tensorboard: several integrations at once (the flag takes one string).
    report = values.get("report_to")
    if isinstance(report, str) and "," in report:
        values["report_to"] = [r.strip() for r in report.split(",") if r.strip()]
    return values


def parse_args(argv: list[str] | None = None) -> ParsedArgs:
    """Parse flags (or ``RUN.json|RUN.yaml [--flag value ...]``) into the three argument groups.

    A run file holds ``{flag_name: value}`` for any flag of the three groups; flags
    after it override its values (for a repeated flag the last one wins, as argparse
    does).  Every problem found (unknown flags or keys, bad values, impossible
    combinations) is collected and raised once as a ``ConfigError``.
    """
    import sys

    argv = expand_pixel_products(list(sys.argv[1:] if argv is None else argv))
    parser = _Parser((ModelArguments, DataArguments, TrainingArguments), usage=USAGE)
    known = {a.dest for a in parser._actions} - {"help"}
    baseline = vars(parser.parse_known_args([])[0])  # every flag's default, before a run file changes them
    problems: list[str] = []
    warnings: list[str] = []
    file_values: dict = {}
    if argv and argv[0].endswith(RUN_FILE_SUFFIXES) and not argv[0].startswith("-"):
        run_file, argv = argv[0], argv[1:]
        file_values = expand_file_products(_read_run_file(run_file))
        _, warnings = pop_no_effect_flags([], file_values)
        unknown = sorted(set(file_values) - known)
        if unknown:
            problems.append(f"unknown key(s) in {run_file}: {', '.join(unknown)}. Keys are flag names without "
                            "the leading dashes, e.g. learning_rate.")
        # File values become parser defaults: flags given after the file still win, and
        # string values ("1e-5", which YAML keeps as a string) are converted like flags.
        parser.set_defaults(**{k: v for k, v in file_values.items() if k in known})
    argv, flag_warnings = pop_no_effect_flags(argv, {})
    warnings += flag_warnings
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        problems.append(f"unrecognised argument(s): {' '.join(extra)}. See --help for the flags.")
    values = _normalise(vars(namespace))
    warnings += drop_frozen_learning_rates(values)
    notes = schedule_evaluation(values)
    try:
        problems += _cross_checks(values)
    except (TypeError, ValueError) as err:  # a run file value of the wrong type (e.g. lora_r: null)
        problems.append(f"a flag value has the wrong type: {err}")

    built = []
    for dtype in (ModelArguments, DataArguments, TrainingArguments):
        inputs = {f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values}
        if dtype is TrainingArguments and _deepspeed_problem(inputs.get("deepspeed")):
            inputs["deepspeed"] = None  # already reported; still check the other training flags
        try:
            built.append(dtype(**inputs))
        except (ValueError, TypeError) as err:
            lines = getattr(err, "problems", None) or str(err).splitlines()  # DataConfigError lists its own
            problems += [line for line in lines if line.strip()] or [f"{dtype.__name__}: {err!r}"]
            built.append(None)
    # The same problem can surface from a cross check and a dataclass: report it once.
    if values.get("bf16") and values.get("fp16"):
        problems = [p for p in problems if "fp16 and bf16 can be True" not in p]
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(problems)

    _print_on_main_process([f"warning: {w}" for w in warnings] + [f"note: {n}" for n in notes])
    explicit = {k: v for k, v in values.items() if k in known and v != baseline.get(k)}
    return ParsedArgs(*built, explicit=explicit)


def _print_on_main_process(lines: list[str]) -> None:
    """Print to stderr once per run: torchrun starts every rank with the same flags."""
    if lines and os.environ.get("RANK", "0") == "0":
        import sys

        print("\n".join(lines), file=sys.stderr, flush=True)


def explicit_args_for_saving(explicit: dict) -> dict:
    """The user's flags as JSON-safe values, with credentials removed (for ``run_args.json``)."""
    safe = {}
    for key, value in explicit.items():
        if key.endswith("_token") or "api_key" in key:
            continue
        safe[key] = value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)
    return safe
