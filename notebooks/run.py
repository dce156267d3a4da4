"""Execute the notebooks top to bottom (nbclient), in place of a person pressing "Run all".

    python notebooks/run.py            # full mode: figures and CSVs saved under notebooks/results/
    python notebooks/run.py --fast     # what CI runs (GN_NOTEBOOK_FAST=1): small, nothing saved
    python notebooks/run.py 03_batch_size_robustness.ipynb

Outputs are not written back: the committed notebooks stay stripped, the saved figures stay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(name: str, fast: bool, timeout: int = 3600) -> float:
    """Run one notebook in a fresh kernel with notebooks/ as its working directory; seconds taken."""
    os.environ["GN_NOTEBOOK_FAST"] = "1" if fast else "0"
    notebook = nbformat.read(HERE / name, as_version=4)
    start = time.time()
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=NOTEBOOKS)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: {execute(name, args.fast):.0f} s ({'fast' if args.fast else 'full'} mode)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
