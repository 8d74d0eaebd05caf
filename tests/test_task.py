"""@task, .options, executable and map: validation at decoration and call time."""
import asyncio
import re

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.api import get_backend
from rhapsody_graph.graph import Node


def inc(x):
    return x + 1


def test_bare_and_parametrised_decorators_build_nodes_without_running():
    calls = []

    @rhapsody.task
    def f(x):
        calls.append(x)
        return x

    @rhapsody.task(cpus=2, gpus=1, ranks=1, memory="1GB", timeout=5, retries=1, name="g")
    def g(x):
        calls.append(x)
        return x

    assert isinstance(f(1), Node) and isinstance(g(1), Node)
    assert calls == []
    r = g.opts.resources
    assert (r.cpus, r.gpus, r.memory) == (2, 1, 2**30)
    assert (g.opts.timeout, g.opts.retries, g.opts.name) == (5.0, 1, "g")
    assert g(1).key.startswith("g-")
    assert g.func(3) == 3  # the plain function is still there


def test_options_overrides_per_call_and_keeps_the_rest():
    t = rhapsody.task(cpus=1, retries=2)(inc)
    t2 = t.options(cpus=2)
    assert t2.opts.resources.cpus == 2 and t2.opts.retries == 2
    assert t.opts.resources.cpus == 1


def test_host_host_id_and_version_none_undo_the_tasks_own_as_if_left_out():
    pinned = rhapsody.task(host="n0", version="2")(inc)
    assert (pinned.opts.resources.host, pinned.opts.resources.placement) == ("n0", "host_name")
    freed = pinned.options(host=None, version=None)
    assert freed.opts.values == {} and freed.opts.resources.placement == "default"
    assert freed.opts.resources.host is None
    assert rhapsody.task(host_id=3)(inc).options(host_id=None).opts.resources.host_id is None
    assert rhapsody.task(host=None, host_id=None, version=None)(inc).opts.values == {}


def test_gpu_is_an_alias_of_gpus_and_both_at_once_is_an_error():
    assert rhapsody.task(gpu=2)(inc).opts.resources.gpus == 2
    with pytest.raises(ValueError, match="not both"):
        rhapsody.task(gpu=1, gpus=1)(inc)


@pytest.mark.parametrize("options, error, text", [
    ({"cpu": 1}, TypeError, "unknown option 'cpu' .did you mean 'cpus'"),
    ({"cpus": -1}, ValueError, "'cpus' must be >= 0, got -1"),
    ({"gpus": 1.5}, TypeError, "'gpus' must be an integer >= 0, got 1.5"),
    ({"ranks": 0}, ValueError, "'ranks' must be >= 1, got 0"),
    ({"timeout": -3}, ValueError, "'timeout' must be a finite number of seconds > 0"),
    ({"timeout": float("inf")}, ValueError, "leave it out for no timeout"),
    ({"name": ""}, ValueError, "'name' must not be empty"),
    ({"memory": "lots"}, ValueError, "'memory' must be bytes or a size"),
    ({"backend": ""}, ValueError, "'backend' must not be empty"),  # names: the session's
    ({"backend": 3}, TypeError, "'backend' must be a string"),
    ({"distribution": "scatter"}, ValueError, "'distribution' must be one of"),
    ({"cpus": True}, TypeError, "'cpus' must be an integer"),
])
def test_bad_options_are_refused_at_decoration_naming_the_value(options, error, text):
    with pytest.raises(error, match=text):
        rhapsody.task(**options)(inc)


def test_a_backend_instance_given_as_the_backend_option_is_refused_saying_where_it_goes():
    with rhapsody.LocalBackend(cpus=1) as backend:
        with pytest.raises(TypeError, match=r"^inc: option 'backend' names a backend .*got the "
                                            r"backend .*pass it to compute\(\.\.\., backend=it\)"):
            rhapsody.map(inc, [1], backend=backend)


class Model:
    def __init__(self, x):
        self.x = x

    def options(self):  # a name Task has too
        return {}


def test_a_class_with_attributes_of_tasks_names_is_a_task_whose_own_methods_work():
    made = rhapsody.task(Model)
    assert made.options.__self__ is made  # before: Model.options, copied onto the task
    (model,) = rhapsody.compute(rhapsody.map(Model, [7], cpus=1))
    assert type(model[0]).__name__ == "Model" and model[0].x == 7


def test_an_unknown_default_backend_names_the_value_and_its_variable(monkeypatch):
    monkeypatch.setenv("RHAPSODY_GRAPH_BACKEND", "Local")
    with pytest.raises(ValueError, match=r"backend 'Local' \(\$RHAPSODY_GRAPH_BACKEND\) is no "
                                         r"default backend; name one of 'local'"):
        get_backend()


class Scaler:
    def __init__(self, scale):
        self.scale = scale

    @rhapsody.task(cpus=1)
    def times(self, x):
        return self.scale * x


def test_a_task_in_a_class_body_binds_to_its_instance_as_a_method_does():
    s = Scaler(2)
    node = s.times(3)
    assert node.args[0] is s and node.compute() == 6
    assert Scaler.times(s, 4).compute() == 8  # through the class: the instance passed


def test_a_partial_task_is_named_after_the_function_it_wraps():
    import functools
    node = rhapsody.task(functools.partial(inc, 1))()
    assert node.name == "inc" and node.key.startswith("inc-")


def test_bad_options_name_the_function_in_options_call():
    t = rhapsody.task(inc)
    with pytest.raises(ValueError, match=r"^inc: option 'cpus' must be >= 0, got -2"):
        t.options(cpus=-2)


class BrokenRepr:
    """A value whose ``repr`` raises, as a half-built object's can."""

    def __repr__(self):
        raise RuntimeError("repr is broken")


@pytest.mark.parametrize("options, text", [
    ({"cpus": BrokenRepr()}, r"^inc: option 'cpus' must be an integer >= 0, got <BrokenRepr "
                             r"instance at 0x[0-9a-f]+> \(BrokenRepr\)$"),
    ({"timeout": BrokenRepr()}, r"'timeout' must be a number of seconds, got <BrokenRepr"),
    ({"memory": "lots" * 100_000}, r"'memory' must be bytes or a size like '4GB', got 'lotslots"),
    ({"cpu_affinity": list(range(-1, 100_000))}, r"ids >= 0, got \[-1, 0, 1, 2, 3, 4, \.\.\.\]$"),
    ({"gpu_affinity": [0] * 100_000}, r"'gpu_affinity' lists an id twice: \[0, 0, 0, 0, 0, 0, \.\.\.\]$"),
])
def test_a_bad_option_value_is_named_briefly_even_when_its_repr_fails_or_is_huge(options, text):
    with pytest.raises((TypeError, ValueError), match=text) as caught:
        rhapsody.task(**options)(inc)
    assert len(str(caught.value)) < 400


def test_executable_validates_its_arguments():
    with pytest.raises(TypeError, match="non-empty list"):
        rhapsody.executable("echo hi")
    with pytest.raises(TypeError, match="env must map str to str"):
        rhapsody.executable(["echo"], env={"A": 1})
    with pytest.raises(TypeError, match=r"executable 'echo': env must map str to str, got \["):
        rhapsody.executable(["echo"], env=["A=1"])
    with pytest.raises(TypeError, match=r"executable 'echo': cwd must be a path "
                                        r"\(str or os.PathLike\), got 5"):
        rhapsody.executable(["echo"], cwd=5)
    with pytest.raises(TypeError, match=r"inc: process_template cwd must be a path"):
        rhapsody.task(process_template={"cwd": 5})(inc)
    with pytest.raises(ValueError, match="'cpus' must be >= 0"):
        rhapsody.executable(["echo"], cpus=-1)


async def double_later(x):
    await asyncio.sleep(0)
    return 2 * x


@pytest.mark.parametrize("argv, env, text", [
    (["echo", "a\0b"], None, "argument 1 'a\\x00b' holds a null byte"),
    (["echo"], {"A": "a\0b"}, "env 'A': a variable's name must be non-empty"),
    (["echo"], {"A=B": "x"}, "env 'A=B': a variable's name must be non-empty without '='"),
    (["echo"], {"": "x"}, "env '': a variable's name must be non-empty"),
])
def test_an_argument_or_variable_no_program_can_take_is_refused_where_written(argv, env, text):
    with pytest.raises(ValueError, match=re.escape(f"executable 'echo': {text}")):
        rhapsody.executable(argv, env=env)


@pytest.mark.parametrize("arg", [None, [1, 2], {"a": 1}, object()])
def test_an_argument_that_cannot_become_text_is_refused_where_written(arg):
    # it was refused at submission only, failing the whole batch (a compat ComputeTask
    # made with it passed its validation)
    with pytest.raises(TypeError, match=r"executable 'echo': argument 1 must be text, a number, "
                                        r"a path, a node or a future; got"):
        rhapsody.executable(["echo", arg])


def test_an_async_def_task_is_awaited_in_its_worker_and_gives_its_value():
    assert rhapsody.compute(rhapsody.task(double_later)(21),
                            rhapsody.map(double_later, [1, 2])) == (42, [2, 4])


def test_a_call_the_function_cannot_take_is_refused_when_the_node_is_built():
    @rhapsody.task(cpus=1)
    def scale(x, factor=2, *, offset=0):
        return x * factor + offset

    upstream = scale(1)
    for args, kwargs, text in [((), {}, "missing a required argument: 'x'"),
                               ((1, 2, 3), {}, "too many positional arguments"),
                               ((upstream,), {"ofset": 1},
                                "got an unexpected keyword argument 'ofset'"),
                               ((1,), {"x": 1}, "multiple values for argument 'x'")]:
        with pytest.raises(TypeError, match="scale\\(x, factor=2, \\*, offset=0\\): " + text):
            scale(*args, **kwargs)
        with pytest.raises(TypeError, match=text):  # the copies options() makes, and map
            scale.options(cpus=2)(*args, **kwargs)
    with pytest.raises(TypeError, match="too many positional arguments"):
        rhapsody.map(scale, [1], [2], [3])
    method = rhapsody.task(Node.compute)  # a bound method's self is not counted, *args is
    assert rhapsody.task(upstream.compute)() is not None
    assert method is not None and rhapsody.task(print)(1, 2, 3, sep="") is not None
    assert rhapsody.compute(scale(1, offset=1), scale(x=2, factor=3)) == (3, 6)


def test_only_a_plain_functions_own_signature_is_checked_never_a_declared_one():
    """A class, a builtin or a __signature__ may describe less than the callable takes:
    a pydantic model takes unknown keywords and aliases; a decorator may set the
    signature of what it wraps and take more. Such calls are never refused."""
    import functools
    import inspect

    def strict(a):
        return a

    def lenient(*args, **kwargs):
        return args, kwargs
    lenient.__signature__ = inspect.signature(strict)  # says less than it takes

    class Model:
        __signature__ = inspect.signature(strict)

        def __init__(self, **fields):
            self.fields = fields

    @functools.wraps(strict)
    def wrapper(*args, **kwargs):  # wraps: a __wrapped__ with a stricter signature
        return strict(*args[:1])
    def method_like(self, x=1):
        return self, x
    assert isinstance(rhapsody.task(method_like)(self=3), Node)  # Task.__call__'s own self
    for call in (lambda: rhapsody.task(lenient)(1, extra=2),
                 lambda: rhapsody.task(Model)(a=1, comment="kept"),
                 lambda: rhapsody.task(wrapper)(1, 2, z=3), lambda: rhapsody.task(max)(3, 4)):
        assert isinstance(call(), Node)


def test_map_makes_one_node_per_item_for_plain_and_decorated_functions():
    nodes = rhapsody.map(inc, range(5))
    assert len(nodes) == 5 and all(isinstance(n, Node) for n in nodes)
    decorated = rhapsody.task(cpus=2)(inc)
    nodes = rhapsody.map(decorated, range(3), gpus="all")
    assert all(n.opts.resources.gpus == 1 and n.opts.resources.cpus == 2 for n in nodes)
    assert [n.compute() for n in rhapsody.map(inc, range(3))] == [1, 2, 3]


def test_map_over_several_iterables_zips_them():
    nodes = rhapsody.map(lambda a, b: a * b, [1, 2, 3], [4, 5, 6])
    assert rhapsody.compute(nodes) == ([4, 10, 18],)


def test_map_with_a_gpus_word_other_than_all_says_which_words_it_takes():
    with pytest.raises(ValueError, match='gpus= takes "all" .* got \'All\''):
        rhapsody.map(inc, [1], gpus="All")



def test_map_with_a_keyword_for_the_function_says_to_map_a_partial_and_a_typo_gets_a_guess():
    """A Dask user's client.map(f, xs, y=10) got "unknown option 'y'" and a list of options."""
    def add(x, y=0):
        return x + y
    with pytest.raises(TypeError, match=r"'y' is no option; .*map functools.partial\(add, y=...\)"):
        rhapsody.map(add, [1], y=10)
    with pytest.raises(TypeError, match=r"'cpu' is no option \(did you mean 'cpus'\?\); .*"
                                        r"functools.partial\(add, cpu=...\)"):
        rhapsody.map(add, [1], cpu=1)
    with pytest.raises(TypeError, match=r"'hostname' is no option \(did you mean 'name'\?\);"
                                        r" .*functools.partial\(add, hostname=...\)"):
        rhapsody.map(add, [1], hostname="a")  # a keyword of the function: was a guess only

def test_map_with_both_gpus_and_its_alias_gpu_says_to_give_one():
    # 'gpu="all"' with gpus=1 said "option 'gpu' must be an integer, got 'all'"
    for kwargs in ({"gpu": "all", "gpus": 1}, {"gpus": "all", "gpu": 2}):
        with pytest.raises(ValueError, match="give gpus= or its alias gpu=, not both"):
            rhapsody.map(inc, [1], **kwargs)
    with pytest.raises(ValueError, match='gpus= takes "all" .* got \'ALL\''):
        rhapsody.map(inc, [1], gpu="ALL")  # as gpus="ALL" (was a TypeError)
    assert rhapsody.map(inc, [1], gpu="all")[0].opts.resources.gpus == 1


def test_gpu_alias_overrides_a_stored_gpus_in_options_and_map():
    t = rhapsody.task(gpus=1)(inc)
    assert t.options(gpu=2).opts.resources.gpus == 2
    assert rhapsody.map(t, [1], gpu=3)[0].opts.resources.gpus == 3


def test_placement_vocabulary_of_the_seed_is_accepted_and_normalised():
    t = rhapsody.task(lambda: 0)
    assert t.opts.resources.placement == "default"
    assert t.options(cpus=1).opts.resources.placement == "host_name"
    assert t.options(host_id=3).opts.resources.placement == "host_id"
    assert t.options(placement="ANYWHERE").opts.resources.placement == "anywhere"
    assert t.options(ranks=2, distribution="ROUNDROBIN").opts.resources.distribution == "round_robin"
    r = t.options(cpu_affinity=[0, 2], gpu_affinity=[1]).opts.resources
    assert (r.cpus, r.gpus, r.cpu_ids, r.gpu_ids) == (2, 1, (0, 2), (1,))


def test_bad_placement_options_name_the_option_and_value():
    t = rhapsody.task(lambda: 0)
    with pytest.raises(ValueError, match="'placement' must be one of .*got 'somewhere'"):
        t.options(placement="somewhere")
    with pytest.raises(TypeError, match="'cpu_affinity' must be a non-empty list of ids"):
        t.options(cpu_affinity=[-1])
    with pytest.raises(ValueError, match="lists an id twice"):
        t.options(gpu_affinity=[1, 1])
    with pytest.raises(ValueError, match=r"cpus=3 does not match cpu_affinity=\[0\]"):
        t.options(cpus=3, cpu_affinity=[0])
    with pytest.raises(TypeError, match="does not take 'target'"):
        t.options(process_template={"target": "x"})
    with pytest.raises(TypeError, match="must be a dragon.infrastructure.policy.Policy"):
        t.options(policy="HOST_NAME")


def test_process_templates_set_the_rank_count_and_must_agree_with_ranks():
    t = rhapsody.task(lambda: 0)
    groups = [(2, {"env": {"ROLE": "a"}}), (1, {"env": {"ROLE": "b"}})]
    assert t.options(process_templates=groups).opts.resources.ranks == 3
    with pytest.raises(ValueError, match="ranks=2 does not match process_templates"):
        t.options(ranks=2, process_templates=groups)


def _policy(**kw):
    from dragon.infrastructure.policy import Policy
    return Policy(placement=Policy.Placement.HOST_NAME, host_name="n0", **kw)


def test_a_policy_inside_process_template_is_the_nodes_policy():
    t = rhapsody.task(lambda: 0)
    inside = t.options(process_template={"policy": _policy(cpu_affinity=[1]), "cwd": "/tmp"}).opts
    given = t.options(policy=_policy(cpu_affinity=[1]), process_template={"cwd": "/tmp"}).opts
    assert inside.resources == given.resources
    assert (inside.resources.host, inside.resources.cpu_ids) == ("n0", (1,))
    with pytest.raises(ValueError, match="give the Dragon policy once"):
        t.options(policy=_policy(), process_template={"policy": _policy()})
    with pytest.raises(TypeError, match="'process_templates policy' must be a dragon"):
        t.options(process_templates=[(1, {"policy": "cores 0-3"})])


def test_each_group_of_ranks_shares_what_its_own_policy_pins_reserved_once():
    t = rhapsody.task(lambda: 0)
    groups = [(2, {"policy": _policy(cpu_affinity=[0, 1, 2, 3])}),
              (2, {"policy": _policy(cpu_affinity=[4, 5, 6], gpu_affinity=[0])}),
              (1, {"env": {"ROLE": "plain"}})]
    res = t.options(process_templates=groups).opts.resources
    assert res.ranks == 5
    assert [(r.host, r.cpu_ids, r.gpu_ids, r.cpus, r.gpus) for r in res.per_rank] == [
        ("n0", (0, 1, 2, 3), None, 4, 0), ("n0", (), None, 0, 0),
        ("n0", (4, 5, 6), (0,), 3, 1), ("n0", (), (), 0, 0),
        (None, None, None, 1, 0)]
    ledger = rhapsody.Ledger(rhapsody.Inventory([rhapsody.Host("n0", cpus=8, gpus=2)]))
    placed = ledger.allocate_ranks(res)
    assert [(p.cpus, p.gpus) for p in placed] == [
        ((0, 1, 2, 3), ()), ((), ()), ((4, 5, 6), (0,)), ((), ()), ((7,), ())]
    for p in placed:
        ledger.release(p)
    assert ledger.idle()
    with pytest.raises(rhapsody.UnsatisfiableError, match="rank 2 of 5 .*cpu_affinity=\\[4, 5, 6\\]"):
        rhapsody.Inventory([rhapsody.Host("n0", cpus=4)]).check(res, "node 'job'")


def test_numpy_numbers_are_taken_as_counts_and_seconds():
    np = pytest.importorskip("numpy")  # counts computed with numpy were refused
    t = rhapsody.task(cpus=np.int64(2), gpus=np.int32(0), retries=np.int64(1),
                      timeout=np.float32(1.5))(inc)
    res = t(1).opts.resources
    assert (res.cpus, res.gpus, type(res.cpus)) == (2, 0, int)
    assert t(1).opts.timeout == 1.5
    assert rhapsody.map(inc, [1], gpus=np.int64(1))[0].opts.resources.gpus == 1
    with pytest.raises(TypeError, match="must be an integer"):
        rhapsody.task(cpus=np.float64(2.0))(inc)
