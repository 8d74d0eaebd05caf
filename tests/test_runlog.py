"""The run journal: a JSON line per attempt, with where it ran and how it ended."""
import json
import time

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.runlog import read


def flaky(x):
    raise ValueError(f"bad input {x}")


def payload(n):
    return bytes(n)


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_every_attempt_is_a_line_with_its_placement_outcome_and_bytes(tmp_path):
    path = tmp_path / "run.jsonl"
    backend = rhapsody.LocalBackend(cpus=2, gpus=1)
    with rhapsody.Session(backends=[backend], run_log=path) as s:
        big = s.submit(rhapsody.task(payload).options(gpus=1)(10_000))
        bad = s.submit(rhapsody.task(flaky).options(retries=1)(7))
        echo = s.submit(rhapsody.executable(["echo", "hi"]))
        assert len(big.result(timeout=60)) == 10_000 and echo.result(timeout=60).returncode == 0
        with pytest.raises(ValueError):
            bad.result(timeout=60)
        slow = s.submit(rhapsody.task(nap)(60))
        while not slow.running():
            rhapsody.wait([slow], timeout=0.05)
        slow.cancel()
    records = read(path)
    by_name = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    (b,) = by_name["payload"]
    assert (b["outcome"], b["kind"], b["backend"], b["attempt"]) == ("done", "function", "local", 1)
    assert b["bytes"] >= 10_000 and b["gpus"] == [[0]] and len(b["cpus"][0]) == 1
    assert b["host"] == backend.inventory.hosts[0].name and b["end"] >= b["start"] > 0
    assert [(r["outcome"], r["attempt"]) for r in by_name["flaky"]] == [("failed", 1), ("failed", 2)]
    assert by_name["flaky"][0]["error"] == "ValueError: bad input 7"
    assert by_name["echo"][0]["kind"] == "executable" and by_name["echo"][0]["outcome"] == "done"
    assert [r["outcome"] for r in by_name["nap"]] == ["killed"]
    assert "error" not in by_name["nap"][0]  # cancelled: no error of its own


def test_a_timeout_is_logged_as_a_kill_that_says_it_was_the_timeout(tmp_path):
    path = tmp_path / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
        late = s.submit(rhapsody.task(nap, timeout=0.2)(60))
        with pytest.raises(rhapsody.NodeTimeoutError):
            late.result(timeout=60)
    (record,) = read(path)
    assert record["outcome"] == "killed"
    assert record["error"].startswith("NodeTimeoutError: node 'nap-") and "0.2 s" in record["error"]


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
        s.submit(rhapsody.task(abs)(-1)).result(timeout=60)
    with open(path, "a") as f:
        f.write('{"node": "cut of')
    assert [r["name"] for r in read(path)] == ["abs"]


def test_the_run_after_one_killed_mid_line_keeps_every_record_of_its_own(tmp_path):
    path = tmp_path / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
        s.submit(rhapsody.task(abs)(-1)).result(timeout=60)
    with open(path, "a") as f:
        f.write('{"node": "cut of')  # the first run was killed here
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
        s.submit(rhapsody.task(abs)(-2)).result(timeout=60)  # it joined the torn line
        s.submit(rhapsody.task(abs)(-3)).result(timeout=60)
    assert [r["name"] for r in read(path)] == ["abs"] * 3  # the first run's, both of the next


def test_what_is_not_a_run_journal_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("garbage\nmore garbage\n")
    with pytest.raises(ValueError, match=r"notes.txt: not a run journal .*: no line is a "
                                         r"record \(line 1 is not JSON\)"):
        read(path)
    path.write_text('{"node": "a", "name": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1: .*no 'start', 'end', 'outcome', 'backend', "
                                         r"'host', 'attempt'$"):
        read(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"notes.txt: not a run journal .*: it is empty"):
        read(path)
    record = dict.fromkeys(("node", "name", "outcome", "backend", "host", "attempt"), "x")
    path.write_text(json.dumps({**record, "start": 1.0, "end": None}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: .*end not a number"):
        read(path)  # (a report drew it as a raw TypeError)


def nap_after(upstream, seconds):
    time.sleep(seconds)
    return upstream


def test_a_call_queued_behind_another_is_journaled_from_when_it_ran(tmp_path):
    """The next hop of a chain waits on the worker behind the running one (forwarded):
    its line starts when it began to run, so timelines show run time, not queueing."""
    path = tmp_path / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
        x = 0
        for _ in range(3):
            x = rhapsody.task(nap_after)(x, 0.3)
        assert s.submit(x).result(timeout=60) == 0
    records = read(path)
    assert [r["outcome"] for r in records] == ["done"] * 3
    for r in records:
        assert 0.3 <= r["end"] - r["start"] < 0.55, r  # queued: it would be ~0.6 s


def test_runs_appended_to_one_log_are_told_apart_in_its_report(tmp_path):
    path = tmp_path / "run.jsonl"
    node = rhapsody.task(abs)(-1)
    for _ in range(2):  # as the same program run twice: the same node key
        with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
            s.submit(node).result(timeout=60)
    first, second = read(path)
    assert first["node"] == second["node"] and first["run"] != second["run"]
    page = tmp_path / "run.html"
    rhapsody.report(path, page)
    assert "2 runs: 2 nodes, 2 attempts (2 done)" in page.read_text()  # not "1 node"


def test_a_run_log_that_cannot_be_opened_leaves_the_backend_free_for_the_next_session(tmp_path):
    backend = rhapsody.LocalBackend(cpus=1)
    try:
        with pytest.raises(FileNotFoundError):
            rhapsody.Session(backends=[backend], run_log=tmp_path / "missing" / "run.jsonl")
        with rhapsody.Session(backends=[backend], progress=False) as s:  # was: "already
            assert s.compute(rhapsody.task(abs)(-3)) == (3,)           # belongs to a session"
    finally:
        backend.shutdown()
