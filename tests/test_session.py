"""Sessions with several named backends: explicit and implicit routing, edges across
backends, and the errors that come before anything runs (real worker processes)."""
import os
import warnings

import pytest

import rhapsody_graph as rhapsody


def gpu_mask(*_):
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def add(a, b):
    return a + b


def mark(path, *_):
    with open(path, "w") as f:
        f.write("ran")
    return path


@pytest.fixture(scope="module")
def two():
    """Backend "cpu": core 0, no GPU; backend "gpu": core 1 and 2 declared GPUs."""
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=[0], name="cpu"),
                                    rhapsody.LocalBackend(cpus=[1], gpus=2, name="gpu")]) as s:
        yield s


def test_backend_name_routes_a_node_explicitly(two):
    fut = two.submit(rhapsody.task(backend="gpu")(add)(1, 2))
    assert fut.result(timeout=60) == 3 and fut.where.backend == "gpu"


def test_a_node_without_a_name_goes_to_the_first_backend_that_can_hold_it(two):
    plain = two.submit(rhapsody.task(add)(1, 2))
    on_gpu = two.submit(rhapsody.task(gpus=1)(gpu_mask)())
    assert plain.result(timeout=60) == 3 and plain.where.backend == "cpu"
    assert on_gpu.result(timeout=60) in ("0", "1") and on_gpu.where.backend == "gpu"
    assert on_gpu.where.gpus == (int(on_gpu.result()),)


def test_nodes_on_different_backends_depend_on_each_other(two):
    a = rhapsody.task(backend="cpu")(add)(1, 2)
    b = rhapsody.task(backend="gpu")(add)(a, 10)
    c = rhapsody.task(backend="cpu")(add)(b, a)
    assert rhapsody.compute(c, session=two) == (16,)


def test_an_unknown_backend_name_is_refused_before_anything_runs_naming_node_and_backends(
        two, tmp_path):
    early = rhapsody.task(mark)(str(tmp_path / "early"))
    bad = rhapsody.task(backend="hpc")(add)(early, 1)
    with pytest.raises(rhapsody.NoBackendError) as info:
        two.submit(bad)
    message = str(info.value)
    assert bad.key in message and "'hpc'" in message and "cpu, gpu" in message
    assert info.value.tried == ["cpu", "gpu", "inference"]  # the implicit InferenceBackend
    assert not (tmp_path / "early").exists()


def test_a_node_no_backend_can_hold_is_refused_before_anything_runs(two, tmp_path):
    early = rhapsody.task(mark)(str(tmp_path / "early"))
    big = rhapsody.task(gpus=3)(add)(early, 1)
    with pytest.raises(rhapsody.UnsatisfiableError, match="3 gpus"):
        two.submit(big)
    dragon_only = rhapsody.task(process_template={"cwd": "/"})(add)(early, 1)
    with pytest.raises(ValueError, match="'process_template' is passed to Dragon"):
        two.submit(dragon_only)
    assert not (tmp_path / "early").exists()


def test_two_backends_with_one_name_are_refused():
    with rhapsody.LocalBackend(cpus=1, name="x") as a, rhapsody.LocalBackend(cpus=1, name="x") as b:
        with pytest.raises(ValueError, match="two backends are named 'x'"):
            rhapsody.Session(backends=[a, b])


def test_a_backend_in_another_session_is_refused_and_leaves_the_others_free_to_join_one(two):
    busy = two.backends["cpu"]
    with rhapsody.LocalBackend(cpus=1, name="free") as free:
        with pytest.raises(RuntimeError, match="'cpu' already belongs to a session"):
            rhapsody.Session(backends=[free, busy])
        with rhapsody.Session(backends=[free]) as s:
            assert s.submit(rhapsody.task(add)(2, 2)).result(timeout=60) == 4



def test_a_session_takes_a_backend_compute_used_once_its_work_is_done_and_not_before(tmp_path):
    """It was refused ("already belongs to a session") with no public way to close the
    session compute(backend=b) had made for it."""
    with rhapsody.LocalBackend(cpus=2) as b:
        assert rhapsody.compute(rhapsody.task(add)(1, 1), backend=b) == (2,)
        with rhapsody.Session(backends=[b], progress=False) as s:
            assert s.compute(rhapsody.task(add)(2, 2)) == (4,)
        running = rhapsody.submit(rhapsody.task(hold)(str(tmp_path / "pid")), backend=b)
        with pytest.raises(RuntimeError, match="already belongs to a session: the one that "
                                               r"compute\(\)/submit\(\) with backend= made "
                                               "for it, which still has work; wait"):
            rhapsody.Session(backends=[b])  # its work goes on
        assert running.cancel()
        assert rhapsody.compute(rhapsody.task(add)(3, 3), backend=b) == (6,)


def test_a_session_never_takes_a_backend_from_a_compute_about_to_hand_it_work(monkeypatch):
    """A Session closed the session another thread's compute(backend=b) had just got:
    that compute failed with "this session is closed"."""
    import threading
    entered, go, got = threading.Event(), threading.Event(), []
    original = rhapsody.Session.compute

    def held(self, *args, **kwargs):  # the caller, between getting its session and using it
        if threading.current_thread().name == "caller":
            entered.set()
            go.wait(60)
        return original(self, *args, **kwargs)
    with rhapsody.LocalBackend(cpus=1) as b:
        assert rhapsody.compute(rhapsody.task(add)(1, 1), backend=b) == (2,)
        monkeypatch.setattr(rhapsody.Session, "compute", held)
        caller = threading.Thread(name="caller", target=lambda: got.append(
            rhapsody.compute(rhapsody.task(add)(2, 2), backend=b)))
        caller.start()
        assert entered.wait(60)
        with pytest.raises(RuntimeError, match="already belongs to a session"):
            rhapsody.Session(backends=[b])
        go.set()
        caller.join(60)
    assert got == [(4,)]

def test_compute_inside_a_with_block_runs_on_that_session():
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1, name="inner")]) as s:
        node = rhapsody.task(backend="inner")(add)(2, 3)
        assert node.compute() == 5  # no session= given: the with block's
        assert rhapsody.submit(rhapsody.task(add)(1, 1)).result(timeout=60) == 2
    with pytest.raises(RuntimeError, match="closed"):
        s.submit(rhapsody.task(add)(1, 1))


def test_backends_made_per_call_and_never_shut_down_get_a_warning_at_the_users_line(
        monkeypatch):
    from rhapsody_graph import api
    monkeypatch.setattr(api, "_sessions", {})  # only this test's backends count
    monkeypatch.setattr(api, "MANY_OPEN", 2)
    backends = [rhapsody.LocalBackend(cpus=1) for _ in range(3)]
    try:
        assert [rhapsody.task(add)(i, 1).compute(backend=b)
                for i, b in enumerate(backends[:2])] == [1, 2]
        with pytest.warns(RuntimeWarning, match=r"3 backends given to compute\(\)/submit\(\) "
                          r"are open at once(?s:.*)reuse it, or use `with") as seen:
            assert rhapsody.task(add)(2, 1).compute(backend=backends[2]) == 3
        assert seen[0].filename == __file__  # the user's call, not a line of the package
        backends[0].shutdown()  # shut-down backends' sessions no longer count
        backends[1].shutdown()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with rhapsody.LocalBackend(cpus=1) as fourth:
                assert rhapsody.task(add)(3, 1).compute(backend=fourth) == 4
        assert len(api._sessions) == 2
    finally:
        for b in backends:
            b.shutdown()


def test_a_session_of_one_backend_given_alone_runs_on_it():
    backend = rhapsody.LocalBackend(cpus=1, name="alone")
    with rhapsody.Session(backend) as session:
        assert list(session.backends)[0] == "alone"
        assert rhapsody.task(abs)(-3).compute() == 3


@pytest.mark.parametrize("backends, shown", [
    (["local"], r"got 'local'; compute\(backend='local'\) names the default one, a Session "
                "takes an instance"),  # (it pointed at a private name)
    (5, "got 5"),
    ("local", "got 'local'"),
])
def test_a_session_of_what_is_not_a_backend_is_refused_saying_what_it_takes(backends, shown):
    with pytest.raises(TypeError, match=r"Session\(backends=\[\.\.\.\]\) takes backend "
                                        r"instances \(LocalBackend\(\), (?s:.*)" + shown):
        rhapsody.Session(backends=backends)


def inc(x):
    return x + 1


def hold(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    import time
    time.sleep(60)


def test_a_session_dropped_unclosed_is_closed_its_work_cancelled_and_its_workers_ended(
        tmp_path):
    import gc

    from .conftest import child_pids, wait_until
    before = child_pids()

    def use_and_drop():
        s = rhapsody.Session(rhapsody.LocalBackend(cpus=2), progress=False)
        assert s.submit(rhapsody.task(inc)(1)).result(timeout=60) == 2
        running = s.submit(rhapsody.task(hold)(str(tmp_path / "pid")))
        assert wait_until(lambda: (tmp_path / "pid").exists(), 60)
        return s._thread, running  # the session itself is dropped here (its future kept)

    thread, running = use_and_drop()
    assert not running.done()  # its future keeps the session open
    del running
    gc.collect()
    thread.join(60)
    assert not thread.is_alive(), "the dropped session's scheduler thread still runs"
    assert wait_until(lambda: child_pids() <= before, 60), child_pids() - before


def on_gpu_for(seconds):
    import time
    start = time.time()
    time.sleep(seconds)
    return os.environ["CUDA_VISIBLE_DEVICES"], start, time.time()


def test_two_alike_local_backends_of_a_session_never_place_two_nodes_on_one_gpu():
    a = rhapsody.LocalBackend(cpus=2, gpus=1, name="a")
    b = rhapsody.LocalBackend(cpus=2, gpus=1, name="b")
    with rhapsody.Session([a, b], progress=False) as s:
        task = rhapsody.task(gpus=1)(on_gpu_for)
        assert b.ledger is a.ledger  # what is placed on b (an inference service) shares it too
        first, second = s.submit(task.options(backend="a")(0.3), task.options(backend="b")(0.3))
        (gpu_a, start_a, end_a), (gpu_b, start_b, end_b) = first.result(60), second.result(60)
    assert b.ledger is not a.ledger  # its own again once the session closed
    assert gpu_a == gpu_b == "0"
    assert end_a <= start_b or end_b <= start_a, "both held GPU 0 at once"


def test_local_backends_of_a_session_that_overlap_otherwise_are_warned_of():
    with pytest.warns(RuntimeWarning, match=r"backends 'cpu' and 'gpu' both place nodes on "
                                            r"cores \[\d+\] of this machine"):
        s = rhapsody.Session([rhapsody.LocalBackend(cpus=1, name="cpu"),
                              rhapsody.LocalBackend(cpus=1, gpus=2, name="gpu")], progress=False)
    s.close()


def test_done_callbacks_of_a_dropped_session_still_run_once_its_work_ends():
    import gc
    import threading
    got, both = [], threading.Event()

    def done(f):
        got.append(f.result())
        if len(got) == 2:
            both.set()

    def submit_and_drop():
        s = rhapsody.Session(rhapsody.LocalBackend(cpus=2), progress=False)
        for i in range(2):
            s.submit(rhapsody.task(inc)(i)).add_done_callback(done)
    submit_and_drop()
    gc.collect()  # the session and its futures are unreachable but for their callbacks
    assert both.wait(60) and sorted(got) == [1, 2]


def test_a_session_closing_on_its_own_thread_closes_only_its_own_descriptors():
    """Its pool closed each worker's task pipe twice: by then another thread (here, this
    one) could hold that number, and lost it (a subprocess's pipe: EBADF)."""
    import gc
    mine = []

    def submit_and_drop():
        s = rhapsody.Session(rhapsody.LocalBackend(cpus=2), progress=False)
        s.submit(rhapsody.task(inc)(1)).add_done_callback(lambda f: None)
        return s._thread
    thread = submit_and_drop()
    gc.collect()
    try:
        while thread.is_alive():  # it closes the session once the callback ran
            mine.append(os.pipe())
            thread.join(0.001)
        for fd in [fd for pair in mine for fd in pair]:
            os.fstat(fd)  # raises for one closed under us
    finally:
        for r, w in mine:
            os.close(r)
            os.close(w)


THREADS_LEFT_RUNNING = """
import threading, time
def early():  # computing when the main thread ends
    import rhapsody_graph as rhapsody
    print("early", rhapsody.compute(rhapsody.task(time.sleep)(1.0), rhapsody.task(abs)(-4))[1],
          flush=True)
def late():  # first imports and computes once it has ended
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    import rhapsody_graph as rhapsody
    print("late", rhapsody.compute(rhapsody.task(abs)(-5))[0], flush=True)
def gap():  # submitted, and not yet waiting for it when the main thread ends
    import rhapsody_graph as rhapsody
    future = rhapsody.submit(rhapsody.task(abs)(-6))
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    print("gap", future.result(), flush=True)
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # never shut down: Python joins its idle thread after our hook
def pooled():
    import rhapsody_graph as rhapsody
    return rhapsody.compute(rhapsody.task(abs)(-7))[0]
print("pool", pool.submit(pooled).result(), flush=True)
threading.Thread(target=early).start()
threading.Thread(target=late).start()
threading.Thread(target=gap).start()
time.sleep(0.3)
"""


def test_computes_in_threads_the_main_thread_leaves_running_finish_as_python_waits_for_them(
        tmp_path):
    """The sessions closed as the main thread ended, before Python waits for its other
    threads: their compute() was cancelled, and a first import then could not start.
    An idle executor thread that once computed must not keep the program from exiting."""
    import subprocess
    import sys
    script = tmp_path / "threads.py"
    script.write_text(THREADS_LEFT_RUNNING)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(out.stdout.split()[i] + out.stdout.split()[i + 1] for i in range(0, 8, 2)) \
        == ["early4", "gap6", "late5", "pool7"], out.stdout + out.stderr


def test_work_the_main_thread_submitted_and_never_waited_for_is_cancelled_with_a_warning(
        tmp_path):
    """It was cancelled at exit without a word (exit status 0, nothing done)."""
    import subprocess
    import sys
    script = tmp_path / "dropped.py"
    script.write_text("import time, rhapsody_graph as rhapsody\n"
                      "for i in range(3):\n"
                      "    rhapsody.submit(rhapsody.task(time.sleep)(60))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 submitted node(s) had not finished when the program ended" in out.stderr
    assert "rhapsody.wait(futures)" in out.stderr
    # stopped by SIGTERM while it waited for them: cancelled, and no advice to wait
    script.write_text("import time, rhapsody_graph as rhapsody\n"
                      "futures = [rhapsody.submit(rhapsody.task(time.sleep)(60))]\n"
                      "print('waiting', flush=True)\n"
                      "rhapsody.wait(futures)\n")
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline() == "waiting\n"
        driver.terminate()
        assert driver.wait(timeout=60) == 143
        err = driver.stderr.read()
        assert "had not finished" not in err, err
    finally:
        if driver.poll() is None:
            driver.kill()
    # an interactive session keeps the last error it showed: that stopped nothing
    out = subprocess.run([sys.executable, "-i"], input="1/0\nimport time, rhapsody_graph "
                         "as rhapsody\nf = rhapsody.submit(rhapsody.task(time.sleep)(60))\n",
                         capture_output=True, text=True, timeout=120)
    assert "1 submitted node(s) had not finished" in out.stderr, out.stderr[-2000:]


def test_ctrl_c_that_another_thread_received_stops_a_waiting_compute_at_once():
    # a process signal may go to any thread; the handler runs in the main thread, which
    # an untimed wait left asleep until the whole run had ended
    import signal
    import threading
    import time

    def ctrl_c_to_this_thread():
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    timer = threading.Timer(0.5, ctrl_c_to_this_thread)
    started = time.monotonic()
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], progress=False) as s:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            s.compute(rhapsody.task(time.sleep)(30))
    assert time.monotonic() - started < 15, "the Ctrl-C waited for the run to end"


def open_missing():
    return open("/nonexistent/rhapsody-graph-test")


def decode_bad():
    return b"\xff".decode("utf-8")


def test_compute_raises_the_nodes_error_with_its_own_fields_and_text():
    # a copy made without __init__ lost what builtin exceptions set there: an empty text,
    # an OSError without its file name
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], progress=False) as s:
        with pytest.raises(FileNotFoundError) as info:
            s.compute(rhapsody.task(open_missing)(), rhapsody.task(abs)(-1))
        assert info.value.filename == "/nonexistent/rhapsody-graph-test"
        assert "/nonexistent/rhapsody-graph-test" in str(info.value)
        with pytest.raises(UnicodeDecodeError) as info:
            s.compute(rhapsody.task(decode_bad)())
        assert (info.value.encoding, info.value.reason) == ("utf-8", "invalid start byte")
        assert "can't decode byte 0xff" in str(info.value)
