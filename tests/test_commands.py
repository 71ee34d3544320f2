"""tests/commands.py: a command that leaves processes behind or hangs fails its test instead of hanging the suite."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.commands import REPO, LeftoverProcessWarning, run_command, session_processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_output_comes_back_even_when_a_leftover_holds_the_pipes(tmp_path):
    """The hang subprocess.run(capture_output=True) has: a background child keeps stdout open after the
    command exits. run_command returns, names the leftover, and kills it."""
    pid_file = tmp_path / "pid"
    script = f"sleep 600 & echo $! > {pid_file}; echo done; echo warn >&2"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command(["bash", "-c", script], leftover_grace_s=1, leftovers="fail")
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert "left running" in message and "sleep 600" in message and "done" in message
    assert not _alive(int(pid_file.read_text()))
    with pytest.warns(LeftoverProcessWarning, match="sleep 600"):
        result = run_command(["bash", "-c", script], leftover_grace_s=1)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "warn\n")
    assert not _alive(int(pid_file.read_text()))


def test_a_command_past_its_time_limit_is_killed_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "pid"
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '600']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(600)")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([sys.executable, "-c", code], timeout=5)
    assert time.monotonic() - started < 60
    assert "did not finish within 5 s" in str(failure.value) and "started" in str(failure.value)
    assert not _alive(int(pid_file.read_text()))


def test_clean_commands_pass_and_check_reports_the_exit_status():
    assert run_command(["bash", "-c", "echo ok"], check=True).stdout == "ok\n"
    with pytest.raises(pytest.fail.Exception, match="exited with 3"):
        run_command(["bash", "-c", "echo broken >&2; exit 3"], check=True)
    assert run_command(["bash", "-c", "exit 3"]).returncode == 3


def test_session_processes_sees_only_that_session():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert list(session_processes(proc.pid)) == [proc.pid]
        assert proc.pid not in session_processes(os.getsid(0))
    finally:
        proc.kill()
        proc.wait()


def test_a_hung_training_process_leaves_its_stack_in_the_failure(tmp_path):
    """Before killing a command past its time limit, its Python processes are asked for their stacks
    (SIGUSR1, which train_qwen.py turns into a stack dump): the failure shows where it waited."""
    script = tmp_path / "stuck.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from qwenvl.train.stack_dumps import enable_stack_dumps
assert enable_stack_dumps()
def waits_for_a_rank_that_never_comes():
    print("waiting", flush=True)
    time.sleep(600)
waits_for_a_rank_that_never_comes()
""")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([sys.executable, str(script)], timeout=5)
    message = str(failure.value)
    assert "did not finish within 5 s" in message and "stacks of 1 training process" in message
    assert "waits_for_a_rank_that_never_comes" in message.split("--- stderr (tail)")[1]


@pytest.mark.timeout(8)
def test_a_command_cut_off_by_the_test_time_limit_shows_where_it_waited(tmp_path, capsys):
    """pytest-timeout interrupts run_command before the command's own limit: the command's output and
    its stacks still reach the report (printed to the test's stderr), and nothing is left running."""
    script = tmp_path / "stuck.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from qwenvl.train.stack_dumps import enable_stack_dumps
enable_stack_dumps()
def stuck_in_a_collective():
    time.sleep(600)
stuck_in_a_collective()
""")
    with pytest.raises(pytest.fail.Exception, match="Timeout"):
        run_command([sys.executable, str(script)], timeout=600)
    assert "stuck_in_a_collective" in capsys.readouterr().err
