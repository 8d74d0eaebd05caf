"""The ``rhapsody-graph`` command line, run as a user runs it (the installed console script)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.reaper import NONE_LEFT, left_behind, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=120):
    exe = shutil.which("rhapsody-graph")
    assert exe, 'the console script is missing: pip install ".[test]" installs it'
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_works_for_every_command():
    for args in ([], ["info"], ["run"], ["visualize"], ["report"]):
        out = cli(*args, "--help")
        assert out.returncode == 0 and "usage: rhapsody-graph" in out.stdout, out.stderr


def test_info_shows_this_hosts_cores_and_what_is_installed_with_versions():
    found = json.loads(cli("info", "--json").stdout)
    assert found["cores"] == sorted(os.sched_getaffinity(0))
    dask = found["components"]["Dask backend"]
    assert dask["package"] == "distributed" and dask["version"]  # the test extra installs it
    vllm = found["components"]["vLLM inference"]
    assert vllm["version"] or vllm["install"] == "pip install vllm"
    text = cli("info").stdout
    assert f"{len(found['cores'])} cores" in text and "Dragon backend: dragonhpc" in text


def test_run_gives_the_script_its_arguments_default_backend_and_exit_code(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        import rhapsody_graph as rhapsody
        fut = rhapsody.submit(rhapsody.task(abs)(-5))
        print("value", fut.result(timeout=60), "on", fut.where.backend, "args", sys.argv[1:])
        sys.exit(3)
    """))
    out = cli("run", str(script), "--", "a", "--b")
    assert out.returncode == 3, out.stderr
    assert "value 5 on local args ['a', '--b']" in out.stdout


def test_run_of_a_script_that_raises_prints_its_traceback_and_exits_1(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("raise KeyError('no such sample')\n")
    out = cli("run", str(script))
    assert out.returncode == 1 and "KeyError: 'no such sample'" in out.stderr
    missing = cli("run", str(tmp_path / "absent.py"))
    assert missing.returncode == 2 and "no such script" in missing.stderr


def test_run_of_a_script_that_exits_with_a_message_prints_it_and_exits_1(tmp_path):
    script = tmp_path / "fatal.py"
    script.write_text("import sys\nsys.exit('fatal: input missing')\n")
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=60)
    out = cli("run", str(script))
    assert (out.returncode, out.stderr) == (plain.returncode, plain.stderr) == (
        1, "fatal: input missing\n")


def test_visualize_draws_a_scripts_graph_and_names_what_is_wrong(tmp_path):
    out_file = tmp_path / ("flow.svg" if shutil.which("dot") else "flow.dot")
    out = cli("visualize", "examples/pictures.py:workflow", str(out_file))
    assert out.returncode == 0, out.stderr
    assert "40,004 nodes drawn" in out.stdout and "simulate ×20,000" in out_file.read_text()
    wrong = cli("visualize", "examples/pictures.py:nothing", str(out_file))
    assert wrong.returncode == 2 and "examples/pictures.py has no 'nothing'; graphs, nodes " \
        "and functions there: workflow" in wrong.stderr  # was "none": a function is a target
    shape = cli("visualize", "examples/pictures.py", str(out_file))
    assert shape.returncode == 2 and "give SCRIPT:NAME" in shape.stderr
    script = tmp_path / "flow.py"
    script.write_text("width = 5\n")
    no_node = cli("visualize", f"{script}:width", str(out_file))
    assert no_node.returncode == 2 and "flow.py:width holds no node: 5" in no_node.stderr


def test_visualize_refuses_a_task_for_name_and_a_max_boxes_below_one_as_usage_errors(tmp_path):
    script = tmp_path / "flow.py"
    script.write_text("import rhapsody_graph as rhapsody\n\n@rhapsody.task\n"
                      "def inc(x):\n    return x + 1\n\nnode = inc(1)\n")
    task = cli("visualize", f"{script}:inc", str(tmp_path / "flow.dot"))
    assert task.returncode == 2 and task.stderr.count("\n") == 1, task.stderr  # no traceback
    assert "flow.py:inc is a task (calling it makes a node): NAME must hold nodes" in task.stderr
    for boxes in ("0", "-1"):
        out = cli("visualize", f"{script}:node", str(tmp_path / "flow.dot"), "--max-boxes", boxes)
        assert out.returncode == 2 and "--max-boxes: must be a whole number above 0" in out.stderr
    assert not (tmp_path / "flow.dot").exists()


def test_visualize_of_a_script_that_raises_prints_its_traceback_and_exits_1(tmp_path):
    """A ValueError or OSError while the script loaded came out as one line, without
    the script's file and line; a function needing arguments, as a CLI traceback."""
    script = tmp_path / "flow.py"
    script.write_text("import json\nsettings = json.loads('{bad}')\n")
    out = cli("visualize", f"{script}:graph", str(tmp_path / "flow.dot"))
    assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr
    assert 'flow.py", line 2' in out.stderr and "JSONDecodeError" in out.stderr
    script.write_text("def needs(n):\n    return []\n")
    out = cli("visualize", f"{script}:needs", str(tmp_path / "flow.dot"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "flow.py:needs cannot be called without arguments" in out.stderr


def test_visualize_of_a_script_that_exits_while_loaded_says_so_and_exits_2(tmp_path):
    """It exited 0 and drew nothing, without a word."""
    script = tmp_path / "flow.py"
    script.write_text("import sys\nimport rhapsody_graph as rhapsody\n"
                      "graph = rhapsody.task(abs)(-1)\nsys.exit(0)\n")
    out = cli("visualize", f"{script}:graph", str(tmp_path / "flow.dot"))
    assert out.returncode == 2 and "flow.py exited (sys.exit(0)) while it was loaded, so " \
        "'graph' was not drawn" in out.stderr, out.stderr
    assert not (tmp_path / "flow.dot").exists()

def test_report_writes_the_page_of_a_run_journal(tmp_path):
    journal = tmp_path / "run.jsonl"
    code = ("import rhapsody_graph as r\n"
            f"with r.Session(run_log={str(journal)!r}) as s: s.submit(r.task(abs)(-1)).result()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    out = cli("report", str(journal), str(tmp_path / "run.html"))
    assert out.returncode == 0 and "1 node, 1 attempt (1 done)" in (tmp_path / "run.html").read_text()
    missing = cli("report", str(tmp_path / "none.jsonl"), str(tmp_path / "x.html"))
    assert missing.returncode == 2 and "no such run journal" in missing.stderr
    bad = cli("report", str(journal), str(tmp_path / "x.txt"))
    assert bad.returncode == 1 and "unknown report type" in bad.stderr
    other = tmp_path / "other.jsonl"
    other.write_text('{"node": "a"}\n')
    wrong = cli("report", str(other), str(tmp_path / "y.html"))
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1  # one line, no traceback
    assert "other.jsonl, line 1: not a record of a run journal" in wrong.stderr
    assert not (tmp_path / "y.html").exists()


def test_report_refuses_an_empty_log_and_a_sparse_record_in_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sparse = tmp_path / "sparse.jsonl"  # what read() took, and report's KeyError followed
    sparse.write_text('{"node": "n", "name": "x", "start": 1, "end": 2, "outcome": "done"}\n')
    for log, why in ((empty, "empty.jsonl: not a run journal (Session(run_log=...)): it is empty"),
                     (sparse, "sparse.jsonl, line 1: not a record of a run journal "
                              "(Session(run_log=...)): no 'backend', 'host', 'attempt'")):
        out = cli("report", str(log), str(tmp_path / "x.html"))
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and why in out.stderr, out
    assert not (tmp_path / "x.html").exists()


@pytest.mark.timeout(300)
def test_run_with_backend_dragon_runs_the_script_under_the_launcher(tmp_path):
    script = tmp_path / "on_dragon.py"
    script.write_text(textwrap.dedent("""
        import rhapsody_graph as rhapsody
        fut = rhapsody.submit(rhapsody.task(abs)(-7))
        print("value", fut.result(timeout=120), "on", fut.where.backend)
    """))
    code, output = run([shutil.which("rhapsody-graph"), "run", "--backend", "dragon",
                        str(script)], 5, 280, cwd=ROOT)  # what the run leaves: found by pid
    assert code == 0 and "value 7 on dragon" in output, output
    assert left_behind(output) == NONE_LEFT
