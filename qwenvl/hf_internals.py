"""Every place this project relies on a private or undocumented part of transformers (and of
accelerate beneath the Trainer), in one module, with a self-check run when training starts.

The port is pinned to the transformers release CI tests (``pyproject.toml``: 5.23).  What a new
release may silently change is listed in ``INTERNALS``: for each, where it lives in transformers
5.23 (file:line), what it must look like (parameters, a property with a setter, words its source
must mention) and which of our code relies on it.  ``internals_problems()`` compares the installed
library with that list and returns one sentence per difference; ``require_transformers_internals``
(called by ``train_qwen`` before anything is built) raises them all at once.

Two kinds of reliance:

* calls and reads, made through the named functions below (``attn_implementation``,
  ``registered_deepspeed_config``, ``build_from_config``, ...), so a change is fixed here once;
* overrides: ``QwenVLTrainer`` (``qwenvl/train/trainer.py``) redefines Trainer methods, some
  private (``_save``, ``_save_checkpoint``, ``_load_from_checkpoint``).  Python cannot route an
  override through a function, so the table lists each with the base signature it must keep;
  an override whose base was renamed would silently never run.

Uses that stay where they are, reading undocumented but public helpers of the processors
(``qwenvl/data/batch/count.py``: ``replace_image_token``, ``replace_video_token``,
``get_text_with_replacements``, ``get_number_of_image_patches``, ``tokenizer._tokenizer``), are
listed and checked all the same.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

# -------------------------------------------------------------------------- what we rely on


@dataclass(frozen=True)
class Internal:
    """One relied-on part of transformers (or accelerate): ``owner.name``.

    ``params``: for a function or method, its parameter names in order (without ``self`` /
    ``cls``, ``*args`` / ``**kwargs`` ignored), or None for an attribute.  ``settable``: a
    property that must have a setter.  ``mentions``: words the function's source must contain
    (behaviour we rely on inside it).  ``not_from``: the attribute must be overridden, not
    inherited from this owner (a base placeholder that raises).  ``families``: checked only for
    runs of these model types (None: always).  ``unwrap``: read through ``__wrapped__``.
    """

    owner: str
    name: str
    where: str
    used_by: str
    params: tuple[str, ...] | None = None
    settable: bool = False
    mentions: tuple[str, ...] = ()
    not_from: str | None = None
    families: tuple[str, ...] | None = None
    unwrap: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}"


_T = "transformers 5.23"
_TRAINER = "transformers.Trainer"
_OVERRIDE = "qwenvl/train/trainer.py QwenVLTrainer.{} (override: never runs if the base renames it)"

# The Trainer methods QwenVLTrainer overrides, with the base parameters its override takes.
TRAINER_OVERRIDES = {
    "_load_from_checkpoint": (("resume_from_checkpoint", "model"), "trainer.py:3602"),
    # Turns torch's parameter-group error on resume into a ConfigError naming the flags (qwenvl/train/trainer.py).
    "_load_optimizer_and_scheduler": (("checkpoint",), "trainer.py:3886"),
    # Turns transformers' DeepSpeed-config mismatch ValueError ("DeepSpeed config values that mismatch",
    # integrations/deepspeed.py:245-262) into a ConfigError naming the keys and "auto" as the fix.
    "_prepare_for_training": (("max_steps", "train_dataloader", "resume_from_checkpoint"), "trainer.py:1715"),
    "_save": (("output_dir", "state_dict"), "trainer.py:4131"),
    "_save_checkpoint": (("model", "trial"), "trainer.py:3355"),
    "create_optimizer": (("model",), "trainer.py:1259"),
    "get_train_dataloader": ((), "trainer.py:916"),
    "training_step": (("model", "inputs", "num_items_in_batch"), "trainer.py:2043"),
    "compute_loss": (("model", "inputs", "return_outputs", "num_items_in_batch"), "trainer.py:2122"),
    "log": (("logs", "start_time"), "trainer.py:4181"),
    # Overridden by the FSDP2 work (qwenvl/train/sharding.py); listed so the check covers it there.
    "save_model": (("output_dir", "_internal_call"), "trainer.py"),
    "create_accelerator_and_postprocess": ((), "trainer.py"),
}

_VISION_ATTENTION = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl.VisionAttention", "modeling_qwen2_vl.py:381"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention",
                   "modeling_qwen2_5_vl.py:291"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionAttention", "modeling_qwen3_vl.py:277"),
    "qwen3_vl_moe": ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeVisionAttention",
                     "modeling_qwen3_vl_moe.py:511"),
    "qwen3_5": ("transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionAttention", "modeling_qwen3_5.py:1041"),
    "qwen3_5_moe": ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionAttention",
                    "modeling_qwen3_5_moe.py:1130"),
}
_PROCESSORS = {
    "transformers.Qwen2VLProcessor": ("qwen2_vl",),
    "transformers.Qwen2_5_VLProcessor": ("qwen2_5_vl",),
    "transformers.Qwen3VLProcessor": ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
}
_LINEAR_ATTENTION = {"qwen3_5": "modeling_qwen3_5.py:254,285", "qwen3_5_moe": "modeling_qwen3_5_moe.py:250,281"}
FAMILIES = tuple(_VISION_ATTENTION)

INTERNALS: tuple[Internal, ...] = (
    *(Internal(_TRAINER, name, f"{_T} {where}", _OVERRIDE.format(name), params=params)
      for name, (params, where) in TRAINER_OVERRIDES.items()),
    Internal(_TRAINER, "_get_output_dir", f"{_T} trainer.py:3336",
             "qwenvl/train/trainer.py QwenVLTrainer._save_checkpoint (the run folder of a checkpoint)",
             params=("trial",)),
    Internal(_TRAINER, "training_step", f"{_T} trainer.py:2108",
             "count_loss_over_tokens (the Trainer passes num_items_in_batch to the model only when "
             "model_accepts_loss_kwargs is true)", mentions=("model_accepts_loss_kwargs",)),
    Internal(_TRAINER, "_run_epoch", f"{_T} trainer.py:1851-1858",
             "qwenvl/data/batch/sampler.py (the Trainer calls set_epoch on the batch sampler inside accelerate's "
             "BatchSamplerShard; without it every epoch repeats the first one's order)",
             mentions=("batch_sampler", "set_epoch")),
    Internal("accelerate.data_loader.BatchSamplerShard", "__init__", "accelerate data_loader.py:145-158",
             "qwenvl/data/batch/sampler.py (the wrapped sampler is kept as .batch_sampler)",
             mentions=("self.batch_sampler = batch_sampler",)),
    Internal("transformers.PreTrainedConfig", "_attn_implementation", f"{_T} configuration_utils.py:595-599",
             "attn_implementation / set_attn_implementation_field (qwenvl/train/attention.py, train_qwen.py)",
             settable=True),
    Internal("transformers.utils.generic", "is_flash_attention_requested", f"{_T} utils/generic.py:269",
             "vision_tower_takes_cu_seqlens (qwenvl/train/attention.py names its kernel with 'flash')",
             params=("config", "requested_attention_implementation", "version")),
    *(Internal(path.rsplit(".", 1)[0], path.rsplit(".", 1)[1] + ".forward", f"{_T} {where}",
               "qwenvl/train/attention.py: the vision tower passes cu_seqlens in one call only for 'flash' names",
               mentions=("is_flash_attention_requested",), families=(family,))
      for family, (path, where) in _VISION_ATTENTION.items()),
    Internal("transformers.integrations.deepspeed", "_hf_deepspeed_config_weak_ref",
             f"{_T} integrations/deepspeed.py:267", "registered_deepspeed_config (qwenvl/data/render/rope.py)"),
    Internal("transformers.integrations.deepspeed", "deepspeed_optim_sched", f"{_T} integrations/deepspeed.py:559-593",
             "qwenvl/train/trainer.py QwenVLTrainer._schedule_rates_per_group (create_optimizer runs before DeepSpeed "
             "builds the config's \"scheduler\", whose rates it makes per group)",
             params=("trainer", "hf_deepspeed_config", "args", "num_training_steps", "model_parameters"),
             mentions=("trainer.create_optimizer()",)),
    # With an "optimizer" section: transformers' placeholder holds all parameters as one group, the Trainer calls
    # create_optimizer after deepspeed_init, and accelerate hands the placeholder's params to deepspeed.initialize.
    Internal("transformers.integrations.deepspeed", "deepspeed_optim_sched", f"{_T} integrations/deepspeed.py:577",
             "qwenvl/train/trainer.py QwenVLTrainer.create_optimizer (regroups a DeepSpeed \"optimizer\" section's "
             "placeholder)", mentions=("DummyOptim(params=model_parameters)",)),
    Internal(_TRAINER, "_prepare_for_training", f"{_T} trainer.py:1729-1733",
             "qwenvl/train/trainer.py QwenVLTrainer.create_optimizer (runs after deepspeed_init, before prepare)",
             mentions=("deepspeed_init(self", "self.create_optimizer()")),
    Internal("accelerate.Accelerator", "_prepare_deepspeed", "accelerate accelerator.py:2369-2370",
             "qwenvl/train/trainer.py QwenVLTrainer.create_optimizer (DeepSpeed builds its optimizer over DummyOptim's "
             "parameter groups)", mentions=('kwargs["model_parameters"] = optimizer.params',)),
    Internal("transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig", "trainer_config_process",
             f"{_T} integrations/deepspeed.py:172-173",
             "qwenvl/train/deepspeed_schedule.py AUTO_FILLED (\"auto\" warmup_min_lr is 0, warmup_max_lr "
             "--learning_rate)", mentions=('"scheduler.params.warmup_min_lr", 0', '"scheduler.params.warmup_max_lr", '
                                           "args.learning_rate")),
    Internal("transformers.PreTrainedModel", "_from_config", f"{_T} modeling_utils.py:1393",
             "build_from_config (benchmarks: random weights built directly on the device)", params=("config",)),
    Internal("transformers.ProcessorMixin", "get_text_with_replacements", f"{_T} processing_utils.py:890",
             "qwenvl/data/batch/count.py (placeholder expansion when counting)",
             params=("text", "images_replacements", "videos_replacements", "audio_replacements")),
    *(Internal(proc, name, f"{_T} models/*/processing_*.py", "qwenvl/data/batch/count.py (placeholder expansion)",
               params=params, not_from="transformers.ProcessorMixin", families=families)
      for proc, families in _PROCESSORS.items()
      for name, params in (("replace_image_token", ("image_inputs", "image_idx")),
                           ("replace_video_token", ("video_inputs", "video_idx")))),
    Internal("transformers.Qwen2VLImageProcessor", "get_number_of_image_patches",
             f"{_T} models/qwen2_vl/image_processing_qwen2_vl.py:269", "qwenvl/data/batch/count.py (image patches)",
             params=("height", "width", "images_kwargs")),
    Internal("transformers.PreTrainedTokenizerFast", "_tokenizer", f"{_T} tokenization_utils_tokenizers.py",
             "qwenvl/data/batch/length_key.py (the tokenizers backend, when backend_tokenizer is absent)"),
    *(Internal(f"transformers.models.{family}.modeling_{family}", fn, f"{_T} {where}",
               "reference_linear_attention_functions (qwenvl/train/linear_attention.py: transformers' PyTorch "
               "functions under the fla dispatch, through __wrapped__)", params=params, families=(family,), unwrap=True)
      for family, where in _LINEAR_ATTENTION.items()
      for fn, params in (("causal_conv1d_fn", ("hidden_states", "weight", "bias", "activation")),
                         ("torch_chunk_gated_delta_rule", ("query", "key", "value", "g", "beta")))),
)

# -------------------------------------------------------------------------- the named accessors


def attn_implementation(config) -> str | None:
    """The attention implementation a model config names.

    Relies on ``PreTrainedConfig._attn_implementation`` (a property; transformers 5.23
    configuration_utils.py:595), which every attention layer reads at each call."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation_field(config, name: str) -> None:
    """Set the attention implementation ``config`` names without transformers' import check.

    Relies on the ``_attn_implementation`` property's setter (transformers 5.23
    configuration_utils.py:598), which recurses into the sub-configs; the public
    ``set_attn_implementation`` refuses "flash" names that are not a FlashAttention package."""
    config._attn_implementation = name


def vision_tower_takes_cu_seqlens(name: str) -> bool:
    """Whether the Qwen vision towers hand attention ``name`` all windows in one call with
    ``cu_seqlens`` (else they loop over windows on the host).

    Relies on ``transformers.utils.generic.is_flash_attention_requested`` (transformers 5.23
    utils/generic.py:269: ``"flash" in name``), which each vision attention's forward calls
    (e.g. modeling_qwen2_5_vl.py:291)."""
    from transformers.utils.generic import is_flash_attention_requested

    return bool(is_flash_attention_requested(requested_attention_implementation=name))


def registered_deepspeed_config():
    """The ``HfDeepSpeedConfig`` transformers holds globally (``--deepspeed``), or None.

    Relies on the module variable ``_hf_deepspeed_config_weak_ref`` (transformers 5.23
    integrations/deepspeed.py:267), a weak reference set by ``set_hf_deepspeed_config``;
    there is no public getter to restore it after ``unset_hf_deepspeed_config``."""
    import transformers.integrations.deepspeed as hf_deepspeed

    weak = hf_deepspeed._hf_deepspeed_config_weak_ref
    return weak() if weak is not None else None


def build_from_config(cls, config, **kwargs):
    """``cls`` with random weights from ``config`` (no checkpoint), honouring ``dtype`` and
    ``attn_implementation`` and the ambient device.

    Relies on ``PreTrainedModel._from_config`` (transformers 5.23 modeling_utils.py:1393), what
    ``AutoModel.from_config`` calls; it also applies the dtype and attention setting."""
    return cls._from_config(config, **kwargs)


def count_loss_over_tokens(trainer) -> None:
    """Make ``trainer`` pass the step's count of trained tokens (``num_items_in_batch``) to the
    model, so each optimizer step's loss is the per-token mean over all its micro-batches.

    Relies on the attribute ``Trainer.model_accepts_loss_kwargs`` (transformers 5.23
    trainer.py:518, read in training_step at trainer.py:2108); the released Qwen-VL models
    declare ``accepts_loss_kwargs=False``, which would average micro-batch means instead."""
    trainer.model_accepts_loss_kwargs = True


def reference_linear_attention_functions(modeling_module) -> tuple:
    """transformers' own PyTorch ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule`` of a
    Qwen3.5 modeling module, beneath the fla / causal-conv1d dispatch wrapped around them.

    Relies on that dispatch keeping the PyTorch function as ``__wrapped__`` (``functools.wraps``,
    transformers 5.23 integrations/hub_kernels.py:1027; modeling_qwen3_5.py:254,285)."""
    return (inspect.unwrap(modeling_module.causal_conv1d_fn),
            inspect.unwrap(modeling_module.torch_chunk_gated_delta_rule))


# -------------------------------------------------------------------------- the self-check


def _resolve(path: str):
    """The object at a dotted ``path`` (a module, or attributes below one)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _param_names(fn) -> tuple[str, ...]:
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "cls"):
            continue
        names.append(p.name)
    return tuple(names)


def _lookup(owner_obj, name: str):
    obj = owner_obj
    for attr in name.split("."):
        if isinstance(obj, type):
            # Through the MRO without calling descriptors (a property stays a property).
            for klass in obj.__mro__:
                if attr in vars(klass):
                    obj = vars(klass)[attr]
                    break
            else:
                raise AttributeError(attr)
        else:
            obj = getattr(obj, attr)
    return obj


def problem_with(item: Internal, owner_obj=None) -> str | None:
    """What is wrong with ``item`` in the installed library (or in ``owner_obj``, a stand-in for
    ``item.owner``), as one sentence; None when it is as transformers 5.23 has it."""
    where = f"{item.qualname} ({item.where}; relied on by {item.used_by})"
    if owner_obj is None:
        try:
            owner_obj = _resolve(item.owner)
        except (ImportError, AttributeError):
            return f"{item.owner} is gone: {where}"
    try:
        value = _lookup(owner_obj, item.name)
    except AttributeError:
        return f"{item.qualname} is gone: {where}"
    if item.settable and not (isinstance(value, property) and value.fset is not None):
        return f"{item.qualname} is no longer a property with a setter: {where}"
    fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
    if item.unwrap:
        fn = inspect.unwrap(fn)
    if item.not_from is not None:
        try:
            base = _lookup(_resolve(item.not_from), item.name.split(".")[0])
        except (ImportError, AttributeError):
            base = None
        if base is not None and _lookup(owner_obj, item.name.split(".")[0]) is base:
            return f"{item.qualname} is now inherited from {item.not_from} (a placeholder): {where}"
    if item.params is not None:
        got = _param_names(fn)
        if got[:len(item.params)] != item.params:
            return (f"{item.qualname} takes ({', '.join(got)}) where transformers 5.23 took "
                    f"({', '.join(item.params)}): {where}")
    for word in item.mentions:
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            return f"the source of {item.qualname} cannot be read to check that it uses {word!r}: {where}"
        if word not in source:
            return f"{item.qualname} no longer mentions {word!r}: {where}"
    return None


def internals_problems(model_type: str | None = None, owners: dict | None = None,
                       internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """One sentence per relied-on internal that differs from transformers 5.23 (empty: all as expected).

    ``model_type``: also check the internals of that family only (None: of every family).
    ``owners``: stand-ins for owners, by their dotted name (``{"transformers.Trainer": MyBase}``);
    the others are imported from the installed libraries."""
    owners = owners or {}
    problems = []
    for item in internals:
        if item.families is not None and model_type is not None and model_type not in item.families:
            continue
        found = problem_with(item, owners.get(item.owner))
        if found:
            problems.append(found)
    return problems


def require_transformers_internals(model_type: str | None = None, error: type[Exception] = RuntimeError,
                                   owners: dict | None = None) -> None:
    """Raise ``error`` naming every relied-on internal that changed (called once when training starts;
    ``model_type`` and ``owners`` as in ``internals_problems``)."""
    problems = internals_problems(model_type, owners)
    if problems:
        import transformers

        raise error(f"transformers {transformers.__version__} differs from 5.23, the release this code was "
                    "written and tested against (qwenvl/hf_internals.py), in what it relies on:\n  - "
                    + "\n  - ".join(problems) + "\nInstall transformers==5.23.0 (pip install -r requirements.txt).")
