"""RHAPSODY's exception classes (``rhapsody.api.errors``), with its hierarchy and messages.

>>> str(TaskValidationError("t1", "kwargs must be a dict, got list [1]"))
"Task 't1' validation failed: kwargs must be a dict, got list [1]"
>>> issubclass(TaskValidationError, RhapsodyError), issubclass(RhapsodyError, Exception)
(True, True)
"""
from __future__ import annotations

from typing import Optional

__all__ = ["RhapsodyError", "BackendError", "TaskValidationError", "TaskExecutionError",
           "SessionError", "ResourceError"]


class RhapsodyError(Exception):
    """The base of every RHAPSODY error; ``message`` is its text."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BackendError(RhapsodyError):
    """A backend itself failed (not a task)."""

    def __init__(self, backend_name: str, message: str) -> None:
        self.backend_name = backend_name
        super().__init__(f"Backend '{backend_name}' failed: {message}")


class TaskValidationError(RhapsodyError):
    """A task is invalid: raised when it is made, before anything runs."""

    def __init__(self, task_uid: Optional[str], message: str) -> None:
        self.task_uid = task_uid
        super().__init__(f"Task '{task_uid}' validation failed: {message}" if task_uid
                         else f"Task validation failed: {message}")


class TaskExecutionError(RhapsodyError):
    """A task failed while it ran."""

    def __init__(self, task_uid: str, message: str, exit_code: Optional[int] = None) -> None:
        self.task_uid, self.exit_code = task_uid, exit_code
        code = f" with exit code {exit_code}" if exit_code is not None else ""
        super().__init__(f"Task '{task_uid}' failed{code}: {message}")


class SessionError(RhapsodyError):
    """A session was misused (closed, misconfigured)."""


class ResourceError(RhapsodyError):
    """Resources a task asks for cannot be had."""

    def __init__(self, task_uid: Optional[str], resource_type: str, message: str) -> None:
        self.task_uid, self.resource_type = task_uid, resource_type
        super().__init__(f"Task '{task_uid}' resource error ({resource_type}): {message}"
                         if task_uid else f"Resource error ({resource_type}): {message}")
