"""The opt-in switches' return value (enable_compile_fusion, enable_eager_override and their disables)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Switch:
    """What enable/disable return: the switch is already made when it is returned; used as a context
    manager, it puts back the state from before the call on exit."""

    def __init__(self, state: Callable[[], Any], restore: Callable[[Any], None], change: Callable[[], None]) -> None:
        self._restore = restore
        self._before = state()
        change()

    def __enter__(self) -> Switch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore(self._before)
