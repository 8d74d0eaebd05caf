"""Journal keys: what makes a node a changed one (its defaults, the module's constants it
reads) and what must not (the hash seed a process drew for the order of a set)."""
import os
import subprocess
import sys

import pytest

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


def test_timeout_and_retry_policy_are_no_part_of_the_key_and_resources_are(tmp_path):
    """A resume with a longer timeout (the usual fix after a walltime) reran everything."""
    journal = Journal(tmp_path)
    before = journal.key(rhapsody.task(scaled, timeout=60)(10))
    policy = rhapsody.task(scaled, timeout=600, retries=2, backoff=1.0, retry_on=OSError,
                           backend="local")
    assert Journal(tmp_path).key(policy(10)) == before
    assert Journal(tmp_path).key(rhapsody.task(scaled, cpus=2)(10)) != before
    assert Journal(tmp_path).key(rhapsody.task(scaled, ranks=2)(10)) != before


def test_a_function_given_as_an_argument_and_an_ai_nodes_lambda_count_by_their_code(tmp_path):
    """Both used to count by a repr that no edit changes: a stale value on resume."""
    apply = rhapsody.task(lambda f, x: f(x), name="apply")

    def edited(before):
        def double(x):
            return x * 2 if before else x * 20
        return double
    keys = [Journal(tmp_path).key(apply(edited(flag), 1)) for flag in (True, True, False)]
    assert keys[0] == keys[1] != keys[2]

    rhapsody.model("m", url="http://127.0.0.1:1/v1")

    def capital(template):
        return rhapsody.ai(template, "France", model="m", parse=lambda s: s.strip())
    keys = [Journal(tmp_path).key(capital(t)) for t in ("Capital of {}?", "Capital of {}?",
                                                         "Largest city of {}?")]
    assert keys[0] == keys[1] != keys[2]


def is_even(n):
    return True if n == 0 else is_odd(n - 1)


def is_odd(n):
    return False if n == 0 else is_even(n - 1)


def test_a_functions_key_is_the_same_whatever_was_keyed_before_it(tmp_path):
    """Hashed inside is_even's hash, is_odd's hash stops at the cycle back to is_even:
    kept for the journal, it let an edit of is_even reuse stale values of is_odd nodes."""
    both = rhapsody.task(lambda f, g, n: (f(n), g(n)), name="both")
    alone = Journal(tmp_path / "a").key(rhapsody.task(is_odd)(3))
    journal = Journal(tmp_path / "b")
    journal.key(both(is_even, is_odd, 3))
    assert journal.key(rhapsody.task(is_odd)(3)) == alone


class Tagged(frozenset):
    pass


def test_a_set_subclass_counts_by_its_attributes_too(tmp_path):
    def tagged(tag):
        value = Tagged({"a", "b"})
        value.tag = tag
        return rhapsody.task(len)(value)
    assert Journal(tmp_path).key(tagged("t0")) != Journal(tmp_path).key(tagged("t1"))


KEY_OF = """
import collections, dataclasses, sys
import rhapsody_graph as rhapsody
from rhapsody_graph.journal import Journal

COLOURS = {"red", "green", "blue", "cyan", "teal"}


@dataclasses.dataclass
class Palette:
    colours: set


Pair = collections.namedtuple("Pair", "name colours")


class Tags(frozenset):  # a set's subclass is ordered too
    pass


@rhapsody.task
def count(colours, palette, pair, key=lambda c: c):  # a default pickle cannot take: its repr
    assert isinstance(palette, Palette) and "red" in {"red", "green", "blue", "cyan"}
    return len(colours)


mixed = {1, "one", (2, "two"), frozenset({"x", "y"})}  # items of several types
print(Journal(sys.argv[1]).key(count(COLOURS, Palette(COLOURS), Pair("p", [COLOURS, mixed,
                                                                          Tags(COLOURS)]))))
"""


def test_sets_at_any_depth_set_constants_and_a_lambda_default_have_one_key_in_every_process(
        tmp_path):
    """A set in an argument, in a dataclass or a namedtuple in one, a set constant in the
    code and a dataclass the function reads: none depends on the process's hash seed."""
    keys = set()
    for seed in ("1", "2", "3", "4"):  # the set's strings iterate in another order in each
        out = subprocess.run([sys.executable, "-c", KEY_OF, str(tmp_path)],
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": HERE},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        keys.add(out.stdout.strip())
    assert len(keys) == 1, keys  # (the lambda's address differs from process to process)


def run_program(tmp_path, source, *args):
    """Run ``source`` as a script with the journal ``tmp_path/journal`` and ``args``; return
    its output's words."""
    script = tmp_path / "program.py"
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "journal"), *args],
                         env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


RESUME = """
import sys

import pytest
import rhapsody_graph as rhapsody

def compute(*nodes):  # print each node's value (an executable's output) and attempts
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=sys.argv[1],
                          progress=False) as s:
        for fut in s.submit(list(nodes)):
            value = fut.result(timeout=60)
            print(getattr(value, "stdout", value), fut.where.attempts)  # 0: reused
"""

EXECUTABLE = RESUME + """
flag, cwd = sys.argv[2:]
up = rhapsody.task(str.upper, name="up")("v")
compute(rhapsody.executable(["sh", "-c", 'echo $0-$FLAG-$(pwd)', up], env={"FLAG": flag},
                            cwd=cwd))
"""


NOTEBOOK = """
import sys

import pytest
import rhapsody_graph as rhapsody

SCALE = 2


def scaled(x):
    return x * SCALE


if __name__ == "__main__":  # one session, two cells: a constant changed between them
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=sys.argv[1],
                          progress=False) as s:
        print(*s.compute(rhapsody.task(scaled)(5)))
        SCALE = 4
        print(*s.compute(rhapsody.task(scaled)(5)))
"""


def test_a_sessions_next_compute_sees_a_constant_changed_since_its_last(tmp_path):
    """The session's journal kept the function's hash for its lifetime: 10 for 20."""
    assert run_program(tmp_path, NOTEBOOK) == ["10", "20"]


def test_an_executable_with_an_upstream_node_in_its_argv_runs_again_when_env_or_cwd_change(
        tmp_path):
    def run(flag, cwd):
        return run_program(tmp_path, EXECUTABLE, flag, cwd)
    assert run("one", "/") == ["V-one-/", "1"]
    assert run("two", "/") == ["V-two-/", "1"]  # was the first run's value, reused
    assert run("two", str(tmp_path)) == [f"V-two-{tmp_path}", "1"]
    assert run("two", str(tmp_path)) == [f"V-two-{tmp_path}", "0"]  # unchanged: reused


BOUND = RESUME + """
import functools

def scaled(x, factor):
    return x * factor

class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

factor = int(sys.argv[2])
inner = functools.partial(scaled, factor=factor)
compute(rhapsody.task(functools.partial(scaled, factor=factor), name="partial")(10),
        rhapsody.task(functools.partial(inner), name="nested")(10),
        rhapsody.task(Scaler(factor), name="callable")(10))
"""


def test_a_partials_bound_arguments_and_a_callable_objects_state_are_in_its_key(tmp_path):
    assert run_program(tmp_path, BOUND, "2") == ["20", "1"] * 3
    assert run_program(tmp_path, BOUND, "3") == ["30", "1"] * 3  # the partials gave 20
    assert run_program(tmp_path, BOUND, "3") == ["30", "0"] * 3  # the object ran every time


METHOD = RESUME + """
class Model:
    def score(self, x):
        return x * FACTOR

def evaluate(x):
    return Model().score(x)

compute(rhapsody.task(evaluate)(1))
"""


def test_a_changed_method_of_a_class_the_function_uses_runs_the_node_again(tmp_path):
    assert run_program(tmp_path, METHOD.replace("FACTOR", "10")) == ["10", "1"]
    assert run_program(tmp_path, METHOD.replace("FACTOR", "100")) == ["100", "1"]  # was 10
    assert run_program(tmp_path, METHOD.replace("FACTOR", "100")) == ["100", "0"]


IMPORTED = RESUME + """
import importlib.util

def load(name, source):  # two plugins: one function body, different imported helpers
    path = sys.argv[1] + "-" + name + ".py"
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

plugin = "import rhapsody_graph as rhapsody\\nfrom math import {} as rounding\\n" \\
         "@rhapsody.task\\ndef rnd(x):\\n    return rounding(x)\\n"
compute(load("down", plugin.format("floor")).rnd(1.5), load("up", plugin.format("ceil")).rnd(1.5))
"""


def test_functions_alike_but_for_what_an_imported_name_stands_for_have_their_own_keys(
        tmp_path):
    """Both had one key: the resume gave floor's value for ceil's node too."""
    assert run_program(tmp_path, IMPORTED) == ["1", "1", "2", "1"]
    assert run_program(tmp_path, IMPORTED) == ["1", "0", "2", "0"]  # was 2 for floor's too


EDITED = RESUME + """
import dataclasses
import enum
import functools

class Mode(enum.Enum):
    FAST = 1

@dataclasses.dataclass
class Config:
    v: int

    def get(self):
        return self.v + 1

def traced(f):
    @functools.wraps(f)
    def wrapper(*a, **k):
        return f(*a, **k)
    return wrapper

class Model:
    offset = 0

    @traced
    def score(self, x, extra=0):
        return x + 1 + self.offset + extra

MODEL = Model()

def configured(cfg):
    return cfg.get()

def uses_class(cls, x):
    return cls().score(x)

def uses_enum(x):
    return x + Mode.FAST.value

def uses_object(x):
    return MODEL.score(x)

compute(rhapsody.task(configured)(Config(1)), rhapsody.task(uses_class)(Model, 1),
        rhapsody.task(uses_enum)(1), rhapsody.task(uses_object)(1))
"""


def test_an_edited_class_an_argument_holds_or_an_edited_enum_or_global_object_is_a_change(
        tmp_path):
    """An object or a class as an argument counted by its class's name only, and an
    enumeration member or a module's object the function reads not at all: stale
    values were reused after an edit."""
    assert run_program(tmp_path, EDITED) == ["2", "1"] * 4
    edited = EDITED.replace("+ 1", "+ 100").replace("FAST = 1", "FAST = 100")
    assert run_program(tmp_path, edited) == ["101", "1"] * 4  # was ["2", "0"] * 4
    assert run_program(tmp_path, edited) == ["101", "0"] * 4
    for change, value in ((("offset = 0", "offset = 5"), "106"),  # a class constant, and
                          (("extra=0", "extra=5"), "111")):       # a decorated method's default
        edited = edited.replace(*change)
        assert run_program(tmp_path, edited)[2:4] == [value, "1"], change


def test_a_class_written_in_a_program_read_from_stdin_counts_by_its_code(tmp_path):
    """Its methods' file is "<stdin>": taken for generated code, they were left out."""
    def run(source):
        out = subprocess.run([sys.executable, "-", str(tmp_path / "journal")], input=source,
                             env={**os.environ, "PYTHONPATH": HERE}, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    assert run(EDITED) == ["2", "1"] * 4
    assert run(EDITED.replace("+ 1", "+ 100")) == ["101", "1"] * 2 + ["2", "0", "101", "1"]



LIBRARY_AND_CYCLES = RESUME + """
import functools

import attr

def deco(f):
    @functools.wraps(f)
    def wrapper(*a, **k):
        return f(*a, **k)
    return wrapper

class Shape:
    def area(self):
        return 2

def _copy(self, kind=Shape):  # class -> method -> closure -> function -> default -> class
    return kind()

Shape.copy = deco(_copy)

@attr.s(frozen=True)  # its generated __hash__ holds a hash-seeded constant
class Point:
    x = attr.ib()

    def norm(self):
        return self.x

def measure(thing):
    return thing.area() if isinstance(thing, Shape) else thing.norm()

nodes = [rhapsody.task(measure)(Shape()), rhapsody.task(measure)(Point(3))]
if sys.argv[2:] == ["pandas"]:
    import pandas
    nodes.append(rhapsody.task(len)(pandas.DataFrame({"a": [1, 2, 3]})))
compute(*nodes)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", [[], ["pandas"]], ids=["own-classes", "pandas"])
def test_arguments_of_classes_with_cycles_generated_methods_or_of_libraries_are_reused(
        tmp_path, extra):
    """Hashing every non-standard class's code hung on a cycle through a closure (a
    pandas DataFrame) and keyed attrs classes by a hash-seeded constant (never reused)."""
    pytest.importorskip("attr")
    if extra:
        pytest.importorskip("pandas")
    first = run_program(tmp_path, LIBRARY_AND_CYCLES, *extra)
    assert first == ["2", "1", "3", "1"] + (["3", "1"] if extra else [])
    again = run_program(tmp_path, LIBRARY_AND_CYCLES, *extra)
    assert again == [w if i % 2 == 0 else "0" for i, w in enumerate(first)]

def weighted(options, values):
    return sum(values) * options.weight


def test_arguments_plain_pickle_cannot_take_key_by_their_state_not_their_repr(tmp_path):
    """Such arguments counted by a repr with addresses removed: two states, one key,
    and a stale value reused (a class defined in a function, a big array beside it)."""
    class Options:  # plain pickle cannot name it
        def __init__(self, weight):
            self.weight = weight

    first = rhapsody.compute(rhapsody.task(weighted)(Options(2), [1] * 5000), journal=tmp_path)
    other = rhapsody.compute(rhapsody.task(weighted)(Options(3), [1] * 5000), journal=tmp_path)
    middle = [1] * 5000
    middle[2500] = 2  # where a repr that elides the middle would not show it
    changed = rhapsody.compute(rhapsody.task(weighted)(Options(3), middle), journal=tmp_path)
    assert (first, other, changed) == ((10000,), (15000,), (15003,))


def test_a_node_whose_arguments_cannot_be_pickled_always_runs_and_so_do_its_dependents(
        tmp_path):
    import threading
    lock = threading.Lock()  # nor can cloudpickle: no key, never kept
    journal = Journal(tmp_path)
    node = rhapsody.task(scaled)(10)
    assert journal.key(node) is not None
    locked = rhapsody.task(lambda x, guard: x)(node, {"guard": lock})
    downstream = rhapsody.task(scaled)(locked)
    assert journal.key(locked) is None and journal.key(downstream) is None
    assert "never kept" in journal.explain(downstream)


_cached_helper = None  # set by the next test: a module's helper behind functools.cache


def test_a_changed_cached_helper_or_a_swapped_parameter_is_a_changed_node(tmp_path):
    import functools
    journal = Journal(tmp_path)

    def make(factor, swap):
        @functools.cache
        def helper(i):
            return factor * i
        globals()["_cached_helper"] = helper
        if swap:
            def affine(x, beta=1, alpha=2):
                return _cached_helper(x) * beta + alpha
        else:
            def affine(x, alpha=1, beta=2):
                return _cached_helper(x) * alpha + beta
        return rhapsody.task(affine, name="affine")(10, alpha=5)

    try:
        base = journal.key(make(2, False))
        journal.new_run()
        assert journal.key(make(100, False)) != base  # the helper behind functools.cache
        journal.new_run()
        assert journal.key(make(2, True)) != base  # alpha and beta swapped
    finally:
        globals()["_cached_helper"] = None


def test_a_simulated_run_keeps_nothing_in_the_journal_and_reuses_nothing(tmp_path):
    square = rhapsody.task(lambda x: x * x, name="square")
    simulated = rhapsody.SimulatedBackend(hosts=1, cpus=2, duration=1.0)
    with rhapsody.Session(backends=[simulated], journal=tmp_path) as s:
        assert s.compute([square(i) for i in range(3)]) == ([None, None, None],)
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=tmp_path) as s:
        assert s.compute([square(i) for i in range(3)]) == ([0, 1, 4],)


def test_an_ai_nodes_key_follows_its_models_declaration(tmp_path):
    """Only the model's name was in the key: pointed at another server or other weights,
    a resume gave the old model's answers."""
    journal = Journal(tmp_path)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"v1")
    keys = []
    for declare in (lambda: rhapsody.model("m", url="http://127.0.0.1:1/v1"),
                    lambda: rhapsody.model("m", url="http://127.0.0.1:2/v1"),
                    lambda: rhapsody.model("m", engine="llama_cpp", path=str(weights)),
                    lambda: weights.write_bytes(b"v2 bigger"),
                    lambda: rhapsody.model("m", engine="llama_cpp", path=str(weights),
                                           args=["--ctx", "64"])):
        declare()
        journal.new_run()
        keys.append(journal.key(rhapsody.ai("Which model are you?", model="m")))
    assert len(set(keys)) == 5 and None not in keys
    journal.new_run()
    assert journal.key(rhapsody.ai("hi", model="never-declared")) is None


def test_a_journal_path_that_cannot_be_one_says_so_and_explain_makes_no_folder(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in ("", a_file):
        with pytest.raises(ValueError, match="cannot be used as the journal's directory"):
            rhapsody.compute(rhapsody.task(abs)(-1), journal=bad)
    typo = tmp_path / "typo-dir"
    assert "there is no journal at" in rhapsody.explain(rhapsody.task(abs)(-1), typo)
    assert not typo.exists()


def test_graph_compute_takes_the_keywords_of_compute_a_journal_too(tmp_path):
    # was: TypeError: run() got an unexpected keyword argument 'journal'
    path = str(tmp_path / "ran")
    graph = rhapsody.Graph(rhapsody.task(append_x)(path))
    journal = str(tmp_path / "journal")
    assert graph.compute(journal=journal) == graph.compute(journal=journal)
    assert open(path).read() == "x", "the journal did not keep the value"


def append_x(path):
    with open(path, "a") as f:
        f.write("x")
    return path


def test_a_helper_a_constant_tuple_or_a_module_of_another_file_of_yours_changes_the_key(
        tmp_path, monkeypatch):
    # they were read by name only: a resume reused the value the old helper made
    import importlib
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helpers_k1.py").write_text("def h(x): return x + 1\n")
    (tmp_path / "cfg_k1.py").write_text("N = 1\n")
    (tmp_path / "user_k1.py").write_text(
        "import cfg_k1\nfrom helpers_k1 import h\nW = (1, 2)\n"
        "def f(x): return h(x) + cfg_k1.N + W[0]\n")
    import helpers_k1
    import user_k1

    def key():
        return Journal(tmp_path / "j").key(rhapsody.task(user_k1.f)(1))
    keys = [key()]
    (tmp_path / "helpers_k1.py").write_text("def h(x): return x + 4\n")
    importlib.reload(helpers_k1)
    importlib.reload(user_k1)
    keys.append(key())
    (tmp_path / "cfg_k1.py").write_text("N = 6\n")
    keys.append(key())
    (tmp_path / "user_k1.py").write_text(user_k1.__loader__.get_data(user_k1.__file__).decode()
                                         .replace("W = (1, 2)", "W = (3, 2)"))
    importlib.reload(user_k1)
    keys.append(key())
    assert len(set(keys)) == 4 and None not in keys


def chained_defaults(depth):
    """f0 .. f<depth>, each calling the one before and taking it as its default."""
    scope = {"__name__": "__main__"}  # the user's code: hashed by its code
    exec("def f0(x): return x\n" + "".join(
        f"def f{i}(x, g=f{i - 1}): return f{i - 1}(g(x))\n" for i in range(1, depth + 1)), scope)
    return scope[f"f{depth}"]


@pytest.mark.timeout(60)
def test_a_function_reached_down_many_paths_is_hashed_once_per_key(tmp_path):
    # each was hashed again down every path: 2**depth hashes (a Dask array's
    # functions never got a key)
    assert Journal(tmp_path).key(rhapsody.task(lambda f: 1)(chained_defaults(40)))


def test_explain_skips_a_why_file_that_is_not_a_record(tmp_path):
    # valid JSON, not an object: AttributeError
    journal = Journal(tmp_path)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "abc.why").write_text("[1, 2]")
    assert "runs" in journal.explain(rhapsody.task(abs)(-1))


def test_a_function_a_library_made_at_run_time_counts_by_its_code_a_librarys_own_by_name(
        tmp_path):
    # a generated function (gettext's plural rule) was keyed by its name alone: a resume
    # reused the value of another rule
    import gettext
    journal = Journal(tmp_path)
    apply = rhapsody.task(lambda fn, x: fn(x))
    one, other = gettext.c2py("n != 1"), gettext.c2py("n == 1")
    assert journal.key(apply(one, 1)) != journal.key(apply(other, 1))
    assert journal.key(apply(len, "ab")) == Journal(tmp_path).key(apply(len, "ab"))
