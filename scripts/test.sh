#!/usr/bin/env bash
# Sets up .venv (CPU PyTorch from this machine's disk, MLX on the CPU, test references) and runs
# ruff and the test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "mlx[cpu]" -e ".[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Test files run in parallel (pytest-xdist), one file to a worker so that a file's module fixtures
# are built once; at most 4 workers, as many as the machine has cores.
.venv/bin/python -m pytest -q --numprocesses auto --maxprocesses 4 --dist loadfile "$@"
