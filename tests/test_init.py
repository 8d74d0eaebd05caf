"""The package's lazy names: ``import rhapsody_graph`` loads almost nothing, and every
public name still resolves."""
import subprocess
import sys

import pytest

import rhapsody_graph as rhapsody


def _loaded_after(code: str) -> set:
    """The rhapsody_graph and heavy stdlib modules a fresh interpreter holds after ``code``."""
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_every_public_name_resolves_and_is_listed_by_dir():
    for name in rhapsody.__all__:
        assert getattr(rhapsody, name) is not None, name
    assert set(rhapsody.__all__) <= set(dir(rhapsody))


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no_such_thing"):
        rhapsody.no_such_thing


def test_importing_the_package_loads_no_scheduler_backend_or_pickler():
    loaded = _loaded_after("import rhapsody_graph")
    for heavy in ("rhapsody_graph.scheduler", "rhapsody_graph.session",
                  "rhapsody_graph.backends.local", "cloudpickle", "asyncio"):
        assert heavy not in loaded, heavy


def test_building_nodes_by_positional_calls_loads_neither_inspect_nor_dataclasses():
    loaded = _loaded_after("import rhapsody_graph as r\n"
                           "n = r.task(lambda x, y=1: x)(r.task(lambda: 7)(), [{3}, (4,)])")
    for heavy in ("inspect", "dataclasses"):
        assert heavy not in loaded, heavy


def test_a_worker_process_loads_no_scheduler_session_backend_or_cloudpickle():
    loaded = _loaded_after("import rhapsody_graph.backends.worker")
    for heavy in ("rhapsody_graph.scheduler", "rhapsody_graph.session", "rhapsody_graph.task",
                  "rhapsody_graph.backends.local", "rhapsody_graph.backends.dask", "asyncio",
                  "cloudpickle", "traceback"):  # pickle imports cloudpickle when a call needs it
        assert heavy not in loaded, heavy


def test_a_dask_collection_in_a_nodes_arguments_becomes_a_node_without_importing_interop_first():
    pytest.importorskip("dask")
    code = """
import dask, rhapsody_graph as rhapsody
@rhapsody.task
def double(x):
    return 2 * x
assert "rhapsody_graph.interop.dask" not in __import__("sys").modules
print(double(dask.delayed(sum)([1, 2, 3])).compute())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "12"


def test_the_lazy_table_and_the_type_checking_imports_name_the_same_things():
    import ast
    tree = ast.parse(open(rhapsody.__file__).read())
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and getattr(n.test, "id", None) == "TYPE_CHECKING")
    static = {alias.name: imp.module for imp in block.body for alias in imp.names}
    assert static == rhapsody._WHERE


def test_a_public_name_stays_itself_after_its_submodule_is_imported():
    code = """
import importlib, pkgutil, types, rhapsody_graph as rhapsody
for m in pkgutil.iter_modules(rhapsody.__path__):
    if m.name not in ("cli",):
        importlib.import_module("rhapsody_graph." + m.name)
bad = [n for n in rhapsody.__all__ if isinstance(getattr(rhapsody, n), types.ModuleType)]
print("modules:", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "modules: []"


def test_the_package_pickles_by_name_so_task_bodies_may_refer_to_it():
    import pickle
    import cloudpickle
    assert cloudpickle.loads(cloudpickle.dumps(rhapsody)) is rhapsody
    assert pickle.loads(pickle.dumps(rhapsody)) is rhapsody


def test_a_submodule_is_reached_as_an_attribute_and_a_missing_one_is_an_attribute_error():
    assert rhapsody.api.get_session is not None
    assert not hasattr(rhapsody, "no_such_module")
