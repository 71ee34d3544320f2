"""Load a Qwen-VL checkpoint by its config, choose what trains, and describe it.

Components are named by rules on parameter names (first match wins), so one table
serves all four families, LoRA-wrapped models and ZeRO-3 partitioned ones:

    merger          ...visual.merger.*, ...visual.deepstack_merger_list.*   (--tune_mm_mlp)
    vision tower    ...visual.*  (patch/position embedding, blocks)         (--tune_mm_vision)
    lm_head         ...lm_head.*  (absent from the parameters when tied)    (--tune_mm_llm)
    language model  ...language_model.*  (embeddings, layers, final norm)   (--tune_mm_llm)

LoRA rule (``--lora_enable``): ``--tune_mm_llm`` puts LoRA adapters on the language
model's ``--lora_target_modules`` and, on MoE models, the routed-expert weights named by
``--lora_target_parameters`` (``lora_experts.py``) (base weights, embeddings and lm_head stay frozen);
``--tune_mm_mlp`` and ``--tune_mm_vision`` train those modules fully, stored in the
adapter checkpoint as ``modules_to_save``.  ``--lora_enable`` without
``--tune_mm_llm`` is rejected by the argument checks.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .arguments import ConfigError

SUPPORTED_MODEL_TYPES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}

# (component, pattern searched in the parameter name); first match wins, which is why the
# merger (inside model.visual) comes before the vision tower.
COMPONENT_RULES = (
    ("merger", re.compile(r"(^|\.)visual\.(merger|deepstack_merger_list)\.")),
    ("vision", re.compile(r"(^|\.)visual\.")),
    ("lm_head", re.compile(r"(^|\.)lm_head\.")),
    ("llm", re.compile(r"(^|\.)language_model\.")),
)
COMPONENT_TITLES = {"vision": "vision tower", "merger": "merger", "llm": "language model", "lm_head": "lm_head"}
TUNE_FLAGS = {"vision": "tune_mm_vision", "merger": "tune_mm_mlp", "llm": "tune_mm_llm", "lm_head": "tune_mm_llm"}


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its name: vision, merger, llm or lm_head."""
    for component, pattern in COMPONENT_RULES:
        if pattern.search(name):
            return component
    raise ValueError(f"parameter {name!r} matches no component rule; is this a Qwen-VL model?")


def read_config(model_name_or_path: str, cache_dir: str | None = None):
    """The checkpoint's config (AutoConfig); ConfigError when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the config of --model_name_or_path {model_name_or_path}: {err}") from None


# Files that hold a checkpoint's weights (one file, or an index naming the shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(model_name_or_path: str) -> None:
    """ConfigError unless a local ``--model_name_or_path`` folder holds a full model's config.json.

    Runs before any data work, so a LoRA adapter folder, a folder of weights without its config,
    or a config without weights is named with its fix at once, not by a transformers traceback
    after the data was built and ``run_args.json`` written.  Hub ids are left to transformers.
    """
    folder = os.path.expanduser(model_name_or_path)
    if not os.path.isdir(folder):
        return
    flag = f"--model_name_or_path {model_name_or_path}"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        adapter = os.path.join(folder, "adapter_config.json")
        if os.path.isfile(adapter):
            try:
                with open(adapter) as f:
                    base = json.load(f).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            raise ConfigError(
                f"{flag} is a LoRA adapter (adapter_config.json, no config.json), not a full model. Merge it "
                f"into its base first: python -m qwenvl.tools.merge_lora --checkpoint {model_name_or_path} "
                f"--output {model_name_or_path.rstrip('/')}-merged, and pass the merged folder"
                + (f" (or start from its base model, {base})." if base else "."))
        raise ConfigError(f"{flag} has no config.json: give the folder of a Hugging Face checkpoint (config.json, "
                          "the weights, the processor and tokenizer files).")


def check_model_weights(model_name_or_path: str, cache_dir: str | None = None) -> None:
    """ConfigError when the ``--model_name_or_path`` folder (or a Hub id's snapshot in the local cache) has no
    weights file, or one that is cut short, missing or unreadable (``weights_files.py``: headers and sizes only).
    Checked before the data work."""
    from .weights_files import model_weights_problems, snapshot_folder

    folder = os.path.expanduser(model_name_or_path)
    flag = f"--model_name_or_path {model_name_or_path}"
    fix = ("Download the model again (an interrupted download or copy leaves such files; for a Git LFS pointer, "
           "`git lfs pull` in its folder), then run the same command.")
    fetchable = False
    if not os.path.isdir(folder):
        from huggingface_hub import is_offline_mode

        folder = snapshot_folder(model_name_or_path, cache_dir)
        if folder is None:
            return  # not in the cache: reading its config said so already
        fetchable = not is_offline_mode()  # from_pretrained downloads what the cache lacks
        flag += f" (the Hugging Face cache's {folder})"
        fix = (f"Fetch it again where the Hub is reachable (`hf download {model_name_or_path}`, which completes the "
               "cached snapshot; a damaged file: delete it there first), then run the same command.")
    if not fetchable and not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ConfigError(f"{flag} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}): "
                          + (fix if folder != os.path.expanduser(model_name_or_path) else
                             "give the folder that holds the model's weights too."))
    problems = model_weights_problems(folder, fetchable)
    if problems:
        raise ConfigError(f"{flag}: the model's weights are damaged:\n  " + "\n  ".join(problems) + "\n" + fix)


def read_processor(model_name_or_path: str, cache_dir: str | None = None):
    """The checkpoint's processor (AutoProcessor); ConfigError naming the missing files when it cannot load."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise ConfigError(
            f"cannot load the processor of --model_name_or_path {model_name_or_path} ({reason}). Training and the "
            "data tools need the processor and tokenizer files beside the weights (processor_config.json or "
            "preprocessor_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja or the chat "
            "template in tokenizer_config.json): copy them from the base model's folder.") from None


def model_type_of(model_name_or_path: str, cache_dir: str | None = None) -> str:
    """The checkpoint's ``config.model_type`` (read with AutoConfig, never guessed from the path)."""
    return read_config(model_name_or_path, cache_dir).model_type


def model_class_for(model_type: str):
    """The conditional-generation class of a supported ``model_type``; ConfigError otherwise."""
    import transformers

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported model types: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    return getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])


def resolve_attn_implementation(requested: str | None) -> str:
    """``requested`` if given; else flash_attention_2 when flash-attn can run here; else, on a
    CUDA GPU, PyTorch's own variable-length kernel (``flash_varlen_torch``); else sdpa."""
    from .attention import choose_attn_implementation

    return choose_attn_implementation(requested, device_is_cuda=torch.cuda.is_available())


def load_dtype(training_args) -> torch.dtype:
    """The dtype weights load in: the half type of ``--bf16`` / ``--fp16``, else float32.

    Without DeepSpeed, ``prepare_model`` then puts the trainable parameters back in
    float32, so the optimizer updates full-precision weights (a bf16 weight cannot
    absorb a 2e-7 step) while the frozen parts stay small.  With DeepSpeed, its
    optimizer keeps float32 master weights itself.
    """
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def load_model(model_args, training_args):
    """Load the checkpoint with the class its config names and the chosen attention kernel.

    With ``--loss_kernel`` fused (or auto outside ZeRO-3), and when the vision tower must
    run on batches without images (ZeRO-3 or FSDP, or DDP with a trainable tower or merger), the
    class is the family's training subclass from ``fused_loss.py``; also for MoE models,
    which train with the router load-balancing loss (``--router_aux_loss_coef``, ``moe.py``).
    Our registered varlen kernel cannot be named to ``from_pretrained`` (transformers
    only accepts "flash" names it can import), so the model loads with sdpa and then
    switches to it.
    """
    from .attention import apply_attn_implementation, loadable_attn_implementation
    from .linear_attention import make_linear_attention_packable
    from .steps import model_class_for_run  # steps imports this module

    path = model_args.model_name_or_path
    config = read_config(path, training_args.cache_dir)
    cls = model_class_for_run(config, model_args, training_args)
    attention = resolve_attn_implementation(model_args.attn_implementation)
    model = cls.from_pretrained(
        path,
        config=config,
        cache_dir=training_args.cache_dir,
        attn_implementation=loadable_attn_implementation(attention),
        dtype=load_dtype(training_args),
    )
    apply_attn_implementation(model, attention)
    # Qwen3.5's Gated DeltaNet layers carry state along the sequence: make them stop at the
    # boundaries of flattened samples (linear_attention.py), whatever the attention kernel.
    make_linear_attention_packable(model)
    return model


def apply_tuning(model, model_args) -> None:
    """Full training: each parameter trains iff its component's ``--tune_mm_*`` flag is True."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(getattr(model_args, TUNE_FLAGS[component_of(name)])))


def _visual_prefix(model) -> str:
    for name, _ in model.named_modules():
        if re.search(r"(^|\.)visual$", name):
            return name
    raise ValueError("the model has no 'visual' module; is this a Qwen-VL model?")


def full_training_modules(model, model_args) -> list[str]:
    """Names of the modules trained fully next to LoRA (peft ``modules_to_save``).

    ModuleLists are expanded into their entries: the model indexes and iterates
    them, which a wrapper around the whole list would break.
    """
    prefix = _visual_prefix(model)
    visual = model.get_submodule(prefix)
    names = []
    for child_name, child in visual.named_children():
        component = component_of(f"{prefix}.{child_name}.x")
        if not getattr(model_args, TUNE_FLAGS[component]) or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, torch.nn.ModuleList):
            names += [f"{prefix}.{child_name}.{i}" for i in range(len(child))]
        else:
            names.append(f"{prefix}.{child_name}")
    return names


def lora_target_pattern(targets: list[str]) -> str:
    """A regex (peft full-matches it against module names) for ``targets`` inside the language model."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?language_model\.(.*\.)?({names})"


def lora_config(model, model_args, training_args):
    """The peft ``LoraConfig`` the flags ask for on ``model`` (the rule in the module docstring), built on a
    loaded or a weightless (meta-device) model alike; ConfigError for targets that match nothing."""
    from peft import LoraConfig, TaskType

    from .lora_experts import resolve_target_parameters

    expert_weights = resolve_target_parameters(model, getattr(training_args, "lora_target_parameters", None) or [])
    modules = training_args.lora_target_modules
    pattern = lora_target_pattern(modules) if modules else []  # [] asks peft for no module (experts only)
    matched = [n for n, _ in model.named_modules() if modules and re.fullmatch(pattern, n)]
    if modules and not matched:
        raise ConfigError(f"--lora_target_modules {' '.join(training_args.lora_target_modules)} matches no module of "
                          f"the language model. Its Linear layers are named: {', '.join(_llm_linear_names(model))}.")
    return LoraConfig(
        r=training_args.lora_r, lora_alpha=training_args.lora_alpha, lora_dropout=training_args.lora_dropout,
        target_modules=pattern, modules_to_save=full_training_modules(model, model_args) or None,
        target_parameters=expert_weights or None, bias="none", task_type=TaskType.CAUSAL_LM)


def apply_lora(model, model_args, training_args):
    """Wrap ``model`` in peft LoRA following the rule in the module docstring; returns the PeftModel."""
    from peft import get_peft_model

    from .lora_experts import warn_about_costs

    config = lora_config(model, model_args, training_args)
    warn_about_costs(training_args, config.target_parameters or [])
    for param in model.parameters():
        param.requires_grad_(False)
    return get_peft_model(model, config)


def weightless_model(config):
    """The model of ``config`` on the meta device: its module and parameter names and shapes, without memory or
    weight initialisation, to judge flags against before any data work or loading. None under DeepSpeed ZeRO-3:
    transformers then builds every (sub)model inside DeepSpeed's zero.Init and initialises its weights, which
    fails on meta tensors; such checks then run on the loaded model."""
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    with torch.device("meta"), no_init_weights():  # only names and shapes are read
        return model_class_for(config.model_type)(config)


def _llm_linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and component_of(n + ".weight") == "llm"})


def prepare_model(model, model_args, training_args):
    """Freeze or wrap ``model`` for training as the flags say; returns the model to train."""
    if training_args.lora_enable:
        model = apply_lora(model, model_args, training_args)
    else:
        apply_tuning(model, model_args)
    if not training_args.deepspeed and getattr(training_args, "master_weights", "fp32") == "fp32":
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if training_args.gradient_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        # With frozen embeddings nothing entering a checkpointed layer needs a gradient, and
        # reentrant checkpointing would then skip the layer's backward; transformers 5.23
        # does this too when it turns checkpointing on, earlier 5.x releases may not.
        model.enable_input_require_grads()
    # No KV cache while training (the trainer saves configs with it on, for inference).
    set_use_cache(model, False)
    if getattr(training_args, "compile_layers", False):
        from .compile import compile_layers

        compile_layers(model, activation_memory_budget=getattr(training_args, "activation_memory_budget", None))
    return model


def set_use_cache(model, value: bool) -> None:
    """Set ``use_cache`` on the config and the text config (where transformers 5 reads it)."""
    config = model.config
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = value


def _numel(param) -> int:
    # ZeRO-3 leaves an empty placeholder in each rank's parameter; ds_numel is its real size.
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """``{component: {"total": n, "trainable": n}}`` over the model's distinct parameters."""
    counts = {c: {"total": 0, "trainable": 0} for c in COMPONENT_TITLES}
    for name, param in model.named_parameters():
        row = counts[component_of(name)]
        row["total"] += _numel(param)
        if param.requires_grad:
            row["trainable"] += _numel(param)
    return counts


def parameter_table(model) -> str:
    """A short table of parameters per component (total and trainable), with a total row."""
    counts = parameter_counts(model)
    tied = counts["lm_head"]["total"] == 0
    lines = [f"{'component':<16}{'parameters':>16}{'trainable':>16}"]
    for component, title in COMPONENT_TITLES.items():
        row = counts[component]
        if component == "lm_head" and tied:
            lines.append(f"{title:<16}{'tied to the input embeddings (counted in language model)':>32}")
            continue
        lines.append(f"{title:<16}{row['total']:>16,}{row['trainable']:>16,}")
    total = sum(r["total"] for r in counts.values())
    trainable = sum(r["trainable"] for r in counts.values())
    lines.append(f"{'total':<16}{total:>16,}{trainable:>16,}")
    return "\n".join(lines)
