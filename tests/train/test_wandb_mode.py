"""wandb: the user's own default where credentials exist; offline (said, under the output dir) where none do."""
from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from qwenvl.train.wandb_mode import configure_wandb, wandb_credentials_found
from tests.commands import run_command

REPO = Path(__file__).resolve().parents[2]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, the shape of a wandb API key


def _home(tmp_path, netrc: str | None = None) -> dict:
    """An environment of a user whose home is a fresh folder (optionally with a .netrc)."""
    home = Path(tempfile.mkdtemp(prefix="home", dir=tmp_path))
    if netrc is not None:
        (home / ".netrc").write_text(netrc)
        (home / ".netrc").chmod(stat.S_IRUSR | stat.S_IWUSR)
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "")}


def test_credentials_found_in_key_netrc_or_identity_token(tmp_path):
    assert not wandb_credentials_found(_home(tmp_path))
    assert wandb_credentials_found(dict(_home(tmp_path), WANDB_API_KEY=FAKE_KEY))
    assert wandb_credentials_found(dict(_home(tmp_path), WANDB_IDENTITY_TOKEN_FILE=str(tmp_path / "token")))
    # what `wandb login` writes
    assert wandb_credentials_found(_home(tmp_path, f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n"))
    # a netrc for other hosts only, or one for another wandb server than WANDB_BASE_URL names
    assert not wandb_credentials_found(_home(tmp_path, "machine github.com login u password p\n"))
    other = _home(tmp_path, f"machine wandb.example.com login user password {FAKE_KEY}\n")
    assert not wandb_credentials_found(other)
    assert wandb_credentials_found(dict(other, WANDB_BASE_URL="https://wandb.example.com"))
    # $NETRC names the file, as wandb reads it
    (tmp_path / "elsewhere").write_text(f"machine api.wandb.ai login user password {FAKE_KEY}\n")
    assert wandb_credentials_found(dict(_home(tmp_path), NETRC=str(tmp_path / "elsewhere")))


def test_wandb_mode_is_left_to_wandb_unless_no_credentials_exist(tmp_path):
    out = str(tmp_path / "run")
    logged_in = _home(tmp_path, f"machine api.wandb.ai login user password {FAKE_KEY}\n")
    assert configure_wandb(["wandb"], out, logged_in) == []
    assert "WANDB_MODE" not in logged_in and logged_in["WANDB_DIR"] == out  # online: wandb's own default

    with_key = dict(_home(tmp_path), WANDB_API_KEY=FAKE_KEY)
    assert configure_wandb(["wandb"], out, with_key) == [] and "WANDB_MODE" not in with_key
    assert with_key["WANDB_API_KEY"] == FAKE_KEY and FAKE_KEY not in json.dumps({k: v for k, v in with_key.items()
                                                                                 if k != "WANDB_API_KEY"})

    chosen = dict(_home(tmp_path), WANDB_MODE="online", WANDB_DIR="/elsewhere")
    assert configure_wandb(["wandb"], out, chosen) == []
    assert chosen["WANDB_MODE"] == "online" and chosen["WANDB_DIR"] == "/elsewhere"  # the user's choices stand

    nothing = _home(tmp_path)
    (line,) = configure_wandb(["wandb", "tensorboard"], out, nothing)
    assert nothing["WANDB_MODE"] == "offline"
    assert f"{out}/wandb" in line and f"wandb sync {out}/wandb/offline-run-*" in line

    untouched = _home(tmp_path)
    assert configure_wandb(["tensorboard"], out, untouched) == [] and "WANDB_DIR" not in untouched


def test_official_recipe_does_not_force_offline(tmp_path):
    """sft_7b.sh used to export WANDB_MODE=offline; the environment torchrun gets must not have it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A stand-in for torchrun that records the environment it was started with (the real one would train 7B).
    (bin_dir / "torchrun").write_text("#!/bin/sh\necho \"WANDB_MODE=${WANDB_MODE-unset}\"\n")
    (bin_dir / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "NPROC_PER_NODE", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "out"))
    result = run_command(["bash", "scripts/sft_7b.sh"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "WANDB_MODE=unset" in result.stdout


@pytest.mark.slow
def test_run_without_credentials_logs_offline_under_the_output_dir(tiny_model_dir, tmp_path):
    """A real wandb run, in its own process as a training is: no key, no netrc, WANDB_MODE unset ->
    offline files in OUT/wandb, one line saying so, nothing in the current directory."""
    from .test_observability_and_resume import _flags

    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "NETRC", "WANDB_IDENTITY_TOKEN_FILE")}
    env.update(_home(tmp_path), WANDB_PROJECT="qwenvl-tests", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "qwenvl.train.train_qwen", *_flags(
        tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "2", "--report_to", "wandb", "--save_strategy", "no",
        "--disable_tqdm", "True")]
    result = run_command(command, env=env, cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"logs offline to {out}/wandb" in result.stdout and "wandb sync" in result.stdout
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(cwd.iterdir()) == []  # nothing of wandb's in the current directory
