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
                          ("2xax8:4", "got '2xax8:4'"), ("2x8:g", "got '2x8:g'"),
                          ("1x4x1:4", "more than 1 value per channel"), ("2x1:2", "divisible")):  # fmt: skip
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


def test_one_value_per_group_is_refused_as_torch_refuses_it():
    """A shape torch's group_norm rejects (one value per group) is not planned: ValueError, as torch."""
    import torch

    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.group_norm(torch.randn(1, 4, 1), 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        explain.parse_shape("1x4x1:4")
    assert "more than 1 value per channel" in str(theirs.value)


def test_one_group_is_singular_and_defaults_are_shown():
    text = explain.explain((2, 8, 4, 4), 1, "fp32", "contiguous", H100)
    assert text.startswith("GroupNorm of x (2, 8, 4, 4), 1 group, fp32,")
    assert "Defaults where not given: 32 groups, --dtype bf16, --layout contiguous, --device h100" in text
    help_text = subprocess.run([sys.executable, "-m", "gn_triton.explain", "--help"], capture_output=True, text=True,
                               timeout=120).stdout  # fmt: skip
    for default in ("(default: bf16)", "(default: contiguous)", "(default: h100)", "default 32"):
        assert default in " ".join(help_text.split()), default


def test_channels_last_3d_layout():
    """channels_last_3d: taken for 5-D shapes, planned as channels_last; an error for other ranks."""
    run = lambda *args: subprocess.run([sys.executable, "-m", "gn_triton.explain", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=120)  # fmt: skip
    ok = run("1x8x4x4x4:2", "--layout", "channels_last_3d", "--dtype", "fp32")
    assert ok.returncode == 0, ok.stderr
    as_channels_last = explain.explain((1, 8, 4, 4, 4), 2, "fp32", "channels_last", H100)
    assert ok.stdout.strip().split("\n")[1:] == as_channels_last.split("\n")[1:]  # the same plan and figures
    bad = run("1x8x4x4:2", "--layout", "channels_last_3d")
    assert bad.returncode == 2 and "channels_last_3d needs a 5-D SHAPE" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "shape, layout, line",
    [
        ((1, 1280, 16, 16), "channels_last", "tile: 256 pixels x 8 channels, 0% of its lanes masked; loads of up to "
         "128 bits along channels"),  # groups of 40 channels: rows of 8, 16-byte aligned
        ((1, 256, 10, 16, 16), "channels_last_3d", "loads of up to 128 bits along channels"),
        ((1, 1024, 14, 14), "contiguous", "6% of its lanes masked; loads of up to 64 bits along positions"),
        ((1, 2048, 7, 7), "contiguous", "23% of its lanes masked; loads of up to 16 bits along positions"),
        ((2, 320, 64, 64), "contiguous", "0% of its lanes masked; loads of up to 128 bits along positions"),
    ],
)  # fmt: skip
def test_the_tile_its_masked_lanes_and_load_width_are_shown(shape, layout, line):
    """explain says how the chosen plan's tile sits on the shape (bf16): rows along the layout's contiguous
    axis, masked lanes, and the widest load the alignment the kernels know allows."""
    text = explain.explain(shape, 32, "bf16", layout, H100)
    assert text.count(line) == 2, text  # forward and backward
