"""Resume after a crash: a driver killed with SIGKILL mid-run, run again with the same
journal, reuses what finished and runs only the rest; damaged entries and failures are
never reused; ``explain`` says why a node is or is not reused (real drivers, real
signals, real files)."""
import signal
import subprocess
import sys

import pytest

import rhapsody_graph as rhapsody

from ..conftest import wait_until

pytestmark = pytest.mark.timeout(180)

DRIVER = r'''
import os, sys, time
import rhapsody_graph as rhapsody

journal, log, hang = sys.argv[1], sys.argv[2], sys.argv[3]


def helper(x):
    return x + 1


@rhapsody.task
def step(i, previous):
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if i == 4 and os.path.exists(hang):
        time.sleep(600)  # the run is killed here
    if i == 5 and os.path.exists(hang + ".fail"):
        raise RuntimeError("step 5 failed")
    return helper(previous)


if __name__ == "__main__":
    node = 0
    for i in range(6):
        node = step(i, node)
    with rhapsody.Session(journal=journal) as s:
        print("value", s.compute(node)[0])
'''


def ran(log) -> list:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def driver(tmp_path, hang: bool, fail: bool = False) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    flag = tmp_path / "hang"
    for path, on in ((flag, hang), (tmp_path / "hang.fail", fail)):
        if on:
            path.touch()
        elif path.exists():
            path.unlink()
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "journal"),
                             str(tmp_path / "log"), str(flag)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)



def journal_entries(tmp_path) -> list:
    return sorted(p for p in (tmp_path / "journal").rglob("*")
                  if p.is_file() and not p.name.endswith(".why") and not p.name.startswith("."))


def killed_at_step_four(tmp_path) -> None:
    first = driver(tmp_path, hang=True)
    try:
        # step 4 hangs; steps 0-3 are in the journal once the driver has taken their
        # values (step 4 may start on its worker before the driver took step 3's)
        assert wait_until(lambda: 4 in ran(tmp_path / "log")
                          and len(journal_entries(tmp_path)) == 4, 120), first.stderr.read()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()


def test_a_run_killed_mid_way_resumes_from_what_finished(tmp_path):
    killed_at_step_four(tmp_path)
    assert ran(tmp_path / "log") == [0, 1, 2, 3, 4]
    again = driver(tmp_path, hang=False)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "value 6" in out, err
    assert ran(tmp_path / "log") == [0, 1, 2, 3, 4, 4, 5]  # 0-3 reused, 4 and 5 ran


def test_a_damaged_entry_is_recomputed_never_returned(tmp_path):
    killed_at_step_four(tmp_path)
    entries = journal_entries(tmp_path)
    assert len(entries) == 4
    # every entry damaged (two truncated, two with a flipped byte): which entry belongs to
    # which step follows from hashes, and an intact step 3 would rightly spare 0-2
    for i, entry in enumerate(entries):
        data = entry.read_bytes()
        entry.write_bytes(data[:-3] if i % 2 else data[:-1] + bytes([data[-1] ^ 1]))
    again = driver(tmp_path, hang=False)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "value 6" in out, err
    assert ran(tmp_path / "log") == [0, 1, 2, 3, 4] + [0, 1, 2, 3, 4, 5]  # none reused


def test_failures_are_never_kept(tmp_path):
    first = driver(tmp_path, hang=False, fail=True)
    out, err = first.communicate(timeout=120)
    assert first.returncode != 0 and "step 5 failed" in err
    again = driver(tmp_path, hang=False)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "value 6" in out, err
    assert ran(tmp_path / "log") == [0, 1, 2, 3, 4, 5, 5]


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def test_explain_says_why_a_node_is_or_is_not_reused(tmp_path):
    journal = tmp_path / "journal"
    node = rhapsody.task(double)(21)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=journal) as s:
        assert s.compute(node) == (42,)
    assert "is reused" in rhapsody.explain(rhapsody.task(double)(21), journal)
    assert "its arguments changed" in rhapsody.explain(rhapsody.task(double)(20), journal)
    changed = rhapsody.task(triple, name="double")(21)
    assert "its function's code" in rhapsody.explain(changed, journal)
    assert "its options changed" in rhapsody.explain(rhapsody.task(double, version="2")(21),
                                                     journal)
    assert "no entry of a node named 'other'" in rhapsody.explain(
        rhapsody.task(double, name="other")(21), journal)
