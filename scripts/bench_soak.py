"""Soak: a long deployment run (tiny model, many rounds); memory of every process each round.

Starts a real deployment with scripts/deploy/federation.py (TLS, SuperNode authentication,
the Fleet-only gateway, one SuperNode and one warm executor per hospital, on loopback),
runs the demo experiment shrunk to tiny volumes and the tiny UNet for ``--rounds`` rounds,
and each time the run's ``summary.json`` says a round completed samples the resident
memory (RSS, /proc/<pid>/status) of: the SuperLink, its SuperExec and ServerApp children,
the gateway, and each hospital's SuperNode and warm executor (a ClientApp forked by the
executor lives for one message; it is counted with its executor when it is alive).

Prints one JSON object: per process, RSS (MB) at round ``--warmup`` and at the end, the
growth between them, the peak, and the whole curve (one value per round). Nothing is
asserted: it is a measurement (docs/BENCHMARKS.md says what it showed).

    python scripts/bench_soak.py --rounds 120 --out soak.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl_imaging.data.synthetic import generate_federation  # noqa: E402
from fl_imaging.tools.processes import free_port_range  # noqa: E402

FEDERATION = ROOT / "scripts" / "deploy" / "federation.py"
SITES = ["hospital_a", "hospital_b", "hospital_c"]


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process on this machine."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmd(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(p.decode(errors="replace") for p in raw[:3])


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def sample(state: dict) -> dict[str, float]:
    """RSS (MB) of each long-lived process of the deployment (children named by role)."""
    kids = _children()
    rss: dict[str, float] = {}
    superlink = state["superlink"]
    rss["superlink"] = _rss_mb(superlink)
    for child in _tree(superlink, kids)[1:]:
        cmd = _cmd(child)
        role = "serverapp" if "serverapp" in cmd else "superexec" if "superexec" in cmd else None
        if role:
            rss[role] = rss.get(role, 0.0) + _rss_mb(child)
    rss["gateway"] = _rss_mb(state["gateway"]) if state.get("gateway") else 0.0
    for site, node in state["nodes"].items():
        supernode, *executors = node["pids"]
        rss[f"{site}/supernode"] = _rss_mb(supernode)
        for executor in executors:
            rss[f"{site}/executor"] = _rss_mb(executor)
            live = _tree(executor, kids)[1:]  # ClientApps forked for the current message
            rss[f"{site}/clientapps"] = sum(_rss_mb(p) for p in live)
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10, help="the round growth counts from")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", type=Path, help="keep the deployment folder here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        folder = (args.keep or Path(tmp)).resolve()
        data = folder / "data"
        manifests = generate_federation(data, num_sites=3, total_cases=18, fov_mm=32.0, seed=0)
        base = [sys.executable, str(FEDERATION), "--dir", str(folder)]
        port = free_port_range(len(SITES) + 2, 31000, 60000)
        up = [*base, "up", "--port", str(port), "--data-dir", str(data), "--sites", *SITES]
        subprocess.run(up, check=True, stdout=subprocess.DEVNULL)
        try:
            return _soak(folder, base, manifests, args)
        finally:
            subprocess.run([*base, "down"], check=False, stdout=subprocess.DEVNULL)


def _soak(folder: Path, base: list[str], manifests: list[Path], args: argparse.Namespace) -> int:
    state = json.loads((folder / "deployment.json").read_text())
    outputs = folder / "outputs"
    overrides = [
        *[f"federation.sites.{i}.manifest={m}" for i, m in enumerate(manifests)],
        "model=unet_tiny",
        "data.patch_size=[16,16,16]",
        "train.local_epochs=1",
        f"rounds={args.rounds}",
        "strategy.cross_site_epochs=0",
        f"paths.root={folder}",
        f"paths.outputs={outputs}",
    ]
    log = (folder / "soak-run.log").open("w")
    run = subprocess.Popen(
        [*base, "run", "--overrides", " ".join(overrides)], stdout=subprocess.PIPE, stderr=log
    )
    started = time.monotonic()
    curve: list[dict] = []
    done = -1
    while run.poll() is None:
        time.sleep(0.2)
        summaries = list(outputs.glob("*-demo/summary.json"))
        if not summaries:
            continue
        try:
            completed = int(json.loads(summaries[0].read_text()).get("rounds_completed", 0))
        except (OSError, ValueError):
            continue  # being replaced
        if completed > done:
            done = completed
            curve.append(
                {"round": done, "t": round(time.monotonic() - started, 1), **sample(state)}
            )
            if done % 10 == 0:
                print(f"round {done}: {curve[-1]}", file=sys.stderr, flush=True)
    out, _ = run.communicate()
    log.close()
    outcome = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    result = {
        "rounds": done,
        "seconds": round(time.monotonic() - started, 1),
        "status": outcome.get("status"),
        "processes": _growth(curve, args.warmup),
        "curve": curve,
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if outcome.get("status") == "finished:completed" else 1


def _growth(curve: list[dict], warmup: int) -> dict[str, dict[str, float]]:
    """Per process: RSS at the warm-up round and at the end, growth, peak (MB)."""
    if not curve:
        return {}
    start = next((c for c in curve if c["round"] >= warmup), curve[0])
    end = curve[-1]
    names = [k for k in end if k not in ("round", "t")]
    return {
        name: {
            f"round_{start['round']}": round(start.get(name, 0.0), 1),
            f"round_{end['round']}": round(end.get(name, 0.0), 1),
            "growth": round(end.get(name, 0.0) - start.get(name, 0.0), 1),
            "peak": round(max(c.get(name, 0.0) for c in curve), 1),
        }
        for name in names
    }


if __name__ == "__main__":
    raise SystemExit(main())
