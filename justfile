# queue-runtime tasks. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Run the in-memory demo: 200 sessions x 50 order events with poison and flaky messages.
demo *ARGS:
    uv run --all-extras queue-runtime demo {{ARGS}}

# The whole test suite (what CI runs), then lint and types.
test *ARGS:
    uv run --all-extras pytest -q {{ARGS}}
    just lint

# ruff and mypy.
lint:
    uv run --all-extras ruff check src tests benchmarks examples drills
    uv run --all-extras mypy src

# Reliability drills (docs/reliability.md): fault drills x10 rounds, then 20,000 simulations.
drill:
    uv run --all-extras python -m drills.faults --rounds 10 --keep failed --json drills/results/faults.json
    uv run --all-extras python -m drills.simulation --examples 20000 --workers 2 --json drills/results/simulation.json

# Benchmarks: full sizes, results to benchmarks/results/ and docs/benchmarks.md.
bench *ARGS:
    uv run --all-extras python -m benchmarks {{ARGS}}

# Format the code.
fmt:
    uv run --all-extras ruff format src tests benchmarks examples drills
    uv run --all-extras ruff check --fix src tests benchmarks examples drills
