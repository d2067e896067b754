"""`python -m analysis` is the `analyze` command (the MLproject entry point calls it)."""

from __future__ import annotations

from analysis.cli import analyze

if __name__ == "__main__":
    analyze(prog_name="python -m analysis")
