"""Benchmark: time from ``flwr run`` to the first local training step, and what it is made of.

Runs the demo experiment for one round through the real launcher (``flwr run`` on
a local simulation SuperLink) and timestamps the milestones in its output, then
measures the import cost of the two app modules in fresh interpreters. Prints JSON.

    .venv/bin/python scripts/bench_startup.py [--repeat 2] [hydra overrides...]

Milestones (seconds after ``flwr run`` is started):
  superlink      the local SuperLink answers (started by ``flwr run`` if none runs)
  run_started    the app bundle is built, uploaded and the run is created
  server_ready   the ServerApp has imported, composed its config and made its run folder
  workers_ready  Ray is up and its workers exist (the simulation backend)
  first_train    the server sends round 1 (every site has named itself)
  first_step     the first site begins its local training (``train_started_at`` of
                 round 1 in metrics.jsonl): it has evaluated the model it received
                 (``strategy.evaluate_in_train``) and checked its cases first
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fl_imaging.outputs.reporting import read_metrics, read_summary
from fl_imaging.tools.launch import run_simulation

ROOT = Path(__file__).resolve().parent.parent
MILESTONES = {
    "superlink": "Using SuperLink",
    "run_started": "Successfully started run",
    "server_ready": "run folder:",
    "workers_ready": "Constructed ActorPool",
}


class MilestoneClock(io.TextIOBase):
    """A stdout stand-in that notes when each milestone line first appears."""

    def __init__(self, out: io.TextIOBase, started: float) -> None:
        self.out, self.started, self.seen = out, started, {}

    def write(self, text: str) -> int:
        now = time.time() - self.started
        for name, marker in MILESTONES.items():
            if name not in self.seen and marker in text:
                self.seen[name] = round(now, 2)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def import_seconds(module: str, repeat: int = 3) -> float:
    """Median wall time of ``import module`` in a fresh interpreter (warm file cache)."""
    times = []
    for _ in range(repeat):
        code = (
            f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        times.append(float(out.stdout.strip()))
    return round(statistics.median(times), 2)


def one_start(overrides: list[str], work: Path) -> dict[str, float]:
    """Milestones of one demo run of one round."""
    started = time.time()
    clock = MilestoneClock(sys.stdout, started)  # type: ignore[arg-type]
    real_stdout, sys.stdout = sys.stdout, clock  # type: ignore[assignment]
    try:
        outcome = run_simulation(
            "demo",
            [
                "rounds=1",
                f"paths.outputs={work / 'outputs'}",
                f"paths.state={work / 'state'}",
                *overrides,
            ],
            project_root=ROOT,
        )
    finally:
        sys.stdout = real_stdout
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"the run ended {outcome.status}")
    summary = read_summary(outcome.run_dir)
    rows = read_metrics(outcome.run_dir)
    first_step = min(r["train_started_at"] for r in rows if r.get("train_started_at"))
    return {
        **clock.seen,
        "first_train": round(float(summary["first_train_sent_at"]) - started, 2),
        "first_step": round(first_step - started, 2),
        "round1_s": round(sum(summary["round_seconds"]["1"].values()), 2),
        "total_s": round(outcome.seconds, 2),
    }


def main() -> None:
    """Measure and print the JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs (the first warms caches)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the demo run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    os.environ.setdefault("FLWR_HOME", str(work / ".flwr"))
    runs = [one_start(list(args.overrides), work) for _ in range(args.repeat)]
    result = {
        "runs": runs,
        "imports_s": {
            m: import_seconds(m)
            for m in ("torch", "monai", "fl_imaging.apps.client_app", "fl_imaging.apps.server_app")
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
