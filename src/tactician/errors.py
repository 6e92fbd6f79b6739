"""Every error Tactician raises on purpose.

    TacticianError
    ├── InvalidInput          bad input from a user: one-line message, nothing written
    │   ├── UnknownKind
    │   └── InvalidSchedule
    ├── NotFound
    ├── Forbidden             the actor's role does not allow that, or no valid token
    ├── Conflict              the request is valid but the current state forbids it
    ├── LeaseLost             a worker acted on a task whose lease it no longer holds
    ├── StoreUnavailable      the database cannot be reached
    └── HandlerError          raised by executors; retryable unless `retryable=False`
        └── TargetOverloaded  the target answered 429/503: back off and retry

The docstring of each class is its default message.
"""

from __future__ import annotations


class TacticianError(Exception):
    """Tactician failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidInput(TacticianError):
    """The input is not valid."""


class UnknownKind(InvalidInput):
    """No task kind has that name."""


class InvalidSchedule(InvalidInput):
    """The schedule is not valid."""


class NotFound(TacticianError):
    """Nothing has that id."""


class Forbidden(TacticianError):
    """Not allowed."""


class Conflict(TacticianError):
    """The task's current state does not allow that."""


class LeaseLost(TacticianError):
    """The lease on this task was taken away; the result is refused."""


class StoreUnavailable(TacticianError):
    """The database cannot be reached."""


class HandlerError(TacticianError):
    """The handler failed."""

    def __init__(self, message: str | None = None, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TargetOverloaded(HandlerError):
    """The target is overloaded (429/503); backing off."""
