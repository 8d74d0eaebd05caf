"""Journal keys: what makes a node a changed one (its defaults, the module's constants it
reads) and what must not (the hash seed a process drew for the order of a set)."""
import os
import subprocess
import sys

import rhapsody_graph as rhapsody
from rhapsody_graph.journal import Journal

SCALE = 2
HERE = os.path.dirname(os.path.dirname(os.path.abspath(rhapsody.__file__)))  # this package


def scaled(x, k=1):
    return x * k * SCALE


def test_a_changed_default_argument_value_is_a_changed_node(tmp_path):
    journal = Journal(tmp_path)
    before = journal.key(rhapsody.task(scaled)(10))

    def again(x, k=5):  # the same code, another default
        return x * k * SCALE
    assert journal.key(rhapsody.task(again, name="scaled")(10)) != before


def test_a_changed_module_constant_the_function_reads_is_a_changed_node(tmp_path,
                                                                         monkeypatch):
    journal = Journal(tmp_path)
    before = journal.key(rhapsody.task(scaled)(10))
    assert Journal(tmp_path).key(rhapsody.task(scaled)(10)) == before  # (the same again)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3)
    assert Journal(tmp_path).key(rhapsody.task(scaled)(10)) != before


KEY_OF = """
import sys
import rhapsody_graph as rhapsody
from rhapsody_graph.journal import Journal

@rhapsody.task
def count(colours, key=lambda c: c):  # a default that pickle cannot take: its repr
    return len(colours)

print(Journal(sys.argv[1]).key(count({"red", "green", "blue", "cyan", "teal"})))
"""


def test_a_set_argument_and_a_lambda_default_have_one_key_in_every_process(tmp_path):
    keys = set()
    for seed in ("1", "2", "3", "4"):  # the set's strings iterate in another order in each
        out = subprocess.run([sys.executable, "-c", KEY_OF, str(tmp_path)],
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": HERE},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        keys.add(out.stdout.strip())
    assert len(keys) == 1, keys  # (the lambda's address differs from process to process)
