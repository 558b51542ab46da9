"""What every target type's `deliver` returns: the outcome of sending one job once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Attempt:
    """The result of sending one job once: how many instances went, and what went wrong.

    `permanent`: retrying cannot help (the job goes to error/ now); `unreachable`: the target
    itself is down or refusing, so dispatch leaves its other jobs alone until the next retry.
    """

    delivered: int = 0
    error: str = ""
    permanent: bool = False
    unreachable: bool = False

    @property
    def ok(self) -> bool:
        return not self.error
