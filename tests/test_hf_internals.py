"""qwenvl/hf_internals.py: the self-check over what we rely on in transformers, and the named accessors.

The self-check passes on the installed release (5.23); given a stand-in owner (an explicit
argument, never a patch of transformers) that lacks or changed something, it names it."""
from __future__ import annotations

import inspect
import types

import pytest
import transformers
from transformers import Trainer

from qwenvl import hf_internals as hf
from qwenvl.train.arguments import ConfigError


def test_every_relied_on_internal_is_as_in_5_23():
    assert transformers.__version__.startswith("5.23")
    assert hf.internals_problems() == []  # every family's internals too


@pytest.mark.parametrize("model_type", hf.FAMILIES)
def test_the_start_up_check_of_each_family_passes(model_type):
    hf.require_transformers_internals(model_type, error=ConfigError)


def test_a_trainer_base_without_save_is_named():
    # A stand-in for a release that dropped ``_save``: everything else the Trainer has, but not that.
    Base = type("Base", (), {name: inspect.getattr_static(Trainer, name) for name in dir(Trainer)
                             if name != "_save" and not name.startswith("__")})
    problems = hf.internals_problems("qwen2_5_vl", owners={"transformers.Trainer": Base})
    assert problems == [
        "transformers.Trainer._save is gone: transformers.Trainer._save (transformers 5.23 trainer.py:4131; relied on "
        "by qwenvl/train/trainer.py QwenVLTrainer._save (override: never runs if the base renames it))"]


def test_a_changed_override_signature_is_named():
    class Renamed(Trainer):
        def _load_from_checkpoint(self, checkpoint_dir, model=None):  # a release that renamed the parameter
            pass

    problems = hf.internals_problems("qwen2_5_vl", owners={"transformers.Trainer": Renamed})
    assert len(problems) == 1
    assert problems[0].startswith("transformers.Trainer._load_from_checkpoint takes (checkpoint_dir, model) where "
                                  "transformers 5.23 took (resume_from_checkpoint, model)")


def test_a_trainer_that_stops_setting_the_samplers_epoch_is_named():
    class NoEpochs(Trainer):
        def _run_epoch(self, *args, **kwargs):
            return None

    problems = hf.internals_problems("qwen2_5_vl", owners={"transformers.Trainer": NoEpochs})
    assert len(problems) == 1 and "transformers.Trainer._run_epoch no longer mentions 'batch_sampler'" in problems[0]
    assert "qwenvl/data/batch/sampler.py" in problems[0]


def test_missing_module_attribute_and_lost_setter_are_named():
    from transformers.integrations.deepspeed import deepspeed_optim_sched

    # No _hf_deepspeed_config_weak_ref; the module's other relied-on function as it is.
    deepspeed_standin = types.SimpleNamespace(deepspeed_optim_sched=deepspeed_optim_sched)

    class Config:
        _attn_implementation = "sdpa"  # a plain attribute: no setter that reaches the sub-configs

    with pytest.raises(ConfigError) as err:
        hf.require_transformers_internals(
            "qwen2_vl", error=ConfigError,
            owners={"transformers.integrations.deepspeed": deepspeed_standin, "transformers.PreTrainedConfig": Config})
    text = str(err.value)
    assert f"transformers {transformers.__version__} differs from 5.23" in text
    assert "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref is gone" in text
    assert "integrations/deepspeed.py:267" in text and "qwenvl/data/render/rope.py" in text
    assert "transformers.PreTrainedConfig._attn_implementation is no longer a property with a setter" in text
    assert text.count("\n  - ") == 2


def test_a_processor_that_inherits_the_placeholder_is_named():
    class Bare(transformers.ProcessorMixin):  # replace_image_token is ProcessorMixin's NotImplementedError
        pass

    problems = hf.internals_problems("qwen2_vl", owners={"transformers.Qwen2VLProcessor": Bare})
    assert [p.split(":")[0] for p in problems] == [
        "transformers.Qwen2VLProcessor.replace_image_token is now inherited from transformers.ProcessorMixin "
        "(a placeholder)",
        "transformers.Qwen2VLProcessor.replace_video_token is now inherited from transformers.ProcessorMixin "
        "(a placeholder)"]


def test_every_trainer_override_is_listed():
    """A new override of a Trainer method in QwenVLTrainer must be listed, so the check covers it."""
    from qwenvl.train.trainer import QwenVLTrainer

    overridden = {name for name, value in vars(QwenVLTrainer).items()
                  if callable(value) and hasattr(Trainer, name) and name != "__init__"}
    assert overridden <= set(hf.TRAINER_OVERRIDES), overridden - set(hf.TRAINER_OVERRIDES)


def test_attention_field_round_trip_reaches_the_sub_configs():
    config = transformers.Qwen2_5_VLConfig()
    hf.set_attn_implementation_field(config, "sdpa")
    assert hf.attn_implementation(config) == "sdpa"
    assert hf.attn_implementation(config.vision_config) == "sdpa" == hf.attn_implementation(config.text_config)


def test_our_attention_names_make_the_vision_tower_pass_cu_seqlens():
    from qwenvl.train.attention import VARLEN_ATTENTION

    assert hf.vision_tower_takes_cu_seqlens(VARLEN_ATTENTION)
    assert not hf.vision_tower_takes_cu_seqlens("sdpa")


def test_registered_deepspeed_config_is_read_back():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    assert hf.registered_deepspeed_config() is None
    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})  # registers itself
    try:
        assert hf.registered_deepspeed_config() is ds
    finally:
        unset_hf_deepspeed_config()
    assert hf.registered_deepspeed_config() is None


def test_reference_linear_attention_functions_are_transformers_pytorch_ones():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as module

    conv, rule = hf.reference_linear_attention_functions(module)
    assert not hasattr(conv, "__wrapped__") and not hasattr(rule, "__wrapped__")
    assert conv.__module__ == rule.__module__ == module.__name__
    assert (conv.__name__, rule.__name__) == ("causal_conv1d_fn", "torch_chunk_gated_delta_rule")
