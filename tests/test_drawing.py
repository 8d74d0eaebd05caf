"""Pictures of a graph: like nodes collapse into boxes with counts, boxes are coloured by
kind, and Graphviz draws them (the real ``dot`` where the machine has it)."""
import os
import re
import shutil

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.drawing import boxes


@rhapsody.task
def load(i):
    return i


@rhapsody.task
def clean(x):
    return x


@rhapsody.task(cpus=2)
def total(xs):
    return sum(xs)


def test_a_map_over_a_map_and_its_reduction_draw_as_three_boxes_with_counts():
    loaded = rhapsody.map(load, range(500))
    g = rhapsody.Graph(total(rhapsody.map(clean, loaded)))
    drawn, edges = boxes(g)
    assert [(b.name, b.count, b.request) for b in drawn] == [
        ("load", 500, "1 cpu"), ("clean", 500, "1 cpu"), ("total", 1, "2 cpus")]
    assert edges == {(0, 1): 500, (1, 2): 500}
    text = g.to_mermaid()
    assert 'b0["load ×500<br/>function · 1 cpu"]:::function' in text
    assert "b0 -->|500| b1" in text and "b1 -->|500| b2" in text


def test_boxes_are_coloured_by_kind_function_executable_job_and_ai():
    job = rhapsody.task(load).options(ranks=4, gpus=1)(1)
    run = rhapsody.executable(["echo", job])
    ask = rhapsody.ai("{}", run, model="smollm2")
    text = rhapsody.Graph(ask, load(2)).to_mermaid()
    kinds = re.findall(r'\["([^"]*)"\]:::(\w+)', text)
    assert ("load<br/>job · 1 cpu · 1 gpu · 4 ranks", "job") in kinds
    assert [k for _, k in kinds] == ["job", "executable", "ai", "function"]
    assert "model smollm2" in kinds[2][0]
    for kind in ("function", "executable", "job", "ai"):
        assert re.search(rf"classDef {kind} fill:#\w+", text)


def test_a_100000_node_chain_collapses_into_one_box_per_task():
    x = load(0)
    for _ in range(99_999):
        x = clean(x)
    drawn, edges = boxes(rhapsody.Graph(x))
    assert [(b.name, b.count) for b in drawn] == [("load", 1), ("clean", 99_999)]
    assert edges == {(0, 1): 1, (1, 1): 99_998}  # the chain: the box reads from itself


def test_visualize_without_dot_says_how_to_install_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a real search for `dot` that finds none
    with pytest.raises(RuntimeError, match=r"needs Graphviz's `dot`.*apt-get install graphviz"):
        rhapsody.Graph(total(rhapsody.map(load, range(3)))).visualize(tmp_path / "flow.svg")
    assert not (tmp_path / "flow.svg").exists()
    source = rhapsody.Graph(total([load(1)])).visualize(tmp_path / "flow.dot")
    assert 'label="total\n' in open(source).read()


def test_visualize_refuses_an_unknown_picture_format_naming_the_ones_it_draws(tmp_path):
    with pytest.raises(ValueError, match=r"unknown picture format 'bmp'; use one of .svg"):
        rhapsody.Graph(load(1)).visualize(tmp_path / "flow.bmp")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_visualize_draws_svg_and_png_with_graphviz(tmp_path):
    g = rhapsody.Graph(total(rhapsody.map(clean, rhapsody.map(load, range(20_000)))))
    svg = g.visualize(tmp_path / "flow.svg")
    text = open(svg).read()
    assert text.lstrip().startswith("<?xml") and "load ×20,000" in text and "20,000" in text
    assert text.count("<g id=\"node") == 3
    png = g.visualize(str(tmp_path / "flow.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000


def test_the_pictures_example_draws_its_workflow_and_prints_mermaid(tmp_path):
    import subprocess
    import sys
    out = tmp_path / ("flow.svg" if shutil.which("dot") else "flow.dot")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "pictures.py")
    run = subprocess.run([sys.executable, example, str(out)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"40,004 nodes drawn into {out}" in run.stdout
    assert 'b3["analyse<br/>job · 1 cpu · 4 ranks"]:::job' in run.stdout
    assert "simulate ×20,000" in out.read_text()


def test_a_backslash_in_a_task_name_is_drawn_as_written_not_read_as_an_escape(tmp_path):
    """Graphviz read ``\\N`` as the box's id and a trailing ``\\`` as a line join."""
    pytest.importorskip("graphviz")
    from rhapsody_graph.drawing import to_dot
    names = ["back\\slash", "ends\\", "\\N node"]
    g = rhapsody.Graph([rhapsody.task(abs).options(name=n)(-1) for n in names])
    source = to_dot(g).source
    assert all(n.replace("\\", "\\\\") + "\n" in source for n in names), source
    if shutil.which("dot"):
        svg = open(g.visualize(tmp_path / "flow.svg")).read()
        assert all(f">{n}</text>" in svg for n in names), svg
