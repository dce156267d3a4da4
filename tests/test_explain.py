"""`python -m gn_triton.explain`: the shape grammar it shares with `perf.sweep --shape`, the edge cases
it answers (empty inputs, bad groups), and what it prints about a plan."""

import subprocess
import sys

import pytest

from gn_triton import _cost, explain

H100 = _cost.DEVICES["h100"]


def test_parse_shape():
    assert explain.parse_shape("2x128x512x512:16") == ((2, 128, 512, 512), 16)
    assert explain.parse_shape("4X320") == ((4, 320), 32)  # groups default to 32
    assert explain.parse_shape("0x32x8x8:8") == ((0, 32, 8, 8), 8)
    for text, message in (("2x32x8x8:0", "num_groups must be positive, got num_groups=0"),
                          ("2x100x8x8:32", "C=100 is not divisible by num_groups=32"),
                          ("320", "at least N and C"), ("2x-3:1", "none negative"),
                          ("2xax8:4", "got '2xax8:4'"), ("2x8:g", "got '2x8:g'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            explain.parse_shape(text)


@pytest.mark.parametrize("shape", [(0, 32, 8, 8), (2, 32, 0, 8), (2, 32, 0)])
def test_empty_inputs_are_answered(shape):
    text = explain.explain(shape, 8, "bf16", "contiguous", H100)
    assert "Empty input: no kernel is launched" in text and "PREDICTED" not in text


def test_split_plan_shows_the_spans_it_runs_and_counts_are_plural_only_when_more_than_one():
    text = explain.explain((1, 128, 512, 512), 32, "bf16", "contiguous", H100)
    forward = text.split("backward:")[0]
    spans = int(forward.split(" spans = ")[0].rsplit("x ", 1)[1])
    assert f"Plan(split={spans}," in forward  # the plan's split is the spans a block runs on
    assert "1 launches" not in text and "1 waves" not in text
    tiny = explain.explain((1, 8), 4, "fp32", "contiguous", H100)
    assert "fused: 1 launch of 4 programs (a block of 1 group each): 1 launch per call" in tiny
    assert "Device figures: SMs and L2 from the spec sheet; copy bandwidth a default" in text


def test_command_line():
    ok = subprocess.run([sys.executable, "-m", "gn_triton.explain", "1x8x4x4:2", "--dtype", "fp32"],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0 and "forward:" in ok.stdout and "backward:" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "gn_triton.explain", "2x32x8x8:0"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("usage: python -m gn_triton.explain")
    assert "num_groups must be positive" in bad.stderr and "Traceback" not in bad.stderr
