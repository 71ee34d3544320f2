"""kill -USR1 on a training process prints every thread's stack to its stderr, and the process goes on."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from qwenvl.train.stack_dumps import STACK_DUMP_SIGNAL
from tests.commands import REPO, run_command


def test_sigusr1_prints_all_thread_stacks_and_the_run_goes_on(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from qwenvl.train.stack_dumps import STACK_DUMP_SIGNAL, enable_stack_dumps
assert enable_stack_dumps()
def loader_thread_body():
    time.sleep(30)
threading.Thread(target=loader_thread_body, daemon=True).start()
def training_step():
    os.kill(os.getpid(), STACK_DUMP_SIGNAL)
    time.sleep(0.5)
training_step()
print("still training", flush=True)
""")
    result = run_command([sys.executable, str(script)], timeout=120, check=True)
    assert result.stdout == "still training\n"
    assert "training_step" in result.stderr and "loader_thread_body" in result.stderr  # every thread


@pytest.mark.slow
def test_a_run_stuck_on_a_read_says_where_on_sigusr1_and_keeps_waiting(tiny_model_dir, tmp_path):
    """train_qwen.py, its first image on a server that accepts and never answers: SIGUSR1 prints the
    stack of the wait (the media read under its time limit) and the run is still there."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    records = [{"image": f"http://127.0.0.1:{server.getsockname()[1]}/stuck.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                  {"from": "gpt", "value": "a stuck download"}]}]
    (tmp_path / "stuck.json").write_text(json.dumps(records))
    (tmp_path / "dict.json").write_text(json.dumps({"stuck": {"annotation_path": "stuck.json", "data_path": ""}}))
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl.train.train_qwen", "--model_name_or_path",
                             str(tiny_model_dir("qwen2_5_vl")), "--dataset_use", "stuck", "--dataset_dictionary",
                             str(tmp_path / "dict.json"), "--output_dir", str(tmp_path / "out"), "--tune_mm_mlp", "True",
                             "--use_cpu", "True", "--report_to", "none", "--media_timeout", "600", "--max_steps", "1"],
                            cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        server.settimeout(300)
        connection, _ = server.accept()  # the run is now waiting for the image
        time.sleep(1.0)
        os.kill(proc.pid, STACK_DUMP_SIGNAL)
        deadline = time.monotonic() + 60
        while "run_with_timeout" not in (tmp_path / "stderr").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "SIGUSR1 ended the run"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        server.close()
    stacks = (tmp_path / "stderr").read_text()
    assert "in run_with_timeout" in stacks and "(most recent call first)" in stacks, stacks[-3000:]
