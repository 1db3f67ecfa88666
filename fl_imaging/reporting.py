"""The run folder: resolved config, per-round metrics, summary, checkpoints, report.

Contract (other tools rely on it)::

    outputs/<YYYYmmdd-HHMMSS>-<name>/
        config.yaml       the resolved run plan
        metrics.jsonl     one JSON object per (round, site, split)
        summary.json      rounds_completed, sites, final_dice_mean, final_dice_per_site, ...
        checkpoints/last.pt, checkpoints/best.pt
        report.md, dice.png
    outputs/latest -> <YYYYmmdd-HHMMSS>-<name>

Every file is written to a temporary name and renamed, so an interrupted run never
leaves a half-written summary or checkpoint; ``metrics.jsonl`` is appended line by
line and flushed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class RunFolder:
    """Writer for one run's folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, outputs: Path, name: str, config_yaml: str) -> RunFolder:
        """Make ``outputs/<timestamp>-<name>``, write its config, point ``outputs/latest`` at it."""
        outputs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = outputs / f"{stamp}-{name}"
        suffix = 1
        while path.exists():  # two runs started within one second (sweeps)
            suffix += 1
            path = outputs / f"{stamp}-{name}-{suffix}"
        folder = cls(path)
        _atomic_write_bytes(path / CONFIG_FILE, config_yaml.encode())
        link = outputs / LATEST
        tmp_link = outputs / f".{LATEST}.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(path.name)
        os.replace(tmp_link, link)
        return folder

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows to ``metrics.jsonl`` (NaN/Inf become ``null``)."""
        with (self.path / METRICS_FILE).open("a") as fh:
            for row in rows:
                fh.write(json.dumps(_json_safe(row), sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """(Re)write ``summary.json``."""
        text = json.dumps(_json_safe(summary), indent=2) + "\n"
        _atomic_write_bytes(self.path / SUMMARY_FILE, text.encode())

    def save_checkpoint(
        self, name: str, state_dict: Mapping[str, torch.Tensor], **meta: Any
    ) -> Path:
        """Save ``{"state_dict": ..., **meta}`` to ``checkpoints/<name>.pt``."""
        path = self.path / CHECKPOINT_DIR / f"{name}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"state_dict": dict(state_dict), **meta}, tmp)
        os.replace(tmp, path)
        return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl``."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dice_table(rows: Iterable[Mapping[str, Any]]) -> tuple[list[int], dict[str, dict[int, float]]]:
    """Validation mean Dice as ``(rounds, {site: {round: dice}})``."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row.get("split") == "val" and row.get("dice_mean") is not None:
            table[row["site"]][int(row["round"])] = float(row["dice_mean"])
    rounds = sorted({r for per_site in table.values() for r in per_site})
    return rounds, dict(table)


def epsilon_table(
    rows: Iterable[Mapping[str, Any]],
) -> tuple[list[int], dict[str, dict[int, float]]]:
    """Cumulative DP epsilon of private sites as ``(rounds, {site: {round: epsilon}})``."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        eps = row.get("epsilon_spent")
        if row.get("split") == "train" and isinstance(eps, int | float) and math.isfinite(eps):
            table[row["site"]][int(row["round"])] = float(eps)
    rounds = sorted({r for per_site in table.values() for r in per_site})
    return rounds, dict(table)


def _line_plot(
    table: Mapping[str, Mapping[int, float]],
    path: Path,
    ylabel: str,
    title: str,
    budgets: Mapping[str, float] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for site in sorted(table):
        xs = sorted(table[site])
        (line,) = ax.plot(xs, [table[site][r] for r in xs], marker="o", label=site)
        if budgets and site in budgets:
            ax.axhline(budgets[site], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if table:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table_lines(
    rounds: list[int], table: Mapping[str, Mapping[int, float]], mean: bool
) -> list[str]:
    sites = sorted(table)
    lines = ["| round | " + " | ".join(sites) + (" | mean |" if mean else " |")]
    lines.append("|---" * (len(sites) + 1 + int(mean)) + "|")
    for r in rounds:
        values = [table[s].get(r) for s in sites]
        cells = " | ".join(_fmt(v) for v in values)
        if mean:
            present = [v for v in values if v is not None]
            cells += f" | {_fmt(sum(present) / len(present) if present else None)}"
        lines.append(f"| {r} | {cells} |")
    return lines


def write_report(run_dir: Path) -> Path:
    """Write ``report.md``, ``dice.png`` and, for private runs, ``epsilon.png``."""
    import matplotlib

    matplotlib.use("Agg")

    rows = read_metrics(run_dir)
    rounds, table = dice_table(rows)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    _line_plot(table, run_dir / "dice.png", "validation mean foreground Dice", run_dir.name)

    lines = [f"# Run {run_dir.name}", ""]
    if summary:
        lines += [
            f"- rounds completed: {summary.get('rounds_completed')}",
            f"- final mean Dice (mean over sites): {_fmt(summary.get('final_dice_mean'))}",
            f"- best round: {summary.get('best_round')} "
            f"(mean Dice {_fmt(summary.get('best_dice_mean'))})",
            f"- minutes: {_fmt(summary.get('minutes'))}",
            "",
        ]
    lines += ["## Validation mean Dice per round", ""]
    lines += _table_lines(rounds, table, mean=True)
    lines += ["", "![Dice per round](dice.png)", ""]
    eps_rounds, eps = epsilon_table(rows)
    if eps:
        budgets = summary.get("epsilon_budget_per_site") or {}
        _line_plot(eps, run_dir / "epsilon.png", "cumulative DP epsilon (dashed: budget)",
                   "privacy spent per site", budgets)  # fmt: skip
        lines += ["## DP epsilon spent per site (cumulative, DP-SGD at the site)", ""]
        lines += _table_lines(eps_rounds, eps, mean=False)
        if budgets:
            lines += ["", "Budgets: " + ", ".join(f"{k} {v:g}" for k, v in sorted(budgets.items()))]
        lines += ["", "![epsilon per round](epsilon.png)", ""]
    path = run_dir / "report.md"
    _atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))
