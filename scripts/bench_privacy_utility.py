"""Privacy-utility benchmark: final Dice per site for each epsilon, every site private.

One real federated run (``fl-imaging run``'s simulation, the same code path as a user's
run) per epsilon in ``--epsilons`` (``none``: every site without DP-SGD), each with a
fresh state folder (so a fresh privacy ledger), the same rounds and the same settings
otherwise. Prints one JSON object: per setting the final Dice per site and mean, the
per-round mean Dice, the epsilon each site spent, its noise multiplier and the minutes.

    .venv/bin/python scripts/bench_privacy_utility.py --epsilons 1 8 none > pu.json
    .venv/bin/python scripts/bench_privacy_utility.py --epsilons 8 -- \\
        model=unet train.optimizer=adam train.lr=1e-3      # one lever at a time
    .venv/bin/python scripts/bench_privacy_utility.py --plot docs/privacy_utility.png pu.json

``none`` trains every site without clipping, with the experiment's optimiser at
``train.lr``; the private runs use ``privacy.lr`` where it is set (``hippocampus_private``:
0.3 at ``max_grad_norm`` 0.1, and ``train.lr`` 0.03 for sites without DP), so ``none``
is that optimiser without DP, not the private step without noise (docs/RESULTS.md).

Tuning on these figures spends the privacy of the patients whose validation cases
score them; the defaults were chosen on synthetic data and non-private runs
(docs/RESULTS.md says which figure came from where).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fl_imaging.config import compose
from fl_imaging.outputs.reporting import read_summary
from fl_imaging.privacy.ledger import read_ledger
from fl_imaging.tools.launch import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def setting_overrides(num_sites: int, epsilon: float | None, state: Path, name: str) -> list[str]:
    """Hydra overrides giving every site ``epsilon`` (None: no DP) and a fresh state folder."""
    value = "null" if epsilon is None else f"{epsilon:g}"
    return [
        *(f"federation.sites.{i}.privacy.epsilon={value}" for i in range(num_sites)),
        f"paths.state={state}",
        f"name={name}",
    ]


def run_setting(
    experiment: str, overrides: list[str], epsilon: float | None, scratch: Path
) -> dict[str, Any]:
    """One federated run at ``epsilon``; its figures (or its error)."""
    label = "none" if epsilon is None else f"{epsilon:g}"
    plan = compose(experiment, overrides)
    if epsilon is None:
        logging.warning(
            "epsilon none: every site trains without clipping at train.lr=%g (the private "
            "runs clip each patient's gradient to privacy.max_grad_norm=%g and step at "
            "privacy.lr=%s)",
            plan.train.lr,
            plan.privacy.max_grad_norm,
            "null: train.lr" if plan.privacy.lr is None else f"{plan.privacy.lr:g}",
        )
    items = [
        *overrides,
        *setting_overrides(
            len(plan.federation.sites), epsilon, scratch / f"state-eps-{label}", f"pu-eps-{label}"
        ),
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Flower's log stream; stdout is the JSON
        outcome = run_simulation(experiment, items, project_root=ROOT)
    minutes = (time.perf_counter() - start) / 60
    if outcome.run_dir is None:
        return {"epsilon": label, "status": outcome.status, "minutes": round(minutes, 2)}
    summary = read_summary(outcome.run_dir)
    run_plan = compose(experiment, items)
    sigma: dict[str, float] = {}
    for site in run_plan.federation.sites:  # the noise each site planned (its own ledger)
        ledger = read_ledger(run_plan.site_state_dir(site))
        if ledger is not None and ledger.plan is not None:
            sigma[site.name] = round(ledger.plan.noise_multiplier, 4)
    per_round = summary.get("dice_mean_per_round", {})
    return {
        "epsilon": label,
        "status": summary.get("status"),
        "final_dice_mean": summary.get("final_dice_mean"),
        "final_dice_per_site": summary.get("final_dice_per_site"),
        "dice_mean_per_round": {int(k): round(v, 4) for k, v in per_round.items()},
        "epsilon_spent_per_site": summary.get("epsilon_spent_per_site"),
        "noise_multiplier_per_site": sigma,
        "minutes": round(minutes, 2),
        "run_dir": str(outcome.run_dir),
    }


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    """Final mean Dice against epsilon (log axis), one line per report; no-DP as dashes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, report in enumerate(reports):
        runs = [r for r in report["runs"] if r.get("final_dice_mean") is not None]
        private = sorted(
            (float(r["epsilon"]), r["final_dice_mean"]) for r in runs if r["epsilon"] != "none"
        )
        label = report.get("label") or " ".join(report.get("overrides", [])) or "recipe"
        if private:
            line = ax.plot(*zip(*private, strict=True), marker="o", label=label)[0]
            colour = line.get_color()
        else:
            colour = f"C{i}"
        for r in runs:
            if r["epsilon"] == "none":
                ax.axhline(r["final_dice_mean"], ls="--", color=colour, label=f"{label}: no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at every site (delta 1e-5)")
    ax.set_ylabel("final mean validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def emit(report: dict[str, Any]) -> int:
    """Print ``report`` as JSON on stdout; 0 when every run in it finished, else 1."""
    print(json.dumps(report, indent=2))
    return 0 if all(r.get("status") == "finished" for r in report["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    """Run every setting; print the JSON; exit 1 when a run did not finish."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--experiment", default="hippocampus_private")
    parser.add_argument(
        "--epsilons",
        nargs="+",
        default=["1", "2", "4", "8", "16", "none"],
        help="epsilon of every site per run; none: without DP-SGD",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the site state folders here (default: a temporary folder)",
    )
    parser.add_argument("--label", default="", help="name of this setting in the plot")
    parser.add_argument(
        "--plot",
        type=Path,
        nargs="+",
        metavar=("PNG", "JSON"),
        help="only plot: PNG from earlier JSON outputs of this script (no runs)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.plot:
        png, *inputs = args.plot
        plot([json.loads(p.read_text()) for p in inputs], png)
        print(png)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    results = []
    with contextlib.ExitStack() as stack:
        scratch = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pu-")))
        for epsilon in epsilons:
            result = run_setting(args.experiment, list(args.overrides), epsilon, scratch)
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
    report = {
        "experiment": args.experiment,
        "label": args.label,
        "overrides": args.overrides,
        "runs": results,
    }
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
