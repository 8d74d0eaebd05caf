"""Reports of a run: an offline HTML page, a Chrome trace and a matplotlib timeline,
all from a real run's journal."""
import json
import re
import time

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.report import rows


def work(i):
    if i == 3:
        raise RuntimeError("node three broke")
    return i


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, gpus=2)], run_log=path) as s:
        plain = [rhapsody.task(work)(i) for i in range(6)]
        on_gpu = [rhapsody.task(work).options(gpus=1, name="train")(10 + i) for i in range(2)]
        rhapsody.wait(s.submit(plain + on_gpu), timeout=60)
    return path


def test_html_report_is_one_offline_page_with_timeline_utilisation_slowest_and_failures(
        journal, tmp_path):
    page = open(rhapsody.report(journal, tmp_path / "run.html")).read()
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert "8 nodes, 8 attempts (7 done, 1 failed)" in page
    for lane in ("cpu 0", "cpu 1", "gpu 0", "gpu 1"):
        assert re.search(rf"<text[^>]*>\S+ {lane}</text><text[^>]*>\d+%</text>", page)
    assert page.count("<rect") >= 8 + 2  # every attempt on its core, the trains on GPUs too
    assert "<h2>Slowest nodes</h2>" in page and "RuntimeError: node three broke" in page


def test_chrome_trace_has_an_event_per_attempt_and_row_it_held(journal, tmp_path):
    trace = json.load(open(rhapsody.report(journal, tmp_path / "trace.json")))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"cpu 0", "cpu 1", "gpu 0", "gpu 1"} <= names
    assert len([e for e in spans if e["name"] == "work"]) == 6
    assert len([e for e in spans if e["name"] == "train"]) == 4  # its core and its GPU
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in spans)


def test_timeline_png_is_drawn_with_matplotlib(journal, tmp_path):
    png = rhapsody.report(journal, tmp_path / "timeline.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rows_put_each_attempt_on_every_core_and_gpu_it_held():
    r = {"name": "x", "node": "x-1", "hosts": ["a", "b"], "cpus": [[0, 1], [2]],
         "gpus": [[3], []], "start": 0.0, "end": 1.0, "outcome": "done"}
    assert list(rows([r])) == [("a", "cpu 0"), ("a", "cpu 1"), ("a", "gpu 3"), ("b", "cpu 2")]


def test_an_unknown_report_type_is_refused_naming_the_ones_there_are(journal, tmp_path):
    with pytest.raises(ValueError, match=r"unknown report type '.txt'; use .html, .json"):
        rhapsody.report(journal, tmp_path / "run.txt")


def test_the_run_report_example_writes_page_trace_and_picture(tmp_path):
    import os
    import subprocess
    import sys
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "run_report.py")
    run = subprocess.run([sys.executable, example, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "28 nodes ran, 1 failed: simulation 13 diverged" in run.stdout
    for name in ("run.html", "trace.json", "timeline.png"):
        assert f"wrote {tmp_path / name}" in run.stdout and (tmp_path / name).stat().st_size
    assert "ValueError: simulation 13 diverged" in (tmp_path / "run.html").read_text()


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_runs_appended_to_one_log_leave_the_gap_between_them_out_of_timeline_and_utilisation(
        tmp_path):
    log = tmp_path / "run.jsonl"
    for run in range(2):  # each keeps both cores busy; the second starts 2 s after the first
        if run:
            time.sleep(2)
        with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], run_log=log,
                              progress=False) as s:
            s.compute([rhapsody.task(nap)(0.4) for _ in range(4)])
    page = open(rhapsody.report(log, tmp_path / "run.html")).read()
    uses = [int(u) for u in re.findall(r">(\d+)%</text>", page)]
    assert len(uses) == 2 and min(uses) >= 70, uses  # the gap counted: about 40 %
    assert re.search(r"[\d.]+ s of running; the 2\.\d+ s between runs are left out", page)
    assert page.count('stroke-dasharray="4 3"') == 1  # where the gap is left out


def test_a_node_killed_by_its_timeout_is_among_the_failures_and_a_cancelled_one_is_not(
        tmp_path):
    """The Failures table listed failed and died attempts only: a timeout was missing."""
    log = tmp_path / "run.jsonl"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], run_log=log,
                          progress=False) as s:
        slow = s.submit(rhapsody.task(nap, name="slow").options(timeout=0.3)(30))
        held = s.submit(rhapsody.task(nap, name="held")(30))
        with pytest.raises(rhapsody.NodeTimeoutError):
            slow.result(timeout=60)
        assert held.cancel()
    page = open(rhapsody.report(log, tmp_path / "run.html")).read()
    failures = page.split("<h2>Failures</h2>")[1]
    assert "NodeTimeoutError" in failures and ">slow<" in failures
    assert ">held<" not in failures
