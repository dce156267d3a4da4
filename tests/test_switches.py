"""The opt-in switches (enable_/disable_eager_override, enable_/disable_compile_fusion) as context
managers: blocks that overlap across threads without nesting, and a switch object entered again."""

from __future__ import annotations

import threading

import pytest

import gn_triton
from gn_triton import compile_fusion, eager_override

SWITCHES = {
    "eager override": (
        gn_triton.enable_eager_override,
        gn_triton.disable_eager_override,
        lambda: eager_override._enabled,
    ),
    "compile fusion": (gn_triton.enable_compile_fusion, gn_triton.disable_compile_fusion, compile_fusion._enabled),
}


@pytest.fixture(autouse=True)
def switches_off():
    for _, disable, _ in SWITCHES.values():
        disable()
    yield
    for _, disable, _ in SWITCHES.values():
        disable()


def _in_threads(*steps_by_thread):
    """Run each thread's steps (callables) in the interleaving given by their `order` numbers: a step
    starts only after every step with a lower number has finished."""
    done = threading.Condition()
    finished = []

    def run(steps):
        for order, step in steps:
            with done:
                done.wait_for(lambda order=order: len(finished) == order)
            step()
            with done:
                finished.append(order)
                done.notify_all()

    threads = [threading.Thread(target=run, args=(steps,)) for steps in steps_by_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(finished) == sum(map(len, steps_by_thread))


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("kind", ["enable", "disable"])
def test_overlapping_blocks_in_two_threads_restore_the_state_before_them(name, kind):
    """Thread 1 enters, thread 2 enters, thread 1 leaves (the switch stays as the open block set it),
    thread 2 leaves: the state from before both comes back, whichever thread leaves first. Torch
    2.13's Inductor config has a value per thread: there each thread gets its own state back."""
    enable, disable, enabled = SWITCHES[name]
    per_thread = name == "compile fusion" and compile_fusion._PER_THREAD
    make = enable if kind == "enable" else disable
    if kind == "disable":
        enable()
    before = enabled()
    for first_out in (1, 2):
        start, seen = {}, {}

        def block(i, enter_at, exit_at, start=start, seen=seen):
            switch = []
            return [
                (enter_at, lambda: (start.__setitem__(i, enabled()), switch.append(make().__enter__()))),
                (exit_at, lambda: (switch[0].__exit__(None, None, None), seen.__setitem__(i, enabled()))),
            ]

        exits = (2, 3) if first_out == 1 else (3, 2)
        _in_threads(block(1, 0, exits[0]), block(2, 1, exits[1]))
        if per_thread:
            assert seen == start
        else:
            assert seen[first_out] == (kind == "enable")  # the other thread's block is still open
            assert seen[3 - first_out] == before
        assert enabled() == before


@pytest.mark.parametrize("name", SWITCHES)
def test_a_switch_entered_again_switches_again_and_an_open_one_raises(name):
    enable, _, enabled = SWITCHES[name]
    switch = enable()
    assert enabled()
    with switch:
        assert enabled()
        with pytest.raises(RuntimeError, match="still open"):
            switch.__enter__()
    assert not enabled()
    with switch:  # a second time: it switches on again, and off at the end
        assert enabled()
    assert not enabled()


@pytest.mark.parametrize("name", SWITCHES)
def test_nested_blocks_and_plain_calls(name):
    enable, disable, enabled = SWITCHES[name]
    with enable():
        with disable():
            assert not enabled()
        assert enabled()
        disable()  # a plain call inside a block: until the block ends
        assert not enabled()
    assert not enabled()
    kept = enable()  # a plain call kept in a variable, then dropped inside a block: it stays made
    with disable():
        del kept
    assert enabled()
