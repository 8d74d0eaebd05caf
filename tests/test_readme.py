"""The README's two commands: CI runs the same test command, and the example runs."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_quick_start_is_exactly_two_commands_and_ci_runs_the_second():
    install_and_run, install_and_test = readme_commands()[:2]
    assert "examples/" in install_and_run and "pip install" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == install_and_test


def test_quickstart_example_runs_and_prints_where_each_node_ran():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    evaluate = [line for line in out.splitlines() if line.startswith("evaluate(")]
    assert len(evaluate) == 4
    gpus = sorted(re.search(r"CUDA_VISIBLE_DEVICES='(\d)'", line).group(1) for line in evaluate)
    assert gpus == ["0", "1", "2", "3"]  # map(gpus="all") spread over the 4 declared GPUs
    assert re.search(r"train .* cores=\[\d, \d\] CUDA_VISIBLE_DEVICES='\d,\d'", out)
    assert "executable     stdout='model mean is" in out
