"""The opt-in switches' return value (enable_compile_fusion, enable_eager_override and their disables).

A switch is made when it is returned; used as a context manager, its block ends by putting back what
the state would be without it. Switches of one setting (keyed by their `restore` function) are kept in
one list (one per thread for a setting that has a value per thread), in the order they were made or
entered, under one lock, so that blocks that overlap without
nesting (threads) still end right: when a block ends, the state becomes that of the latest switch still
alive, or, when none is, the state from before the first of them. A switch that is never entered and
no longer referenced (a plain `enable_...()` call) leaves the list: its change simply stays.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

_LOCK = threading.RLock()
# (restore function, thread id for a per-thread setting) -> its switches made or entered, not exited
_LIVE: dict[tuple[Callable, int | None], list[weakref.ref]] = {}


class Switch:
    """What enable/disable return: the switch is already made when it is returned; used as a context
    manager, its exit puts back the state the other live switches (or, with none, the state from before
    them) give. A switch object may be entered again after its block ended (it switches again); entering
    it while its block is still open raises RuntimeError."""

    def __init__(
        self,
        state: Callable[[], Any],
        restore: Callable[[Any], None],
        change: Callable[[], None],
        *,
        per_thread: bool = False,
    ) -> None:
        """per_thread: the setting has a value per thread (torch 2.13's Inductor config), so each thread's
        switches are a list of their own."""
        self._state, self._restore, self._change = state, restore, change
        self._key = (restore, threading.get_ident() if per_thread else None)
        self._entered = False
        with _LOCK:
            self._join()

    def _join(self) -> None:
        """Under _LOCK: note the state before this switch, add it to its setting's list, switch."""
        self._before = self._state()
        _alive(self._key).append(weakref.ref(self))
        self._change()

    def __enter__(self) -> Switch:
        with _LOCK:
            if self._entered:
                raise RuntimeError("this switch's block is still open: use a new enable_/disable_ call to nest")
            if weakref.ref(self) not in _alive(self._key):  # entered again after its block ended
                self._join()
            self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        with _LOCK:
            live = _alive(self._key)
            if weakref.ref(self) not in live:
                raise RuntimeError("this switch was exited already (enter it again first)")
            first = live[0]() is self
            live.remove(weakref.ref(self))
            self._entered = False
            if not live:
                self._restore(self._before)
                return
            if first:
                cast(Switch, live[0]())._before = self._before  # the state before them all stays the one to return to
            cast(Switch, live[-1]())._change()  # (_alive dropped the dead references)


def _alive(key: tuple[Callable, int | None]) -> list[weakref.ref]:
    """The setting's live switches (under _LOCK), without those no longer referenced (plain calls:
    their change stays, and the next switch's `_before` already holds it)."""
    live = _LIVE.setdefault(key, [])
    live[:] = [r for r in live if r() is not None]
    return live
