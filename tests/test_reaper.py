"""tests/reaper.py, the leftover check of every launch test: it must find what a command
left behind, however detached, and only that."""
import os
import re
import subprocess

from tests.reaper import NONE_LEFT, left_behind, run as reaped


def run(script, grace=5.0):
    return reaped(["bash", "-c", script], grace, 60)


def test_the_reaper_reports_and_kills_a_process_its_command_left_in_a_session_of_its_own():
    code, output = run("setsid sleep 600 & echo started $!; exit 3", grace=0.5)
    pid = int(re.search(r"started (\d+)", output).group(1))
    assert code == 3
    assert re.fullmatch(rf"reaper: left behind: {pid} \(sleep 600\)", left_behind(output))
    assert not os.path.exists(f"/proc/{pid}"), "the leftover was not killed"


def test_the_reaper_gives_a_process_its_grace_to_exit_on_its_own():
    code, output = run("(sleep 0.5; echo late) & exit 0")
    assert (code, left_behind(output)) == (0, NONE_LEFT) and "late" in output


def test_the_reaper_passes_on_the_signal_that_ended_its_command():
    code, output = run("kill -9 $$")
    assert (code, left_behind(output)) == (128 + 9, NONE_LEFT)


def test_the_reaper_does_not_count_a_process_that_is_not_its_commands():
    other = subprocess.Popen(["sleep", "600"])
    try:
        code, output = run("exit 0")
        assert (code, left_behind(output)) == (0, NONE_LEFT) and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_command_past_its_timeout_is_killed_with_all_it_started():
    code, output = reaped(["bash", "-c", "setsid sleep 600 & echo started $!; sleep 600"], 1, 1)
    pid = int(re.search(r"started (\d+)", output).group(1))
    assert code is None and not os.path.exists(f"/proc/{pid}")
