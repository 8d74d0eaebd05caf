"""The worker pool's bookkeeping, with stand-in worker processes (pure logic: the
backends' own tests run real workers)."""
import types
from typing import List, Optional

from rhapsody_graph.backends import pool as pool_module
from rhapsody_graph.backends.pool import Worker, WorkerPool


class FakeClock:
    now = 100.0

    def monotonic(self) -> float:
        return self.now


class LingeringProcessStandIn:
    """A stand-in worker process that never ends by itself: a wait takes its whole
    timeout on ``clock``; it records the timeouts, and is killed."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: List[Optional[float]] = []
        self.killed = False

    def exit_fd(self) -> int:
        return -1

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        self.waits.append(timeout)
        if timeout is not None:
            self.clock.now += timeout
        return None if timeout is not None else -9

    def kill(self) -> None:
        self.killed = True

    def exit_reason(self, died: bool) -> str:
        return "killed by SIGKILL"

    def close(self) -> None:
        pass


def test_closing_the_pool_waits_its_grace_once_for_all_workers_not_once_for_each(monkeypatch):
    """Shutdown used to wait 2 s for each worker in turn: 4 lingering workers, 8 s."""
    clock = FakeClock()
    monkeypatch.setattr(pool_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    pool = WorkerPool(4)
    procs = [LingeringProcessStandIn(clock) for _ in range(4)]
    pool.workers = [Worker(p) for p in procs]
    pool.close(grace=2.0)
    assert [p.waits for p in procs] == [[2.0], [0.0], [0.0], [0.0]]
    assert all(p.killed for p in procs) and not pool.workers
