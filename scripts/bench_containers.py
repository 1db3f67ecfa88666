"""Containerised rounds vs the process deployment: the same federation, the same rounds.

Runs (1) the shipped compose.yaml in containers (scripts/docker/test_docker.sh: image
build, compose up, the run, then its restart checks) and (2) the process deployment
(bench_deployment.py's ``warm`` mode: scripts/deploy/federation.py, SuperLink + one
SuperNode per hospital on loopback, TLS, node authentication, warm executors), one after
the other, with the overrides the container test reports (3 synthetic hospitals, tiny
UNet, hospital_a with DP-SGD).
A round's wall time is its train phase plus aggregation, from each run's own
``summary.json`` (``round_seconds``); round 1 (warm-up) and the final evaluation are left
out. Prints JSON: per-round seconds of each, their medians and the difference.

Needs what ``make test-docker`` needs (root, docker.io, docker-compose, mmdebstrap).

    python scripts/bench_containers.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_deployment import run_mode  # the process deployment: up, run, down

ROOT = Path(__file__).resolve().parent.parent
TEST_DOCKER = ROOT / "scripts" / "docker" / "test_docker.sh"


def _round_walls(phases: dict, rounds: int) -> list[float]:
    """Train phase + aggregation of rounds 2..rounds, from ``summary.json`` round_seconds."""
    return [
        round(phases[str(n)]["train"] + phases[str(n)]["aggregate"], 2)
        for n in range(2, rounds + 1)
    ]


def process_deployment(rounds: int, port: int, overrides: str) -> list[float]:
    """Round walls (rounds 2..rounds) of the process deployment (bench_deployment's warm mode)."""
    stats = run_mode("warm", rounds, port, ROOT / "data" / "synthetic", overrides.split(), None)
    return _round_walls(stats["server_phase_seconds"], rounds)


def containers(rounds: int, port: int) -> tuple[list[float], dict]:
    """Round walls (rounds 2..rounds) of the compose federation, and the test's JSON."""
    env = {
        **os.environ,
        "FL_IMAGING_DOCKER_ROUNDS": str(rounds),
        "FL_IMAGING_DOCKER_PORT": str(port),
    }
    out = subprocess.run(
        ["bash", str(TEST_DOCKER)], check=True, capture_output=True, text=True, env=env
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    walls = result["checks"]["round_walls"]
    return [walls[str(n)] for n in range(2, rounds + 1)], result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=47190)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (round 1 is left out)")
    walls, result = containers(args.rounds, args.port + 20)
    print(json.dumps(result), file=sys.stderr)  # the container test's own figures
    process = process_deployment(args.rounds, args.port, result["checks"]["overrides"])
    report = {
        "rounds": args.rounds,
        "process_round_s": process,
        "container_round_s": walls,
        "median_process_s": round(statistics.median(process), 2),
        "median_container_s": round(statistics.median(walls), 2),
        "container_minus_process_s": round(
            statistics.median(walls) - statistics.median(process), 2
        ),
        "image_bytes": result["image_bytes"],
        "build_s": result["build_s"],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
