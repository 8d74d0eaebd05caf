"""rhapsody_graph.get as a Dask scheduler: Dask's collections and graphs give exactly
the values and exceptions of Dask's own synchronous scheduler (real dask, real
worker processes)."""
import operator
import subprocess
import sys

import pytest

import rhapsody_graph as rhapsody

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")

pytestmark = pytest.mark.timeout(180)


def same(*collections):
    """The values on rhapsody.get and on Dask's synchronous scheduler."""
    return (dask.compute(*collections, scheduler=rhapsody.get),
            dask.compute(*collections, scheduler="sync"))


def test_array_reduction_and_matrix_product_match_dask():
    x = da.random.RandomState(42).random_sample((300, 300), chunks=(100, 100))
    ours, theirs = same((x @ x.T).mean(), x.sum(axis=0)[:5], x.std())
    assert float(ours[0]) == float(theirs[0]) and float(ours[2]) == float(theirs[2])
    assert list(ours[1]) == list(theirs[1])


def test_bag_map_filter_and_fold_match_dask():
    b = db.from_sequence(range(1000), npartitions=7)
    ours, theirs = same(b.map(operator.mul, 3).filter(lambda v: v % 2).fold(operator.add),
                        b.frequencies())
    assert ours[0] == theirs[0] and sorted(ours[1]) == sorted(theirs[1])


def test_delayed_graphs_with_nested_calls_and_containers_match_dask():
    parts = [dask.delayed(operator.add)(i, 1) for i in range(10)]
    total = dask.delayed(sum)(parts)
    shaped = dask.delayed(dict)(a=parts[0], b=[parts[1], (parts[2], 7)])
    ours, theirs = same(total, shaped, parts)
    assert ours == theirs == (55, {"a": 1, "b": [2, (3, 7)]}, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])


def test_a_legacy_graph_with_aliases_literals_and_nested_keys_matches_dask():
    dsk = {"a": 1, "b": (operator.add, "a", 10), "c": "b", "d": (sum, ["a", "c", 5]),
           "e": (max, [(min, "d", 100), "a"])}
    keys = ["e", ["c", "a"], "d"]
    assert rhapsody.get(dsk, keys) == dask.get(dsk, keys) == (17, (11, 1), 17)
    assert rhapsody.get(dsk, "c") == 11


def test_delayed_calls_run_only_what_the_keys_need_with_and_without_delayed_fusion():
    # rhapsody.get skips Dask's delayed optimizer (a quadratic cull) and culls as it
    # walks from the keys: a call no key needs must not run, fused or not
    from dask.delayed import Delayed
    needed = dask.delayed(operator.add)(dask.delayed(operator.mul)(2, 3), 1)
    both = dask.delayed(operator.add)(needed, dask.delayed(operator.truediv)(1, 0))
    partial = Delayed(needed.key, both.dask)  # its graph holds the 1/0 call, its key not
    assert same(partial, [partial, 5]) == ((7, [7, 5]), (7, [7, 5]))
    with dask.config.set({"optimization.fuse.delayed": True}):
        assert same(partial) == ((7,), (7,))


def test_a_failing_task_raises_its_own_exception_with_its_remote_traceback():
    bad = dask.delayed(operator.truediv)(1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        dask.compute(dask.delayed(sum)([bad, 1]), scheduler=rhapsody.get)
    assert isinstance(info.value.__cause__, rhapsody.RemoteTraceback)


def test_config_set_scheduler_and_num_workers_are_honoured():
    x = da.arange(1000, chunks=100)
    with dask.config.set(scheduler=rhapsody.get):
        assert int(x.sum().compute()) == 499500
    assert dask.compute(x.max(), scheduler=rhapsody.get, num_workers=1) == (999,)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 1, got 0"):
        dask.compute(x.max(), scheduler=rhapsody.get, num_workers=0)


def test_a_dataframe_groupby_matches_dask():
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    frame = pd.DataFrame({"k": [i % 5 for i in range(200)], "v": range(200)})
    df = dd.from_pandas(frame, npartitions=4)
    ours, theirs = same(df.groupby("k").v.sum(), df.v.mean())
    assert ours[0].sort_index().tolist() == theirs[0].sort_index().tolist()
    assert ours[1] == theirs[1]


SCRIPT = """
import dask
import rhapsody_graph as rhapsody

def double(v):
    return 2 * v

@rhapsody.task
def apply(f, x):
    return f(x)

if __name__ == "__main__":
    print(dask.compute(dask.delayed(double)(4), scheduler=rhapsody.get)[0], apply(double, 5).compute())
"""


def test_functions_of_the_drivers_script_reach_the_workers_as_arguments_too(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["8", "10"], out.stderr[-2000:]


def test_delayed_objects_and_collections_feed_our_nodes_anywhere_in_their_arguments():
    d = dask.delayed(sum)([1, 2, 3])
    x = da.arange(10, chunks=5)
    pair = rhapsody.task(lambda a, b=None: (a, b))
    assert pair(d).compute() == (6, None)
    first, rest = pair([d, (x.sum(), 1)], b={"array": x}).compute()
    assert first == [6, (45, 1)] and list(rest["array"]) == list(range(10))
    bag = db.from_sequence(range(5), npartitions=2).map(operator.neg)
    assert pair(bag).compute() == ([0, -1, -2, -3, -4], None)


def draw(log):
    """A random number, and a line in ``log`` for each run."""
    import random
    with open(log, "a") as f:
        f.write("ran\n")
    return random.random()


def test_a_dask_task_two_inputs_share_runs_once_and_both_get_its_one_value(tmp_path):
    log = str(tmp_path / "runs")
    x = dask.delayed(draw)(log)
    left, right = dask.delayed(float)(x), dask.delayed(float)(x)
    same_value = rhapsody.task(lambda a, b, c, d: a == b == c == d[0])
    node = same_value(left, right, x, [x])
    assert len(node.deps) == 3  # left, right and x: x passed twice is one edge
    assert node.compute() is True
    assert open(log).read().split() == ["ran"]  # as dask.compute(left, right) runs it


def test_compute_and_submit_of_a_dask_collection_give_its_value():
    total = dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(4)])
    assert rhapsody.compute(total, {"array": da.arange(4, chunks=2).sum()}) == (6, {"array": 6})
    with rhapsody.Session(progress=False) as s:
        assert s.submit(total).result(timeout=60) == 6


class NoDaskArrays:
    """Has Dask's collection methods, yet is no collection now (as an xarray object
    holding numpy arrays): a plain value."""

    def __init__(self, values):
        self.values = values

    def __dask_graph__(self):
        return None


def test_an_object_with_dasks_methods_that_is_no_collection_is_a_plain_argument():
    assert rhapsody.task(lambda t: t.values)(NoDaskArrays([1, 2])).compute() == [1, 2]


def test_a_key_named_again_for_another_task_is_another_node():
    first = dask.delayed(sum)([1, 2], dask_key_name="total")
    held = rhapsody.task(float)(first)  # keeps the first task's node alive
    second = dask.delayed(sum)([3, 4], dask_key_name="total")
    assert rhapsody.compute(held, rhapsody.task(float)(second)) == (3.0, 7.0)


def test_a_cyclic_graph_or_a_key_the_graph_lacks_is_refused_before_anything_runs():
    # a cycle walked for ever (memory growing); a missing key was a bare KeyError
    from dask._task_spec import List, Task, TaskRef
    with pytest.raises(ValueError, match="the Dask graph has a cycle through key 'a'"):
        rhapsody.get({"a": (sum, ["b"]), "b": (sum, ["a"])}, "a")
    with pytest.raises(ValueError, match=r"Dask key 'b' \(needed by 'a'\) is not in the graph: "
                                         "a result held on a distributed cluster"):
        rhapsody.get({"a": Task("a", sum, List(TaskRef("b"), 1))}, "a")
    with pytest.raises(ValueError, match=r"Dask key 'm' \(needed by 'a'\)"):  # not by 'b'
        rhapsody.get({"a": Task("a", operator.add, TaskRef("b"), TaskRef("m")),
                      "b": Task("b", abs, -1)}, "a")


KEYS = """
import dask.array as da
from rhapsody_graph.interop.dask import as_node
from rhapsody_graph.journal import Journal
print(Journal(__import__("tempfile").mkdtemp()).key(as_node(da.ones((40, 40), chunks=(10, 10)).sum())))
"""


def test_a_dask_arrays_journal_key_is_the_same_whatever_the_hash_seed():
    # its tasks' inputs went into the key in set order: a resume ran it all again
    keys = {subprocess.run([sys.executable, "-c", KEYS], capture_output=True, text=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed},
                           timeout=120, check=True).stdout for seed in ("1", "2", "3")}
    assert len(keys) == 1 and keys != {"None\n"}, keys
