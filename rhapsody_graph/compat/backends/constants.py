"""``rhapsody.backends.constants``: RHAPSODY's task states and its state mapper.

Every backend here names its task states as RHAPSODY's main states do.

>>> mapper = StateMapper("concurrent")
>>> mapper.DONE, mapper.terminal_states, mapper.to_main_state("RUNNING")
('DONE', ('DONE', 'FAILED', 'CANCELED'), <TasksMainStates.RUNNING: 'RUNNING'>)
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Tuple, Union

__all__ = ["TasksMainStates", "StateMapper"]


class TasksMainStates(Enum):
    """A task's states, as RHAPSODY names them."""
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    RUNNING = "RUNNING"


class StateMapper:
    """A backend's task states (``mapper.DONE``, ...) and the main state of each."""

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> str:
        try:
            return TasksMainStates[name].value
        except KeyError:
            raise AttributeError(f"'StateMapper' has no state {name!r}") from None

    def to_main_state(self, backend_state: str) -> TasksMainStates:
        """The main state of ``backend_state``; ``ValueError`` if it is none."""
        try:
            return TasksMainStates(backend_state)
        except ValueError:
            raise ValueError(f"Unknown backend state: {backend_state}") from None

    def get_backend_state(self, main_state: Union[TasksMainStates, str]) -> str:
        """The backend's name of ``main_state`` (an enum member or its name)."""
        return (TasksMainStates[main_state] if isinstance(main_state, str) else main_state).value

    @property
    def terminal_states(self) -> Tuple[str, ...]:
        """The states a task ends in."""
        return (self.DONE, self.FAILED, self.CANCELED)
