"""The known-harmless library warnings are silenced; anything else, ours included, still shows."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# One process with a gloo process group of one rank (what torchrun + DeepSpeed set up), then the two
# library calls that printed the noise: TrainingArguments' device setup and torch's reduce_scatter_tensor.
SCRIPT = r"""
import sys, warnings
import torch, torch.distributed as dist
warnings.simplefilter("default")  # show every warning once per place, whatever the interpreter's settings
if sys.argv[1] == "quiet":
    from qwenvl.train.library_warnings import quiet_known_library_warnings
    quiet_known_library_warnings()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%s" % sys.argv[2], rank=0, world_size=1)
from transformers import TrainingArguments
TrainingArguments(output_dir=sys.argv[3], use_cpu=True, report_to="none").device
TrainingArguments(output_dir=sys.argv[3], use_cpu=True, report_to="none", gradient_checkpointing=True)
try:
    dist.reduce_scatter_tensor(torch.zeros(1), torch.ones(1))
except Exception:
    pass  # the warning is raised before the backend is asked
warnings.warn("qwenvl: our own FutureWarning", FutureWarning)
import logging
logging.getLogger("transformers.training_args").warning("another transformers warning")
dist.destroy_process_group()
"""


def _run(mode, tmp_path):
    from .conftest import free_port

    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(free_port()), str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_known_library_warnings_are_silenced_and_others_are_not(tmp_path):
    loud = _run("loud", tmp_path)
    # the test sees both warnings when nothing filters them
    assert "launch your script with `python -m torch.distributed.launch" in loud
    assert "`torch.distributed.reduce_scatter_tensor` is deprecated" in loud
    quiet = _run("quiet", tmp_path)
    assert "torch.distributed.launch" not in quiet and "reduce_scatter_tensor` is deprecated" not in quiet
    # transformers >= 5.2x renamed the official --gradient_checkpointing (older versions say nothing)
    assert "`gradient_checkpointing` is deprecated" not in quiet
    assert "qwenvl: our own FutureWarning" in quiet and "another transformers warning" in quiet
