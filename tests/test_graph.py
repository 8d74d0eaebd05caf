"""Node and Graph: edges in nested containers, keys, order, merging outputs."""
import dataclasses
from collections import deque

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.graph import Graph


@rhapsody.task
def inc(x):
    return x + 1


@rhapsody.task
def collect(*args, **kwargs):
    return args, kwargs


def test_edges_are_found_in_args_kwargs_and_nested_containers():
    a, b, c, d, e = (inc(i) for i in range(5))
    n = collect([a, (b,)], {"k": {c}}, key={"deep": [frozenset([d])]}, other=e)
    assert set(n.deps) == {a, b, c, d, e}
    args, kwargs = n.compute()
    assert args == ([1, (2,)], {"k": {3}})
    assert kwargs == {"key": {"deep": [frozenset([4])]}, "other": 5}


def test_dict_keys_that_are_nodes_are_edges_too():
    k = inc(1)
    n = collect({k: "v"})
    assert n.deps == (k,)
    assert n.compute() == (({2: "v"},), {})


def test_keys_are_readable_distinct_and_deterministic_across_processes():
    import subprocess
    import sys
    nodes = [inc(1), inc(1)]
    assert nodes[0].key != nodes[1].key  # two calls are two nodes
    assert all(n.key.startswith("inc-") and len(n.key) == len("inc-") + 12 for n in nodes)
    prog = ("import rhapsody_graph as r\n"
            "f = r.task(lambda x: x, name='f')\n"
            "print([f(i).key for i in range(3)])")
    runs = {subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(runs) == 1


def test_graph_is_inspectable_and_iterates_in_a_valid_order():
    a = inc(1)
    b = inc(a)
    c = collect(a, b)
    g = Graph(c)
    assert len(g) == 3
    order = list(g)
    assert order.index(a) < order.index(b) < order.index(c)
    assert g.dependencies(c) == (a, b)
    assert set(g.dependents(a)) == {b, c}
    assert g[b.key] is b and a in g


def test_many_outputs_merge_into_one_graph_and_shared_nodes_run_once(tmp_path):
    @rhapsody.task
    def touch(path):
        with open(path, "a") as f:
            f.write("x")
        return 1

    shared = touch(str(tmp_path / "count"))
    outs = [inc(shared) for _ in range(5)]
    g = Graph(*outs, shared)
    assert len(g) == 6
    assert g.compute() == (2, 2, 2, 2, 2, 1)
    assert (tmp_path / "count").read_text() == "x"


def test_compute_returns_the_shape_of_its_outputs():
    t = collect(inc(1))
    assert rhapsody.compute([inc(1), {"a": inc(2)}], 7) == ([2, {"a": 3}], 7)
    assert rhapsody.Graph(t).compute() == ((2,), {})


def test_ten_thousand_deep_chain_builds_orders_and_runs_without_recursion_error():
    x = inc(0)
    for _ in range(9999):
        x = inc(x)
    g = Graph(x)
    assert len(g) == 10000
    assert g.compute() == 10000


def test_issue_example_total_of_incs():
    total = rhapsody.task(sum)
    t = total([inc(i) for i in range(10)])
    assert t.compute() == 55
    assert rhapsody.compute(t, inc(1)) == (55, 2)
    assert rhapsody.Graph(t).compute() == 55


def test_compute_keeps_dict_subclasses_of_its_outputs():
    from collections import OrderedDict, defaultdict
    out = rhapsody.compute(defaultdict(list, {"x": inc(1)}), OrderedDict(y=inc(2)))
    assert out[0] == {"x": 2} and out[0].default_factory is list
    assert type(out[1]) is OrderedDict and out[1] == {"y": 3}
    from collections import Counter
    counted, = rhapsody.compute(Counter(a=inc(1), b=inc(2)))
    assert type(counted) is Counter and counted == {"a": 2, "b": 3}  # not {("a", 2): 1}


@dataclasses.dataclass(frozen=True)
class Pair:
    left: object
    right: object = None


def test_a_node_inside_a_dataclass_or_deque_is_refused_saying_to_pass_it_as_an_argument():
    """They are not searched (a large dataset object passed to many nodes would be walked
    for each), so the node is no edge: the refusal must say what to do."""
    for hidden in (Pair(inc(1)), deque([inc(2)])):
        with pytest.raises(TypeError, match="cannot be pickled: pass it as an argument"):
            collect(hidden).compute()



def test_a_node_has_no_truth_value_so_a_branch_on_it_is_refused_not_always_taken():
    """``if is_bad(5):`` was always taken (a node is an object): Dask refuses it too."""
    with pytest.raises(TypeError, match="has no truth value until it has run: branch on its "
                                        r"value \(node.compute\(\)"):
        if inc(-1):
            pass


def return_a_node():
    return inc(1)


def test_a_task_that_returns_a_node_is_told_to_return_plain_data_or_its_value():
    with pytest.raises(TypeError, match="a task cannot return a node: return plain data"):
        rhapsody.task(return_a_node)().compute()

def test_a_built_node_cannot_be_edited_into_a_cycle():
    a = inc(1)
    b = inc(a)
    with pytest.raises(AttributeError, match="cannot be changed .'deps'.; build a new one"):
        a.deps = (b,)
    assert a.deps == () and b.deps == (a,)


@pytest.mark.timeout(60)  # the walk for edges went round a container holding itself for ever
def test_an_argument_holding_itself_reaches_the_node_and_an_output_holding_itself_is_refused():
    looped = [inc(1), 2]
    looped.append(looped)
    node = rhapsody.task(lambda items: (items[0], items[2] is items))(looped)
    assert node.deps == (looped[0],)
    assert node.compute() == (2, True)  # pickled with its loop, as pickle keeps it
    out = {"value": inc(1)}
    out["self"] = out
    with pytest.raises(TypeError, match="an output holds itself"):
        rhapsody.compute(out)


@pytest.mark.timeout(60)  # it was quadratic: minutes for 50,000 arguments
def test_many_positional_node_arguments_build_in_linear_time():
    nodes = [inc(i) for i in range(50_000)]
    joined = rhapsody.task(lambda *xs: len(xs))(*nodes, nodes[0])
    assert len(joined.deps) == 50_000 and joined.deps[0] is nodes[0]
