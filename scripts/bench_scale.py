"""Benchmark: many virtual hospitals on one machine (Flower simulation engine).

For each federation size N this writes N tiny synthetic hospitals (16^3 voxel
volumes, 4 cases each), runs the real app through ``flwr run`` (the tiny UNet,
``rounds`` rounds, every hospital training and evaluating every round) and samples,
every 0.25 s, the memory of the whole process tree (SuperLink, ServerApp, Ray and its
workers). Prints one JSON line per size, then a summary with the memory growth per
extra hospital.

    .venv/bin/python scripts/bench_scale.py --sites 10 50 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fl_imaging.data.synthetic import generate_federation
from fl_imaging.outputs.reporting import read_summary
from fl_imaging.tools.launch import RunOutcome, run_simulation

ROOT = Path(__file__).resolve().parent.parent


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command may contain spaces and parentheses: ppid follows the last ')'
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(roots: list[int]) -> set[int]:
    tree, seen, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(tree.get(pid, []))
    return seen


def _memory_mb(pids: set[int]) -> tuple[float, float]:
    """Summed PSS and RSS (MB) of ``pids`` (PSS splits shared pages fairly)."""
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
    return pss / 1024, rss / 1024


def _simulation_superlinks() -> list[int]:
    """PIDs of local simulation SuperLinks (``flwr run`` starts one detached)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd[:2]) and b"--simulation" in cmd:
            pids.append(int(entry.name))
    return pids


class TreeSampler(threading.Thread):
    """Peak memory of this process's tree plus every simulation SuperLink's tree.

    The SuperLink runs detached, with the SuperExec, the simulation process, Ray and
    its workers under it. Run the benchmark on an otherwise idle machine: another
    run on the same SuperLink would be counted too.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_pss = self.peak_rss = 0.0
        self.peak_processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            roots = [os.getpid(), *_simulation_superlinks()]
            pids = _descendants(roots) - {os.getpid()}
            pss, rss = _memory_mb(pids)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, len(pids))


def run_sampled(
    sampler: threading.Thread, done: threading.Event, overrides: list[str], what: str
) -> tuple[RunOutcome, Path, float]:
    """The demo with ``overrides`` while ``sampler`` runs; its outcome, run folder, seconds.

    Flower's stream goes to stderr (stdout is the benchmark's JSON); ``done`` stops the
    sampler. Raises SystemExit naming ``what`` when the run did not complete.
    """
    sampler.start()
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        outcome = run_simulation("demo", overrides, project_root=ROOT)
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"{what}: the run ended {outcome.status}")
    return outcome, outcome.run_dir, seconds


def run_size(num_sites: int, rounds: int, work: Path) -> dict[str, float | int | str]:
    """Run one federation of ``num_sites`` tiny hospitals; return its figures."""
    data = work / f"sites-{num_sites}"
    manifests = generate_federation(
        data, num_sites=num_sites, total_cases=4 * num_sites, skew=0.0, fov_mm=32.0, seed=0
    )
    sites = ",".join(f"{{name:hospital_{i:03d},manifest:{m}}}" for i, m in enumerate(manifests))
    overrides = [
        f"federation.sites=[{sites}]",
        "model=unet_tiny",
        "data.patch_size=[16,16,16]",
        f"rounds={rounds}",
        "train.local_epochs=1",
        "train.progress=round",
        "strategy.cross_site_epochs=0",
        f"paths.root={work / f'run-{num_sites}'}",
        f"name=scale{num_sites}",
    ]
    sampler = TreeSampler()
    outcome, run_dir, seconds = run_sampled(
        sampler, sampler.done, overrides, f"{num_sites} hospitals"
    )
    summary = read_summary(run_dir)
    per_round = summary.get("round_seconds", {})
    trained = [v for k, v in per_round.items() if int(k) > 0]
    return {
        "hospitals": num_sites,
        "status": outcome.status,
        "rounds": summary["rounds_completed"],
        "total_s": round(seconds, 1),
        "round_s": round(sum(sum(v.values()) for v in trained) / max(len(trained), 1), 1),
        "peak_pss_mb": round(sampler.peak_pss),
        "peak_rss_mb": round(sampler.peak_rss),
        "peak_processes": sampler.peak_processes,
        "final_dice_mean": round(summary["final_dice_mean"], 3),
    }


def main() -> None:
    """Run every size and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    os.environ.setdefault("FLWR_HOME", str(work / ".flwr"))
    rows = []
    try:
        for n in args.sites:
            row = run_size(n, args.rounds, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        extra = int(last["hospitals"]) - int(first["hospitals"])
        growth = (float(last["peak_pss_mb"]) - float(first["peak_pss_mb"])) / extra
        print(json.dumps({"runs": rows, "pss_mb_per_extra_hospital": round(growth, 2)}, indent=2))


if __name__ == "__main__":
    main()
