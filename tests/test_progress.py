"""The progress display: counts per backend from the scheduler, drawn live by rich or as
plain lines, on a real session's work."""
import io
import re
import threading

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.progress import Progress, counts


def work(i):
    if i % 10 == 3:
        raise ValueError(i)
    return i


def gate(event_file):
    import os
    import time
    while not os.path.exists(event_file):  # held until the test lets it go
        time.sleep(0.01)
    return 1


def lanes(session):
    return session._scheduler.lanes.values()


def lane(session, name):
    return next(lane for lane in lanes(session) if lane.backend.name == name)


def test_counts_show_done_failed_running_and_waiting_per_backend(tmp_path):
    release = tmp_path / "go"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1, name="cpu"),
                                    rhapsody.LocalBackend(cpus=1, name="other")],
                          progress=False) as s:
        rhapsody.wait(s.submit([rhapsody.task(work)(i) for i in range(20)]), timeout=60)
        held = s.submit([rhapsody.task(gate).options(backend="other")(str(release))
                         for _ in range(3)])
        while not held[0].running():
            rhapsody.wait(held, timeout=0.05)
        cpu, other = lane(s, "cpu"), lane(s, "other")
        assert counts(cpu) == {"done": 18, "running": 0, "failed": 2, "waiting": 0, "total": 20}
        assert counts(other) == {"done": 0, "running": 1, "failed": 0, "waiting": 2, "total": 3}
        release.touch()
        rhapsody.wait(held, timeout=60)
        assert counts(other)["done"] == 3 and counts(other)["running"] == 0


def test_plain_lines_name_each_backend_with_counts_and_times():
    out = io.StringIO()
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, name="cpu")],
                          progress=False) as s:
        shown = Progress(lanes(s), "lines", out=out, interval=0.01)
        rhapsody.wait(s.submit([rhapsody.task(work)(i) for i in range(50)]), timeout=60)
        while not out.getvalue():
            threading.Event().wait(0.01)
        shown.stop()
    last = out.getvalue().splitlines()[-1]
    assert re.fullmatch(r"\[cpu\] 45/50 done, 0 running, 5 failed, 0 waiting; 0:\d\d elapsed",
                        last), last


def test_a_display_begun_on_a_busy_session_counts_only_what_came_after_it(tmp_path):
    """compute(progress=True) on a session that already ran: it showed the session's
    earlier nodes (and failures) as this call's."""
    out, release = io.StringIO(), tmp_path / "go"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, name="cpu")],
                          progress=False) as s:
        rhapsody.wait(s.submit([rhapsody.task(work)(i) for i in range(20)]), timeout=60)
        shown = Progress(lanes(s), "lines", out=out, interval=0.01)
        later = s.submit([rhapsody.task(work)(i) for i in range(4, 9)]
                         + [rhapsody.task(gate)(str(release))])
        while not out.getvalue():  # a line while the gate holds the run open
            threading.Event().wait(0.01)
        release.touch()
        rhapsody.wait(later, timeout=60)
        shown.stop()
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[cpu] 6/6 done, 0 running, 0 failed, 0 waiting"), last


def test_a_short_run_in_plain_lines_prints_nothing():
    out = io.StringIO()
    with rhapsody.Session(progress=False) as s:
        shown = Progress(lanes(s), "lines", out=out)  # the first line would come after 10 s
        s.compute(rhapsody.task(work)(1))
        shown.stop()
    assert out.getvalue() == ""


def test_plain_lines_go_to_stderr_and_leave_stdout_to_the_programs_own_output(capsys):
    with rhapsody.Session(progress=False) as s:
        shown = Progress(lanes(s), "lines", interval=0.01)  # no out=: where a user's goes
        s.compute(rhapsody.task(work)(1))
        for _ in range(6000):  # until a line was drawn (the run may end before the first)
            if shown._printed:
                break
            threading.Event().wait(0.01)
        shown.stop()
    seen = capsys.readouterr()
    assert seen.out == "" and re.search(r"\[local\] 1/1 done", seen.err), seen


def test_the_live_display_is_drawn_by_rich_with_a_bar_per_backend():
    pytest.importorskip("rich")
    out = io.StringIO()
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, name="cpu")],
                          progress=False) as s:
        shown = Progress(lanes(s), "live", out=out)
        rhapsody.wait(s.submit([rhapsody.task(work)(i) for i in range(30)]), timeout=60)
        shown.stop()
    assert shown.how == "live"
    assert re.search(r"cpu .*30/30 0 running, 3 failed, 0 waiting", out.getvalue()), out.getvalue()


def test_compute_with_progress_shows_the_calls_progress(capsys):
    with rhapsody.Session(progress=False) as s:
        assert s.compute([rhapsody.task(abs)(-i) for i in range(5)], progress=True) == (
            [0, 1, 2, 3, 4],)
    # stdout is not a terminal here: plain lines, none for a run this short
    assert capsys.readouterr().out == ""


def test_the_progress_example_draws_live_in_a_real_terminal():
    import os
    import pty
    import subprocess
    import sys
    pytest.importorskip("rich")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "progress.py")
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("CI", None)  # a user's terminal
    proc = subprocess.Popen([sys.executable, example], stdin=follower, stdout=follower,
                            stderr=follower, env=env)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the program ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")[-2000:]
    drawn = seen.decode(errors="replace")
    assert "\x1b[" in drawn  # drawn in place with terminal codes (rich's, not ours)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert re.search(r"cpu .*400/400 0 running, 4 failed, 0 waiting", text), text[-2000:]
    assert re.search(r"aux .*40/40 +0 running, 1 failed, 0 waiting", text)
    assert "best 399, 5 failed" in text
    assert not re.search(r"\d/100\b", text), "a first frame showed rich's default total"


def test_a_session_refuses_a_progress_that_is_not_true_false_or_none():
    # 0 or "no" turned the display on
    for bad in (0, "no"):
        with pytest.raises(TypeError, match="progress must be True, False or None"):
            rhapsody.Session(rhapsody.LocalBackend(cpus=1), progress=bad)
