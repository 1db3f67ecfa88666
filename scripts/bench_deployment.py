"""Deployment round cost: wall time per round minus compute, SuperLink + SuperNodes on loopback.

For each mode, starts a real deployment with scripts/deploy/federation.py (TLS, SuperNode
authentication, one SuperNode per demo hospital), runs the demo experiment for a few rounds
(cross-site evaluation off) and records when each round's last evaluation row reaches the
run's metrics.jsonl. A round's wall time is the time between two such moments; its compute is
the slowest site's local training (``train_seconds`` it reports) plus the slowest site's
evaluation (timed here, in one process, on the same data and model). Prints JSON.

Modes:
    subprocess   Flower's default: a fresh ``flwr-clientapp`` process per message
    warm         --isolation process + scripts/deploy/warm_executor.py (fork from warm imports)
    warm-slowpoll  as warm, but Flower's default 1 s first retry for message objects
    warm-direct  as warm, but the SuperNodes talk to the SuperLink itself (--no-gateway),
                 not through the Fleet-only gateway: the gateway's cost per round

    python scripts/bench_deployment.py --modes subprocess warm --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDERATION = ROOT / "scripts" / "deploy" / "federation.py"
SITES = ["hospital_a", "hospital_b", "hospital_c"]
MODES = {
    "subprocess": ["--isolation", "subprocess"],
    "warm": ["--isolation", "warm"],
    "warm-slowpoll": ["--isolation", "warm", "--object-poll", "0"],
    "warm-direct": ["--isolation", "warm", "--no-gateway"],
}


def _rows(outputs: Path) -> list[dict]:
    files = list(outputs.glob("*/metrics.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def run_mode(
    mode: str, rounds: int, port: int, data_dir: Path, overrides: list[str], keep: Path | None
) -> dict:
    """One deployment in ``mode``: per-round wall times and the sites' training seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench-deploy-{mode}-") as tmp:
        folder = keep / mode if keep else Path(tmp)
        outputs = folder / "outputs"
        base = [sys.executable, str(FEDERATION), "--dir", str(folder)]
        started = time.monotonic()
        up = subprocess.run(
            [
                *base,
                "up",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--sites",
                *SITES,
                *MODES[mode],
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            if up.returncode:
                raise RuntimeError(f"{mode}: up failed: {up.stderr[-2000:]}")
            up_seconds = time.monotonic() - started
            items = [*overrides, f"rounds={rounds}", f"paths.outputs={outputs}"]
            with (folder / "run.log").open("w") as log:
                run = subprocess.Popen(
                    [*base, "run", "--overrides", " ".join(items)],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
                done_at: dict[int, float] = {}
                while run.poll() is None:
                    rows = _rows(outputs)
                    for r in range(rounds + 1):
                        val = [x for x in rows if x["round"] == r and x["split"] == "val"]
                        if r not in done_at and len(val) == len(SITES):
                            done_at[r] = time.monotonic()
                    time.sleep(0.05)
                out = run.stdout.read() if run.stdout else ""
            outcome = json.loads(out.strip().splitlines()[-1])
            if outcome["status"] != "finished:completed":
                raise RuntimeError(f"{mode}: run ended {outcome}; see {folder / 'run.log'}")
            rows = _rows(outputs)
            summary = json.loads(next(outputs.glob("*/summary.json")).read_text())
        finally:
            subprocess.run([*base, "down"], capture_output=True, check=False)
    walls = [done_at[r] - done_at[r - 1] for r in range(1, rounds + 1)]
    train = [
        max(x["train_seconds"] for x in rows if x["round"] == r and x["split"] == "train")
        for r in range(1, rounds + 1)
    ]
    return {
        "up_seconds": round(up_seconds, 1),
        "run_seconds": outcome["seconds"],
        "round_wall_seconds": [round(w, 2) for w in walls],
        "slowest_site_train_seconds": [round(t, 2) for t in train],
        # the server's own clock: train exchange, aggregation, evaluate exchange per round
        "server_phase_seconds": {
            r: {k: round(v, 2) for k, v in phases.items()}
            for r, phases in summary.get("round_seconds", {}).items()
        },
    }


def eval_seconds(data_dir: Path, overrides: list[str]) -> float:
    """Slowest site's evaluation of a fresh model, timed in this process (warm imports)."""
    sys.path.insert(0, str(ROOT))
    from fl_imaging.config import compose
    from fl_imaging.ml.models import new_model
    from fl_imaging.site.resolve import resolve_site
    from fl_imaging.site.rounds import evaluate_round

    plan = compose("demo", [*overrides, f"paths.root={ROOT}"])
    weights = new_model(plan).state_dict()
    times = []
    for name in SITES:
        site = resolve_site({"site": name, "manifest": str(data_dir / name / "dataset.json")}, plan)
        evaluate_round(site, plan, weights, validate_data=False)  # first: reads and caches
        start = time.perf_counter()
        evaluate_round(site, plan, weights, validate_data=False)
        times.append(time.perf_counter() - start)
    return max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["subprocess", "warm"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--port", type=int, default=9640)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--overrides", default="strategy.cross_site_epochs=0")
    parser.add_argument("--keep", type=Path, help="keep each deployment's folder (logs) here")
    args = parser.parse_args()
    if not (args.data_dir / SITES[0] / "dataset.json").is_file():
        sys.exit(f"no demo hospitals in {args.data_dir}: `fl-imaging synth --out data/synthetic`")
    overrides = args.overrides.split()
    evaluation = eval_seconds(args.data_dir, overrides)
    result: dict = {
        "sites": SITES,
        "rounds": args.rounds,
        "experiment": "demo",
        "overrides": overrides,
        "slowest_site_eval_seconds": round(evaluation, 2),
        "modes": {},
    }
    for i, mode in enumerate(args.modes):
        stats = run_mode(mode, args.rounds, args.port + 10 * i, args.data_dir, overrides, args.keep)
        steady = stats["round_wall_seconds"][1:] or stats["round_wall_seconds"]
        compute = [t + evaluation for t in stats["slowest_site_train_seconds"]]
        stats["compute_seconds"] = [round(c, 2) for c in compute]
        stats["overhead_seconds"] = [
            round(w - c, 2) for w, c in zip(stats["round_wall_seconds"], compute, strict=True)
        ]
        stats["median_round_wall_seconds_after_round_1"] = round(statistics.median(steady), 2)
        stats["median_overhead_seconds_after_round_1"] = round(
            statistics.median(stats["overhead_seconds"][1:] or stats["overhead_seconds"]), 2
        )
        result["modes"][mode] = stats
        print(json.dumps({mode: stats}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
