"""Futures against real worker processes: waiting, ordering, asyncio, callbacks,
futures as inputs, a graph that grows while it runs, cancellation that really stops
work (checked by pid), and the driver's memory under a long futures loop."""
import asyncio
import concurrent.futures as cf
import gc
import os
import resource
import sys
import threading
import time

import pytest

import rhapsody_graph as rhapsody

from .test_scheduler import alive, fail_now, lines, still_alive, wait_for_files


# -- task bodies (module level: sent by reference) ---------------------------------------

def inc(x):
    return x + 1


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def hold(path, seconds=60):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


def hold_rank(directory):
    hold(os.path.join(directory, "rank" + os.environ["RANK"]))


def megabyte(i):
    return bytes(1 << 20)


def mark(path, *_):
    with open(path, "w") as f:
        f.write("ran")
    return path


def _rebuild_fails():
    raise RuntimeError("cannot rebuild here")


class Unloadable:
    def __reduce__(self):  # pickles in the worker; loading it in the driver raises
        return (_rebuild_fails, ())


@pytest.fixture
def session():
    backend = rhapsody.LocalBackend(cpus=2)
    with rhapsody.Session(backends=[backend]) as s:
        yield s


# -- waiting ------------------------------------------------------------------------------

def test_submit_returns_at_once_and_result_waits_for_the_value(session):
    t0 = time.monotonic()
    fut = session.submit(rhapsody.task(nap)(1.0, "late"))
    assert time.monotonic() - t0 < 0.5 and not fut.done()
    with pytest.raises(TimeoutError, match=f"node {fut.key!r} did not finish within 0.05 s "
                                           r"\((running|not started yet)\); it goes on"):
        fut.result(timeout=0.05)
    assert fut.result(timeout=60) == "late" and fut.done() and fut.exception() is None


def released(path):
    """Return once ``path`` exists (the test creates it when it has seen what it needs)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "slow"


def test_as_completed_yields_futures_in_the_order_they_finish(session, tmp_path):
    release = tmp_path / "release"  # the slow one ends only after the fast one was yielded
    slow = session.submit(rhapsody.task(released)(str(release)))
    fast = session.submit(rhapsody.task(nap)(0.0, "fast"))
    order = []
    for f in rhapsody.as_completed([slow, fast], timeout=60):
        order.append(f.result())
        release.touch()
    assert order == ["fast", "slow"]


def test_as_completed_takes_other_futures_too_and_a_timeout_leaves_no_waiter_behind(session):
    slow = session.submit(rhapsody.task(nap)(30, "slow"))
    with cf.ThreadPoolExecutor(1) as pool:
        other = pool.submit(inc, 1)
        fast = session.submit(rhapsody.task(inc)(2))
        assert fast.result(timeout=60) == 3 and other.result(timeout=60) == 2  # done first:
        seen = []  # the timeout below then only ever meets the slow one, however busy the box
        with pytest.raises(TimeoutError, match=r"1 \(of 3\) futures unfinished"):
            for f in rhapsody.as_completed([slow, other, fast, fast], timeout=2):
                seen.append(f.result())
    assert sorted(seen) == [2, 3] and not slow._waiters
    assert slow.cancel() and slow.cancelled()


def test_single_submissions_from_two_threads_each_get_their_own_values(session):
    step = rhapsody.task(inc)
    results = {}

    def work(k):
        futures = [session.submit(step(k + i)) for i in range(300)]
        results[k] = sorted(f.result() for f in rhapsody.as_completed(futures, timeout=60))
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: [k + i + 1 for i in range(300)] for k in (0, 1000)}
    node = step(1)  # submitted twice: one record, two futures
    first, second = session.submit(node), session.submit(node)
    assert first is not second and first.result(timeout=60) == second.result(timeout=60) == 2


def test_wait_first_completed_returns_the_finished_future_only(session):
    slow = session.submit(rhapsody.task(nap)(30, "slow"))
    fast = session.submit(rhapsody.task(nap)(0.0, "fast"))
    done, not_done = rhapsody.wait([slow, fast], timeout=60, return_when=rhapsody.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert slow.cancel() and slow.cancelled()


def test_what_is_not_a_future_is_refused_by_as_completed_and_wait_and_a_future_by_graph(
        session):
    with pytest.raises(TypeError, match="as_completed\\(\\) takes futures, got 1"):
        rhapsody.as_completed([1])
    with pytest.raises(TypeError, match="wait\\(\\) takes futures, got <Node inc-"):
        rhapsody.wait([rhapsody.task(inc)(1)])  # was: AttributeError '_condition'
    fut = session.submit(rhapsody.task(inc)(1))
    with pytest.raises(TypeError, match="Graph\\(\\) takes nodes, got <Future inc-.*compute"
                                        "\\(\\) takes futures"):
        rhapsody.Graph(fut)
    assert fut.result(timeout=60) == 2

def test_a_timeout_of_centuries_waits_instead_of_raising_overflow_error(session):
    # a lock takes at most threading.TIMEOUT_MAX: 1e12 s raised OverflowError
    pending = [session.submit(rhapsody.task(nap)(0.2, i)) for i in range(3)]
    assert pending[0].result(timeout=1e12) == 0
    assert len(rhapsody.wait(pending[1:2], timeout=1e12).done) == 1
    assert [f.result() for f in rhapsody.as_completed(pending[2:], timeout=1e12)] == [2]



def test_wait_and_a_with_block_wait_for_what_done_callbacks_submit_into_that_session():
    # wait() returned (and the block's close() cancelled the rest) before the scheduler
    # took a callback's submit; at the block's exit, rhapsody.submit() went to a new
    # default session
    follow = []

    def next_step(fut):
        if len(follow) < 5:
            follow.append(rhapsody.submit(rhapsody.task(nap)(0.05, fut)))
            follow[-1].add_done_callback(next_step)
    backend = rhapsody.LocalBackend(cpus=1, name="mine")
    with rhapsody.Session(backends=[backend], progress=False) as s:
        first = s.submit(rhapsody.task(inc)(1))
        first.add_done_callback(next_step)
        s.wait()
        assert len(follow) == 5 and all(f.done() for f in follow)
        follow.clear()
        first.add_done_callback(next_step)  # it has finished: called now, here
    assert len(follow) == 5
    assert [f.result() for f in follow] == [2] * 5
    assert {f.backend for f in follow} == {"mine"}



def test_a_future_of_a_node_already_running_for_a_compute_says_when_it_ran(session,
                                                                          tmp_path):
    # its where.start and .end were 0.0: the attempt was not timed without a future
    started = tmp_path / "started"
    node = rhapsody.task(hold)(str(started), 0.5)
    computing = threading.Thread(target=session.compute, args=(node,))
    before = time.time()
    computing.start()
    wait_for_files([str(started)], 60)
    fut = session.submit(node)  # attached to the record the compute() runs
    assert fut.result(timeout=60) == "finished"
    computing.join(60)
    where = fut.where
    assert before < where.start < where.end <= time.time()
    assert 0.4 < where.seconds < 30


def test_futures_work_with_the_standard_library_wait(session):
    futures = session.submit(*[rhapsody.task(inc)(i) for i in range(5)])
    done, not_done = cf.wait(futures, timeout=60)
    assert not not_done and sorted(f.result() for f in done) == [1, 2, 3, 4, 5]


def test_setting_a_futures_result_or_exception_is_refused_and_its_node_still_ends_it(session):
    # it raised AttributeError from the lock, and left the future finished with the
    # user's value (the node's own value was dropped)
    fut = session.submit(rhapsody.task(nap)(0.2, "node's"))
    with pytest.raises(RuntimeError, match="only its session sets its result"):
        fut.set_result(5)
    with pytest.raises(RuntimeError, match="only its session sets its exception"):
        fut.set_exception(ValueError())
    assert fut.result(timeout=60) == "node's"


def test_await_a_future_and_gather_them_from_asyncio_without_blocking_the_loop(session):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        t = asyncio.ensure_future(ticker())
        one = await session.submit(rhapsody.task(nap)(0.5, 7))
        many = await asyncio.gather(*session.submit(*[rhapsody.task(inc)(i) for i in range(3)]))
        t.cancel()
        return one, many, ticks
    one, many, ticks = asyncio.run(main())
    assert one == 7 and many == [1, 2, 3]
    assert ticks >= 10, "the event loop was blocked while the node ran"


def test_done_callbacks_run_once_with_the_future(session):
    seen = []
    event = threading.Event()
    fut = session.submit(rhapsody.task(inc)(1))

    def callback(f):
        seen.append(f.result())
        event.set()
    fut.add_done_callback(callback)
    assert event.wait(60) and seen == [2]
    fut.add_done_callback(lambda f: seen.append("late"))  # already done: runs now
    assert seen == [2, "late"]


def test_a_failed_node_raises_its_own_error_with_the_remote_traceback_from_result(session):
    def broken(x):
        return {}[x]
    fut = session.submit(rhapsody.task(broken)("missing"))
    with pytest.raises(KeyError) as info:
        fut.result(timeout=60)
    assert isinstance(fut.exception(), KeyError)
    tb = str(info.value.__cause__)
    assert "broken" in tb
    assert f'File "{__file__}"' in tb and "return {}[x]" in tb  # its file and source line
    # a dependent submitted later fails with the same error, and never runs
    dependent = session.submit(rhapsody.task(inc)(fut))
    with pytest.raises(KeyError):
        dependent.result(timeout=60)



def test_done_callbacks_run_on_futures_nobody_keeps(session):
    seen, all_seen = [], threading.Event()

    def note(fut):
        seen.append(fut.result())
        if len(seen) == 5:
            all_seen.set()
    for i in range(5):
        session.submit(rhapsody.task(inc)(i)).add_done_callback(note)  # not kept
    gc.collect()  # before: the futures went, and their callbacks with them
    assert all_seen.wait(60) and sorted(seen) == [1, 2, 3, 4, 5]
    assert not session._kept  # the session let them go once they ended


def test_waiting_or_closing_in_a_done_callback_raises_instead_of_hanging_the_session(session):
    errors, called = [], threading.Event()
    other = session.submit(rhapsody.task(nap)(30))

    def follow_up(fut):
        for wait in (lambda: session.compute(rhapsody.task(inc)(fut.result())),
                     lambda: session.submit(rhapsody.task(nap)(30)).result(),
                     lambda: rhapsody.wait([other]),
                     lambda: list(rhapsody.as_completed([other])),
                     session.wait,  # it returned at once, having waited for nothing
                     session.close):
            try:
                wait()
            except RuntimeError as exc:
                errors.append(str(exc))
        called.set()
    session.submit(rhapsody.task(inc)(1)).add_done_callback(follow_up)
    assert called.wait(60)
    assert "compute() in a done-callback" in errors[0]
    assert all("would wait for ever" in e for e in errors[1:5]), errors
    assert "close() (or a backend's shutdown()) in a done-callback" in errors[5]
    session.cancel()  # the naps: they hold both cores
    assert session.submit(rhapsody.task(inc)(5)).result(timeout=60) == 6  # it goes on


def test_a_done_callback_raising_system_exit_is_logged_and_the_session_goes_on(session, caplog):
    fut = session.submit(rhapsody.task(inc)(1))
    fut.add_done_callback(lambda f: sys.exit(3))
    assert fut.result(timeout=60) == 2
    waited = threading.Thread(target=session.wait, daemon=True)
    waited.start()
    waited.join(60)
    assert not waited.is_alive(), "Session.wait() hung on the node whose callback raised"
    assert session.submit(rhapsody.task(inc)(5)).result(timeout=60) == 6
    assert "exception calling callback" in caplog.text and "SystemExit: 3" in caplog.text


def count_run(path, seconds=0.0):
    with open(path, "a") as f:
        f.write("x")
    time.sleep(seconds)
    return path


def use(x, k):
    return k


def test_a_node_submitted_twice_before_the_scheduler_took_it_runs_once(session, tmp_path):
    for i in range(10):
        node = rhapsody.task(count_run)(str(tmp_path / f"twice{i}"))
        a, b = session.submit(node), session.submit(node)  # back to back: one record
        assert a.result(timeout=60) == b.result(timeout=60)
        shared = rhapsody.task(count_run)(str(tmp_path / f"shared{i}"), 0.01)
        one = session.submit(rhapsody.task(use)(shared, 1))
        two = session.submit(rhapsody.task(use)(shared, 2))
        assert (one.result(timeout=60), two.result(timeout=60)) == (1, 2)
    runs = [len((tmp_path / f"{kind}{i}").read_text()) for kind in ("twice", "shared")
            for i in range(10)]
    assert runs == [1] * 20


def test_submitting_while_another_thread_closes_gives_futures_that_all_end():
    for _ in range(5):
        s = rhapsody.Session(rhapsody.LocalBackend(cpus=1), progress=False)
        got, first, refused = [], threading.Event(), threading.Event()

        def submitter():
            while True:
                try:
                    got.extend(s.submit([rhapsody.task(inc)(i) for i in range(500)]))
                except RuntimeError:  # "this session is closed"
                    refused.set()
                    return
                first.set()
        th = threading.Thread(target=submitter)
        th.start()
        assert first.wait(60)
        s.close()
        th.join(60)
        assert refused.is_set()
        _, not_done = cf.wait(got, timeout=60)
        assert not not_done, f"{len(not_done)} of {len(got)} futures never ended"


@pytest.mark.parametrize("on_error", ["raise", "wait"])
def test_a_future_on_a_node_of_a_failing_compute_still_gets_its_value(tmp_path, on_error):
    started, go = tmp_path / "started", tmp_path / "go"
    slow = rhapsody.task(hold)(str(started), 1)
    raised = []

    def computing():
        try:
            s.compute(rhapsody.task(fail_now)(str(go)), slow, on_error=on_error)
        except ValueError as exc:
            raised.append(exc)
    with rhapsody.Session(rhapsody.LocalBackend(cpus=2), progress=False) as s:
        th = threading.Thread(target=computing)
        th.start()
        wait_for_files([started], 60)
        fut = s.submit(slow)  # the compute's running node: this future waits for it too
        go.write_text("")  # now the compute's other node fails
        th.join(60)
        assert raised and "failed at once" in str(raised[0])
        assert fut.result(timeout=60) == "finished"  # not cancelled with the compute's nodes


@pytest.mark.parametrize("reducer", ["python's", "tblib's"])
def test_each_compute_on_a_failed_future_notes_only_its_own_outputs_not_computed(session,
                                                                                 reducer):
    if reducer == "tblib's":  # Dask installs it: copies of an exception shared its __dict__
        pytest.importorskip("tblib.pickling_support").install()
    failed = session.submit(rhapsody.task(fail_now)())
    its_notes = list(failed.exception(timeout=60).__notes__)
    earlier = []  # the outputs of the calls before
    for i in range(3):
        own = rhapsody.task(inc)(100 + i)
        with pytest.raises(ValueError, match="failed at once") as info:
            session.compute(rhapsody.task(inc)(failed), own)
        notes = "\n".join(info.value.__notes__)
        assert own.key in notes and not any(key in notes for key in earlier), notes
        earlier.append(own.key)
    # the first call noted its outputs on the future's own error
    assert failed.exception().__notes__ == its_notes
    outputs = [rhapsody.task(inc)(200 + i) for i in range(8)]
    with pytest.raises(ValueError) as info:
        session.compute(rhapsody.task(inc)(failed), *outputs)
    assert info.value.__notes__[-1].endswith(" and 3 more"), "outputs left out unsaid"


def test_submit_of_a_plain_function_says_how_to_make_a_node(session):
    with pytest.raises(TypeError, match=r"submit\(\) takes nodes \(or futures\), got <function "
                                        r"inc .*>; a node is a task's call: submit\(inc\(...\)\)"):
        session.submit(inc, 1)


def test_a_failing_compute_does_not_cancel_what_another_calls_nodes_wait_for(tmp_path):
    started, go = tmp_path / "started", tmp_path / "go"
    shared = rhapsody.task(use)(rhapsody.task(hold)(str(started), 1), 7)
    with rhapsody.Session(rhapsody.LocalBackend(cpus=2), progress=False) as s:
        th = threading.Thread(target=lambda: pytest.raises(
            ValueError, s.compute, rhapsody.task(use)(shared, 3), rhapsody.task(fail_now)(str(go))))
        th.start()
        wait_for_files([started], 60)
        fut = s.submit(rhapsody.task(use)(shared, 4))  # waits for the compute's `shared`
        go.write_text("")
        th.join(60)
        assert fut.result(timeout=60) == 4


def test_compute_cancelled_by_another_thread_raises_cancelled_error(tmp_path):
    path = tmp_path / "pid"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)]) as s:
        def cancel_once_it_runs():
            wait_for_files([path], 60)
            s.cancel()
        threading.Thread(target=cancel_once_it_runs).start()
        with pytest.raises(cf.CancelledError, match="was cancelled before it could give its "
                                                    "value"):
            s.compute(rhapsody.task(hold)(str(path)))  # before: returned the error as a value


def test_exception_gives_the_error_result_raises_for_a_value_the_driver_cannot_load(session):
    fut = session.submit(rhapsody.task(Unloadable)())
    exc = fut.exception(timeout=60)  # before: None, and then result() raised
    assert isinstance(exc, RuntimeError) and "cannot be unpickled in the driver" in str(exc)
    with pytest.raises(RuntimeError, match="cannot rebuild here"):
        fut.result()
    assert fut.exception() is exc  # before: a new error per call


def test_wait_first_exception_counts_a_finished_value_the_driver_cannot_load(session,
                                                                             tmp_path):
    fut = session.submit(rhapsody.task(Unloadable)())
    rhapsody.wait([fut], timeout=60)
    other = session.submit(rhapsody.task(hold)(str(tmp_path / "held")))
    done, not_done = rhapsody.wait([fut, other], timeout=60, return_when=cf.FIRST_EXCEPTION)
    assert done == {fut} and not_done == {other}
    other.cancel()

# -- futures as inputs, a growing graph ----------------------------------------------------

def test_a_future_is_an_input_to_new_work_even_nested_and_after_it_finished(session):
    a = session.submit(rhapsody.task(inc)(1))
    assert a.result(timeout=60) == 2
    total = rhapsody.task(lambda xs, d: sum(xs) + d["k"])
    b = session.submit(total([a, rhapsody.task(inc)(a)], {"k": a}))
    assert b.result(timeout=60) == 2 + 3 + 2


def test_one_node_on_futures_running_done_or_beside_a_new_upstream_node_gets_every_value(
        session):
    done = session.submit(rhapsody.task(inc)(1))
    assert done.result(timeout=60) == 2
    running = session.submit(rhapsody.task(nap)(0.2, 10))
    add = rhapsody.task(lambda a, b, c=0: a + b + c)
    on_futures = add(done, running)
    assert on_futures.deps == (done, running)  # positional futures are its edges, in order
    known = rhapsody.task(inc)(5)
    session.submit(known)  # a node this session already runs
    new = rhapsody.task(inc)(done)  # an input nobody submitted: the walk takes it along
    futures = [session.submit(on_futures), session.submit(add(done, known)),
               session.submit(add(running, new)), session.submit(add(done, done, c=running))]
    assert [f.result(timeout=60) for f in futures] == [12, 8, 13, 14]


def test_compute_on_a_cancelled_future_raises_cancelled_error_naming_the_node_and_its_input(
        session):
    cancelled = session.submit(rhapsody.task(nap)(60))
    assert cancelled.cancel() and cancelled.cancelled()
    dependent = rhapsody.task(inc)(cancelled)
    with pytest.raises(cf.CancelledError, match=rf"node {dependent.key!r} did not run: its "
                                                rf"input {cancelled.key!r} was cancelled"):
        session.compute(dependent, on_error="raise")
    # a future of it is cancelled, as concurrent.futures does with work that never ran
    later = session.submit(rhapsody.task(inc)(cancelled))
    assert cf.wait([later], timeout=60).done and later.cancelled()


def test_a_future_in_an_executables_argv_is_its_value_as_text(session):
    word = session.submit(rhapsody.task(str.upper)("hi"))
    echoed = session.submit(rhapsody.executable(["echo", word, 3]))
    assert echoed.result(timeout=60).stdout == "HI 3\n"


@pytest.mark.parametrize("input_ends", ["cancelled", "failed"])
def test_compute_continue_on_an_ended_future_still_runs_the_outputs_that_do_not_need_it(
        session, input_ends):
    if input_ends == "cancelled":
        ended = session.submit(rhapsody.task(nap)(60))
        ended.cancel()
    else:
        ended = session.submit(rhapsody.task(inc)("text"))
        assert isinstance(ended.exception(timeout=60), TypeError)
    with pytest.warns(RuntimeWarning, match="1 node"):
        lost, value = session.compute(rhapsody.task(inc)(ended), rhapsody.task(inc)(2),
                                      on_error="continue")
    assert isinstance(lost, cf.CancelledError if input_ends == "cancelled" else TypeError)
    assert value == 3  # before: the group ended as its first record did, this never ran

def test_the_graph_grows_while_it_runs_as_results_arrive(session):
    sims = session.submit(*[rhapsody.task(nap)(0.01 * i, i) for i in range(8)])
    refined = []
    for fut in rhapsody.as_completed(sims, timeout=60):
        if fut.result() % 2:
            refined.append(session.submit(rhapsody.task(lambda x: x * 100)(fut)))
    assert sorted(f.result(timeout=60) for f in refined) == [100, 300, 500, 700]


def test_two_threads_computing_on_one_backend_both_get_their_values():
    with rhapsody.LocalBackend(cpus=2) as backend:
        results = {}

        def work(k):
            results[k] = rhapsody.compute([rhapsody.task(inc)(i + k) for i in range(20)],
                                          backend=backend)[0]
        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {k: [i + k + 1 for i in range(20)] for k in (0, 100)}


def test_a_node_past_its_timeout_still_says_where_it_ran_and_how_often(session):
    fut = session.submit(rhapsody.task(nap, timeout=0.5, retries=1)(30))
    assert isinstance(fut.exception(timeout=60), rhapsody.NodeTimeoutError)
    assert fut.where is not None and fut.where.attempts == 2 and fut.where.cpus


def test_where_records_the_backend_host_cores_and_attempts(session):
    fut = session.submit(rhapsody.task(cpus=1)(inc)(1))
    assert fut.result(timeout=60) == 2
    where = fut.where
    assert where.backend == "local" and where.host and len(where.cpus) == 1
    assert where.attempts == 1 and where.end >= where.start


# -- cancellation --------------------------------------------------------------------------

def test_cancelling_a_queued_node_removes_it_and_it_never_runs(tmp_path):
    backend = rhapsody.LocalBackend(cpus=1)
    with rhapsody.Session(backends=[backend]) as s:
        busy = s.submit(rhapsody.task(hold)(str(tmp_path / "busy")))
        queued = s.submit(rhapsody.task(mark)(str(tmp_path / "queued")))
        later = s.submit(rhapsody.task(mark)(str(tmp_path / "later"), queued))
        wait_for_files([str(tmp_path / "busy")], 30)
        assert queued.cancel() and queued.cancelled() and later.cancelled()
        assert busy.cancel()
        assert backend.ledger.idle()
    assert not (tmp_path / "queued").exists() and not (tmp_path / "later").exists()


def test_cancelling_a_running_python_node_kills_its_worker_and_frees_its_cores(tmp_path):
    backend = rhapsody.LocalBackend(cpus=2)
    with rhapsody.Session(backends=[backend]) as s:
        fut = s.submit(rhapsody.task(cpus=2)(hold)(str(tmp_path / "pid")))
        dependent = s.submit(rhapsody.task(inc)(fut))
        wait_for_files([str(tmp_path / "pid")], 30)
        assert fut.running()
        pid = int((tmp_path / "pid").read_text())
        assert fut.cancel()
        assert not alive(pid), "cancel() returned before the worker was gone"
        assert fut.cancelled() and dependent.cancelled() and backend.ledger.idle()
        with pytest.raises(cf.CancelledError, match=f"node {fut.key!r} was cancelled"):
            fut.result()
        assert s.submit(rhapsody.task(inc)(1)).result(timeout=60) == 2  # the session goes on


def test_cancelling_an_executable_kills_its_process_tree(tmp_path):
    backend = rhapsody.LocalBackend(cpus=2)
    with rhapsody.Session(backends=[backend]) as s:
        exe = rhapsody.executable(["sh", "-c", 'echo $$ > "$0"; sleep 60 & echo $! > "$1"; wait',
                                   str(tmp_path / "sh"), str(tmp_path / "child")])
        fut = s.submit(exe)
        wait_for_files([str(tmp_path / "sh"), str(tmp_path / "child")], 30)
        pids = [int((tmp_path / n).read_text()) for n in ("sh", "child")]
        assert fut.cancel()
        assert not [p for p in pids if alive(p)] and backend.ledger.idle()


def test_cancelling_a_multi_rank_node_kills_every_rank(tmp_path):
    backend = rhapsody.LocalBackend(cpus=2)
    with rhapsody.Session(backends=[backend]) as s:
        fut = s.submit(rhapsody.task(ranks=2)(hold_rank)(str(tmp_path)))
        wait_for_files([str(tmp_path / "rank0"), str(tmp_path / "rank1")], 30)
        pids = [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
        assert fut.cancel()
        assert not [p for p in pids if alive(p)] and backend.ledger.idle()


def test_session_cancel_stops_everything_and_leaves_no_process_and_a_full_ledger(tmp_path):
    backend = rhapsody.LocalBackend(cpus=4)
    with rhapsody.Session(backends=[backend]) as s:
        futures = [s.submit(rhapsody.task(hold)(str(tmp_path / f"py{i}"))) for i in range(2)]
        futures.append(s.submit(rhapsody.executable(
            ["sh", "-c", 'echo $$ > "$0"; exec sleep 60', str(tmp_path / "exe")])))
        futures.append(s.submit(rhapsody.task(hold)(str(tmp_path / "queued"))))  # no core left? 3 run
        wait_for_files([str(tmp_path / n) for n in ("py0", "py1", "exe")], 30)
        pids = [int((tmp_path / n).read_text()) for n in ("py0", "py1", "exe")]
        s.cancel()
        assert all(f.cancelled() for f in futures)
        assert not [p for p in pids if alive(p)] and backend.ledger.idle()


def test_leaving_the_with_block_on_an_exception_kills_what_runs(tmp_path):
    backend = rhapsody.LocalBackend(cpus=2)
    with pytest.raises(ZeroDivisionError):
        with rhapsody.Session(backends=[backend]) as s:
            fut = s.submit(rhapsody.task(hold)(str(tmp_path / "pid")))
            wait_for_files([str(tmp_path / "pid")], 30)
            1 / 0
    assert not still_alive([int((tmp_path / "pid").read_text())], 5.0)
    assert fut.cancelled()


# -- memory --------------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.timeout(300)
def test_a_long_futures_loop_of_megabyte_results_keeps_the_driver_flat(session):
    make = rhapsody.task(megabyte)
    readings = []
    for i in range(10_000):
        fut = session.submit(make(i))
        assert len(fut.result(timeout=60)) == 1 << 20
        del fut
        if i % 1000 == 999:
            readings.append(rss())
    growth = readings[-1] - readings[0]
    assert growth < 64 << 20, f"the driver grew {growth >> 20} MB over 9,000 dropped futures"
    assert session._scheduler.tasks == {}


def after(previous, i):
    return i


def test_the_last_future_of_a_chain_keeps_no_upstream_future_or_its_value_alive(session,
                                                                                tmp_path):
    import weakref
    step = rhapsody.task(after)
    fut = session.submit(step(None, 0))
    upstream = []
    for i in range(1, 50):
        upstream.append(weakref.ref(fut))
        fut = session.submit(step(fut, i))  # only the newest future is kept
        assert fut.result(timeout=60) == i
        fut.exception()
    gc.collect()
    assert not [r for r in upstream if r() is not None]
    node = step(fut, 50)  # a node you keep keeps its inputs: it can run again
    assert session.submit(node).result(timeout=60) == 50
    gc.collect()
    assert upstream[-1]() is None and session.submit(node).node is node
    kept = session.submit(step(fut, 52))
    assert kept.result(timeout=60) == 52 and kept.node.name == "after"  # (alive: no copy)
    held = step(fut, 53)
    done_held = session.submit(held)
    assert done_held.result(timeout=60) == 53 and done_held.node is held
    # a finished future's node is still read (a copy without its inputs), never rerun
    done = session.submit(step(fut, 51))
    assert done.result(timeout=60) == 51
    gc.collect()
    assert done.node.name == "after" and done.node.released
    with pytest.raises(ValueError, match="cannot run again: its future ended and let go of "
                                         "the node's inputs"):
        session.submit(done.node)
    assert "takes a finished future that let go of its node's inputs" in rhapsody.explain(
        step(done, 54), str(tmp_path))


def fail_once(path, previous):
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first time")
    return previous


def test_a_failed_futures_node_keeps_its_inputs_and_runs_again(session, tmp_path):
    first = session.submit(rhapsody.task(inc)(1))
    failed = session.submit(rhapsody.task(fail_once)(str(tmp_path / "once"), first))
    assert isinstance(failed.exception(timeout=60), ValueError)
    del first
    gc.collect()
    assert session.submit(failed.node).result(timeout=60) == 2


def test_a_journal_session_keys_a_node_on_a_finished_future_whose_node_you_dropped(tmp_path):
    # its node had gone with the future's end: the journal walked None (AttributeError)
    step = rhapsody.task(inc)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=str(tmp_path),
                          progress=False) as s:
        fut = s.submit(step(step(1)))
        assert fut.result(timeout=60) == 3
        gc.collect()
        assert s.submit(step(fut)).result(timeout=60) == 4
        assert s.compute(step(fut), journal=str(tmp_path / "other")) == (4,)


def test_a_finished_future_keeps_its_arguments_once_not_also_their_pickled_copy(session):
    import tracemalloc
    echo_size = rhapsody.task(len)
    tracemalloc.start()
    try:
        fut = session.submit(echo_size(bytearray(20 << 20)))  # pickled to go to the worker
        assert fut.result(timeout=60) == 20 << 20
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 30 << 20, f"a finished future holds {held >> 20} MB for a 20 MB argument"


def test_finished_futures_give_pythons_collector_few_objects_to_walk(session):
    # the cyclic collector walks every tracked object a live future keeps: its node, the
    # node's argument tuple, the record, the future, its lock and its Where (no call
    # encoding, no waiter or callback lists, no list of placements)
    import gc
    make = rhapsody.task(inc)
    futures = [session.submit(make(i)) for i in range(1000)]
    assert [f.result(timeout=60) for f in futures] == list(range(1, 1001))
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects()}
        futures = [session.submit(make(i)) for i in range(1000)]
        assert [f.result(timeout=60) for f in futures] == list(range(1, 1001))
        session.wait()
        kept = [o for o in gc.get_objects() if id(o) not in before]
    finally:
        gc.enable()
    assert len(kept) <= 6.5 * 1000, (len(kept), sorted({type(o).__name__ for o in kept}))


def test_adaptive_sampling_example_refines_the_promising_seeds_and_leaves_no_process():
    import subprocess
    import sys
    from .conftest import child_pids
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = child_pids()
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "adaptive_sampling.py")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "6 of 16 seeds refined; best estimate 0.8" in out  # seeds 4-6 and 11-13
    assert "best ran on cpu, host" in out
    assert not child_pids() - before


def gate(started, release):
    """Note this worker's pid in ``started``, then wait (up to a minute) for ``release``."""
    with open(started, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 1


def test_cancelling_a_call_queued_behind_a_running_one_leaves_the_running_one_alone(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    backend = rhapsody.LocalBackend(cpus=1)
    with rhapsody.Session(backends=[backend], progress=False) as s:
        head = s.submit(rhapsody.task(gate)(str(started), str(release)))
        wait_for_files([str(started)], 30)
        queued = s.submit(rhapsody.task(inc)(head))  # forwarded: queued behind head there
        deadline = time.monotonic() + 30
        while not queued.running():
            assert time.monotonic() < deadline, "the dependent was never queued behind its input"
            time.sleep(0.01)
        assert queued.cancel() and queued.cancelled()  # at once: head still runs
        assert head.running()
        release.write_text("go")
        assert head.result(timeout=60) == 1
        assert len(started.read_text().split()) == 1, "the running call was killed and run again"
        assert head.where.attempts == 1
        assert s.submit(rhapsody.task(inc)(head)).result(timeout=60) == 2  # the session goes on
        s.wait()
        assert backend.ledger.idle()



def logged(path, i, seconds, gate=None):
    """Log ``i`` (once ``gate`` exists, if given), then take ``seconds``."""
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.005)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    time.sleep(seconds)
    return i


def test_cancelling_a_call_whose_worker_already_answered_it_runs_nothing_again(tmp_path):
    # the driver still took call 1 for the one running, but its worker had ended it and
    # the calls behind it: the worker was killed and those (done, unread) ran again
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    backend = rhapsody.LocalBackend(cpus=1)
    with rhapsody.Session(backends=[backend], progress=False) as s:
        s.compute([rhapsody.task(logged)(str(tmp_path / "warm"), i, 0) for i in range(50)])
        futs = s.submit(rhapsody.task(logged)(log, 0, 0, gate),
                        *[rhapsody.task(logged)(log, i, 0.02) for i in range(1, 6)])

        def cancel_second(first):  # on the scheduler thread: nothing is read meanwhile
            deadline = time.monotonic() + 30
            while len(lines(log)) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            futs[1].cancel()
        futs[0].add_done_callback(cancel_second)
        open(gate, "w").close()
        assert [f.result(timeout=60) for f in futs[2:]] == [2, 3, 4, 5]
        assert futs[1].cancelled()
    assert sorted(lines(log)) == ["0", "1", "2", "3", "4", "5"], "calls ran twice"


def test_a_daemon_an_executable_leaves_dies_when_the_run_ends_not_with_the_driver(tmp_path):
    """It lived on until the driver exited (only the watchdog ended it then)."""
    pidfile = tmp_path / "daemon"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], progress=False) as s:
        s.compute(rhapsody.executable(
            ["sh", "-c", f"setsid sleep 600 & echo $! > {pidfile}; sleep 0.2"]))
        daemon = int(pidfile.read_text())
        assert not still_alive([daemon], 10), "the executable's daemon outlived its run"



@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_when", ["FIRST_COMPLETED", "FIRST_EXCEPTION"])
def test_wait_returns_once_answered_even_when_a_scan_of_its_futures_outlasts_a_step(
        monkeypatch, return_when):
    """It took a step that came back after the whole step for a timeout, so with many
    futures (a scan of a million takes a second) an answered wait never returned."""
    from rhapsody_graph import futures
    monkeypatch.setattr(futures, "SIGNAL_STEP", 1e-9)  # every scan outlasts it
    fs = [cf.Future() for _ in range(100)]
    fs[0].set_exception(ValueError("first"))
    done, not_done = rhapsody.wait(fs, return_when=getattr(rhapsody, return_when))
    assert done == {fs[0]} and len(not_done) == 99

@pytest.mark.parametrize("waiting", [
    lambda fut: fut.result(),
    lambda fut: rhapsody.wait([fut]),
    lambda fut: rhapsody.wait([fut], timeout=10**6, return_when=rhapsody.FIRST_COMPLETED),
    lambda fut: list(rhapsody.as_completed([fut])),
], ids=["result", "wait", "wait-first-completed", "as_completed"])
def test_ctrl_c_that_another_thread_received_stops_a_waiting_call_at_once(session, waiting):
    # as compute(): the handler runs in the main thread, asleep in an untimed wait
    import signal

    def ctrl_c_to_this_thread():
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    fut = session.submit(rhapsody.task(nap)(30))
    timer = threading.Timer(0.5, ctrl_c_to_this_thread)
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        waiting(fut)
    assert time.monotonic() - started < 15, "the Ctrl-C waited for the node to end"
    assert fut.cancel()
