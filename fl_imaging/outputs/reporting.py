"""The run folder: resolved config, per-round metrics, summary, checkpoints, report.

Contract (other tools rely on it)::

    outputs/<YYYYmmdd-HHMMSS>-<name>/
        config.yaml       the resolved run plan
        metrics.jsonl     one JSON object per (round, site, split)
        summary.json      rounds_completed, sites, final_dice_mean, final_dice_per_site, ...
        checkpoints/last.pt, checkpoints/best.pt
        report.md, report/index.html (+ its PNGs), tensorboard/
    outputs/latest -> <YYYYmmdd-HHMMSS>-<name>

Every file is written to a temporary name and renamed, so an interrupted run never
leaves a half-written summary or checkpoint; ``metrics.jsonl`` is appended line by
line and flushed.
"""

from __future__ import annotations

import html
import json
import math
import os
import pickle
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_imaging.outputs.records import Row

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TENSORBOARD_DIR = "tensorboard"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no stray .tmp (the old file stays)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


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
        self._writer: Any = None
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
        return folder

    @classmethod
    def reopen(cls, path: Path) -> RunFolder:
        """An existing run folder (to resume it); ``outputs/latest`` moves once it completes."""
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a run folder (no {CONFIG_FILE})")
        return cls(path)

    def mark_latest(self) -> None:
        """Point ``<outputs>/latest`` at this run: only for a run that completed.

        A failed or cut-short run stays in its own folder; ``latest`` (and docs/OUTPUTS.md's
        ``predict`` example) keeps pointing at the last run that completed.
        """
        outputs = self.path.parent
        tmp_link = outputs / f".{LATEST}.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(self.path.name)
        os.replace(tmp_link, outputs / LATEST)

    def truncate_metrics(self, last_round: int, *, drop_val_of_last: bool = False) -> int:
        """Drop ``metrics.jsonl`` rows after ``last_round`` (a round cut short); return how many.

        ``drop_val_of_last``: also drop the validation rows of ``last_round`` (a run that
        evaluates in its train step evaluates that model again in the next round).
        """
        path = self.path / METRICS_FILE
        if not path.is_file():
            return 0
        lines = [line for line in path.read_text().splitlines() if line.strip()]

        def keep(row: Mapping[str, Any]) -> bool:
            if drop_val_of_last and row[Row.ROUND] == last_round and row[Row.SPLIT] == "val":
                return False
            return int(row[Row.ROUND]) <= last_round

        kept = [line for line in lines if keep(json.loads(line))]
        _atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
        return len(lines) - len(kept)

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows to ``metrics.jsonl`` (NaN/Inf become ``null``) and to TensorBoard."""
        rows = list(rows)
        with (self.path / METRICS_FILE).open("a") as fh:
            for row in rows:
                fh.write(json.dumps(_json_safe(row), sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._tensorboard(rows)

    def _tensorboard(self, rows: list[Mapping[str, Any]]) -> None:
        # `tensorboard --logdir outputs` shows every run side by side
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path / TENSORBOARD_DIR))
        for row in rows:
            step, site, split = int(row[Row.ROUND]), row[Row.SITE], row[Row.SPLIT]
            for key in (Row.DICE_MEAN, Row.LOSS, Row.EPSILON_SPENT):
                value = row.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(f"{key}/{split}/{site}", value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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


class CheckpointReadError(ValueError):
    """A checkpoint file is unreadable, corrupt, or holds more than tensors and plain data."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, loaded with ``torch.load(weights_only=True)``: no code can run.

    A checkpoint holds tensors and plain containers only (fl-imaging writes nothing
    else), so a crafted file that would execute code on unpickling is refused.

    Raises:
        CheckpointReadError: one line naming the file: missing, corrupt, foreign or
            unsafe (written by an older fl-imaging with NumPy server state, or crafted).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointReadError(f"{path}: no such checkpoint") from exc
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        UnicodeDecodeError,
        AttributeError,
        TypeError,
    ) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointReadError(
            f"{path}: not a safe fl-imaging checkpoint ({type(exc).__name__}: {first}); it is "
            f"corrupt, foreign, or holds objects other than tensors and plain data, and is "
            f"not loaded"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointReadError(f"{path}: not an fl-imaging checkpoint (no state_dict)")
    return ckpt


PRIVACY_AUDIT_FILE = "privacy_audit.json"
AUDIT_TITLE = "Membership-inference audit (final model)"
AUDIT_NOTE = (
    "Loss-threshold attack at each site: how well the final model's loss tells the site's "
    "training cases from its validation cases (AUC 0.5: chance). Evidence, not a proof: "
    "epsilon bounds every attack, this shows one simple attack (fl-imaging privacy audit)."
)


def _few(row: Mapping[str, Any]) -> str:
    """A marker for an audit row with too few cases for its AUC to say much."""
    return " (few cases)" if min(row.get("members", 0), row.get("non_members", 0)) < 10 else ""


def read_privacy_audit(run_dir: Path) -> list[dict[str, Any]]:
    """The rows ``fl-imaging privacy audit`` wrote for a run (empty: none)."""
    path = run_dir / PRIVACY_AUDIT_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["sites"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [r for r in rows if isinstance(r, dict) and {"site", "auc", "low", "high"} <= set(r)]


def write_privacy_audit(run_dir: Path, rows: Sequence[Mapping[str, Any]], checkpoint: str) -> Path:
    """Store the audit's rows (AUCs and case counts only) in the run folder, atomically."""
    path = run_dir / PRIVACY_AUDIT_FILE
    payload = {"checkpoint": checkpoint, "time": time.time(), "sites": list(rows)}
    _atomic_write_bytes(path, json.dumps(payload, indent=2).encode())
    return path


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json``; empty when the run wrote none yet (or it is unreadable)."""
    try:
        return dict(json.loads((run_dir / SUMMARY_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def run_folders(outputs: Path) -> list[Path]:
    """Every run folder under ``outputs``, the most recently active last.

    Activity is the newest of ``summary.json`` and ``config.yaml`` (a resumed run
    rewrites its summary), so a failed run that is being retried comes last.
    """
    if not outputs.is_dir():
        return []
    runs = [p for p in outputs.iterdir() if (p / CONFIG_FILE).is_file() and not p.is_symlink()]

    def active(path: Path) -> float:
        return max(
            (path / f).stat().st_mtime for f in (CONFIG_FILE, SUMMARY_FILE) if (path / f).is_file()
        )

    return sorted(runs, key=lambda p: (active(p), p.name))


def last_started_run(outputs: Path) -> Path:
    """The most recently active run folder (what ``resume=latest`` continues).

    Raises:
        FileNotFoundError: ``outputs`` holds no run folder.
    """
    runs = run_folders(outputs)
    if not runs:
        raise FileNotFoundError(f"{outputs}: no run folder to resume")
    return runs[-1]


def find_run(outputs: Path, run_id: int | str) -> Path | None:
    """The run folder whose ``summary.json`` has Flower run id ``run_id`` (newest first)."""
    for path in reversed(run_folders(outputs)):
        if str(read_summary(path).get("run_id")) == str(run_id):
            return path
    return None


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
        if row.get(Row.SPLIT) == "val" and row.get(Row.DICE_MEAN) is not None:
            table[row[Row.SITE]][int(row[Row.ROUND])] = float(row[Row.DICE_MEAN])
    rounds = sorted({r for per_site in table.values() for r in per_site})
    return rounds, dict(table)


def region_table(rows: Iterable[Mapping[str, Any]]) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """Tumour-region Dice and HD95 (mm) of the last evaluated round, ``(round, {site: {col: v}})``.

    Columns are ``Dice WT``, ..., ``HD95 WT``, ... for the regions a run's
    ``data.label_scheme`` evaluates (rows with ``hd95_<region>``); empty without regions.
    """
    val = [r for r in rows if r.get(Row.SPLIT) == "val" and any(k.startswith("hd95_") for k in r)]
    if not val:
        return None, {}
    last = max(int(r[Row.ROUND]) for r in val)
    table: dict[str, dict[str, Any]] = {}
    for row in val:
        if int(row[Row.ROUND]) != last:
            continue
        regions = [k.removeprefix("hd95_") for k in row if k.startswith("hd95_")]
        table[row[Row.SITE]] = {
            **{f"Dice {g}": row.get(Row.dice_of(g)) for g in regions},
            **{f"HD95 {g} (mm)": row.get(Row.hd95_of(g)) for g in regions},
        }
    return last, table


def epsilon_table(
    rows: Iterable[Mapping[str, Any]],
) -> tuple[list[int], dict[str, dict[int, float]]]:
    """Cumulative DP epsilon of private sites as ``(rounds, {site: {round: epsilon}})``."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        eps = row.get(Row.EPSILON_SPENT)
        if row.get(Row.SPLIT) == "train" and isinstance(eps, int | float) and math.isfinite(eps):
            table[row[Row.SITE]][int(row[Row.ROUND])] = float(eps)
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


def loss_table(rows: Iterable[Mapping[str, Any]], split: str) -> dict[str, dict[int, float]]:
    """Loss per site and round for ``split`` (``train`` or ``val``)."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        loss = row.get(Row.LOSS)
        if row.get(Row.SPLIT) == split and isinstance(loss, int | float) and math.isfinite(loss):
            table[f"{row[Row.SITE]} ({split})"][int(row[Row.ROUND])] = float(loss)
    return dict(table)


REPORT_DIR = "report"
CROSS_SITE_FILE = "cross_site.json"


def write_cross_site(run_dir: Path, matrix: Mapping[str, Any]) -> Path:
    """Save the cross-site Dice matrix as ``cross_site.json`` and ``report/cross_site.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = json.dumps(_json_safe(dict(matrix)), indent=2) + "\n"
    _atomic_write_bytes(run_dir / CROSS_SITE_FILE, text.encode())
    models, sites = list(matrix["models"]), list(matrix["sites"])
    values = [[matrix["dice"].get(m, {}).get(s, float("nan")) for s in sites] for m in models]
    fig, ax = plt.subplots(figsize=(1.6 * len(sites) + 3, 0.5 * len(models) + 1.5), dpi=100)
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(sites)), sites, rotation=20, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    color="white" if v < 0.5 else "black",
                )
    ax.set_xlabel("validation data of site")
    ax.set_title("cross-site mean Dice (model x site)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    (run_dir / REPORT_DIR).mkdir(exist_ok=True)
    path = run_dir / REPORT_DIR / "cross_site.png"
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class _Report:
    """What a run's report shows, read once from its folder (Markdown and HTML share it)."""

    name: str
    rows: list[dict[str, Any]]  # metrics.jsonl
    summary: Mapping[str, Any]
    rounds: list[int]
    dice: dict[str, dict[int, float]]
    region_round: int | None
    regions: dict[str, dict[str, Any]]
    eps_rounds: list[int]
    eps: dict[str, dict[int, float]]
    budgets: Mapping[str, float]
    audit: list[dict[str, Any]]
    images: list[tuple[str, str]]  # (title, PNG file inside report/)
    overlays: Mapping[str, Path]
    overlay_note: str
    legend: Sequence[tuple[str, str]]
    config_text: str


def write_report(
    run_dir: Path,
    overlays: Mapping[str, Path] | None = None,
    overlay_note: str = "",
    legend: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``report.md`` and ``report/index.html`` (with its PNGs) for a run folder.

    Args:
        run_dir: the run folder.
        overlays: site -> PNG of prediction/ground-truth overlays inside ``report/``
            (made where the data is, see :mod:`fl_imaging.outputs.overlays`).
        overlay_note: shown instead of (or under) the overlays, e.g. why some are missing.
        legend: ``(label name, colour)`` pairs of the overlays.

    Returns:
        The path of ``report/index.html``.
    """
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    report = _read_report(run_dir, overlays or {}, overlay_note, legend)
    _draw_plots(report, run_dir, out)
    _atomic_write_bytes(run_dir / "report.md", "\n".join(_markdown(report)).encode())
    index = out / "index.html"
    _atomic_write_bytes(index, _html_page(report).encode())
    return index


def _read_report(
    run_dir: Path,
    overlays: Mapping[str, Path],
    overlay_note: str,
    legend: Sequence[tuple[str, str]],
) -> _Report:
    rows = read_metrics(run_dir)
    summary = read_summary(run_dir)
    rounds, dice = dice_table(rows)
    region_round, regions = region_table(rows)
    eps_rounds, eps = epsilon_table(rows)
    config_path = run_dir / CONFIG_FILE
    return _Report(
        name=run_dir.name,
        rows=rows,
        summary=summary,
        rounds=rounds,
        dice=dice,
        region_round=region_round,
        regions=regions,
        eps_rounds=eps_rounds,
        eps=eps,
        budgets=(summary.get("epsilon_budget_per_site") or {}) if eps else {},
        audit=read_privacy_audit(run_dir),
        images=[("Validation Dice per round", "dice.png"), ("Loss per round", "loss.png")],
        overlays=overlays,
        overlay_note=overlay_note,
        legend=legend,
        config_text=config_path.read_text() if config_path.is_file() else "",
    )


def _draw_plots(report: _Report, run_dir: Path, out: Path) -> None:
    """The report's PNGs (Dice, loss, epsilon); each one shown is listed in ``images``."""
    rows = report.rows
    _line_plot(report.dice, out / "dice.png", "validation mean foreground Dice", report.name)
    losses = {**loss_table(rows, "train"), **loss_table(rows, "val")}
    _line_plot(losses, out / "loss.png", "DiceCE loss", "loss per site (train, val)")
    if (run_dir / CROSS_SITE_FILE).is_file() and (out / "cross_site.png").is_file():
        report.images.append(("Cross-site Dice: models x sites' validation data", "cross_site.png"))
    if report.eps:
        title = "cumulative DP epsilon (dashed: budget)"
        _line_plot(report.eps, out / "epsilon.png", title, "privacy spent per site", report.budgets)
        report.images.append(("DP epsilon spent per site (DP-SGD at the site)", "epsilon.png"))


def _markdown(report: _Report) -> list[str]:
    """The lines of ``report.md``."""
    summary = report.summary
    lines = [f"# Run {report.name}", ""]
    if summary:
        lines += [
            f"- rounds completed: {summary.get('rounds_completed')}",
            f"- final mean Dice (mean over sites): {_fmt(summary.get('final_dice_mean'))}",
            f"- best round: {summary.get('best_round')} "
            f"(mean Dice {_fmt(summary.get('best_dice_mean'))})",
            f"- minutes: {_fmt(summary.get('minutes'))}",
            f"- status: {summary.get('status')}",
            *([f"- {traffic}"] if (traffic := traffic_line(summary)) else []),
            "",
        ]
        for title, problems in _site_problems(summary):
            lines += [f"## {title}", ""]
            lines += [f"- **{site}**: {reason}" for site, reason in problems.items()]
            lines += [""]
    lines += ["## Validation mean Dice per round", ""]
    lines += _table_lines(report.rounds, report.dice, mean=True)
    lines += ["", f"![Dice per round]({REPORT_DIR}/dice.png)", ""]
    return lines + _markdown_results(report)


def _markdown_results(report: _Report) -> list[str]:
    """``report.md`` after the Dice table: regions, cross-site, epsilon, audit, overlays."""
    lines: list[str] = []
    if report.regions:
        columns = list(next(iter(report.regions.values())))
        lines += [f"## Tumour regions, round {report.region_round} model (validation)", ""]
        lines += ["| site | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| {site} | " + " | ".join(_fmt(v.get(c)) for c in columns) + " |"
            for site, v in sorted(report.regions.items())
        ]
        lines += [""]
    if any(f == "cross_site.png" for _, f in report.images):
        lines += ["## Cross-site Dice (model x site)", ""]
        lines += [f"![cross-site]({REPORT_DIR}/cross_site.png)", ""]
    if report.eps:
        lines += ["## DP epsilon spent per site (cumulative, DP-SGD at the site)", ""]
        lines += _table_lines(report.eps_rounds, report.eps, mean=False)
        if report.budgets:
            budgets = sorted(report.budgets.items())
            lines += ["", "Budgets: " + ", ".join(f"{k} {v:g}" for k, v in budgets)]
        lines += ["", f"![epsilon per round]({REPORT_DIR}/epsilon.png)", ""]
    if report.audit:
        spent = report.summary.get("epsilon_spent_per_site") or {}
        lines += [f"## {AUDIT_TITLE}", "", AUDIT_NOTE, ""]
        lines += [
            "| site | attack AUC | 95 % interval | training / validation cases | epsilon spent |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['site']} | {r['auc']:.3f}{_few(r)} | {r['low']:.3f}-{r['high']:.3f} | "
            f"{r['members']} / {r['non_members']} | {_fmt(spent.get(r['site']))} |"
            for r in report.audit
        ]
        lines += [""]
    if report.overlays:
        lines += ["## Overlays (ground truth left, prediction right)", ""]
        lines += [
            f"![{site}]({REPORT_DIR}/{p.name})" for site, p in sorted(report.overlays.items())
        ]
    if report.overlay_note:
        lines += ["", report.overlay_note, ""]
    return lines


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h2.problem{color:#b00020}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:right}th{background:#f3f3f3}.figs img{max-width:48%;margin:.5%}
.overlay img{max-width:100%;image-rendering:pixelated}pre{background:#f7f7f7;padding:1em;
overflow:auto;font-size:.85em}.swatch{display:inline-block;width:1em;height:1em;
vertical-align:middle;margin:0 .3em 0 1em}.note{color:#555}
"""


def _html_table(rounds: list[int], table: Mapping[str, Mapping[int, float]], mean: bool) -> str:
    sites = sorted(table)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sites) + ("<th>mean</th>" if mean else "")
    body = []
    for r in rounds:
        values = [table[s].get(r) for s in sites]
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in values)
        if mean:
            present = [v for v in values if v is not None]
            cells += f"<td>{_fmt(sum(present) / len(present) if present else None)}</td>"
        body.append(f"<tr><td>{r}</td>{cells}</tr>")
    return f"<table><tr><th>round</th>{head}</tr>{''.join(body)}</table>"


def _html_page(report: _Report) -> str:
    esc, name = html.escape, report.name
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(name)}</title>",
        f"<style>{_CSS}</style></head><body><h1>Run {esc(name)}</h1>",
    ]
    if report.summary:
        parts += _html_summary(report.summary)
    parts.append("<h2>Plots</h2><div class='figs'>")
    parts += [f"<img src='{esc(f)}' alt='{esc(t)}' title='{esc(t)}'>" for t, f in report.images]
    parts.append("</div><h2>Validation mean Dice per round</h2>")
    parts.append(_html_table(report.rounds, report.dice, mean=True))
    parts += _html_results(report)
    parts += _html_overlays(report)
    parts.append(
        f"<h2>Resolved configuration</h2><pre>{esc(report.config_text)}</pre></body></html>"
    )
    return "\n".join(parts)


def _html_summary(summary: Mapping[str, Any]) -> list[str]:
    """The page's head: rounds, status, Dice, traffic, sites with problems, per-site table."""
    esc = html.escape
    final = summary.get("final_dice_per_site") or {}
    spent = summary.get("epsilon_spent_per_site") or {}
    parts = [
        f"<p>{summary.get('rounds_completed')} rounds, {_fmt(summary.get('minutes'))} min, "
        f"status {esc(str(summary.get('status')))}; final mean Dice "
        f"<b>{_fmt(summary.get('final_dice_mean'))}</b> (mean over sites); best round "
        f"{summary.get('best_round')}.</p>"
    ]
    if traffic := traffic_line(summary):
        parts.append(f"<p>{esc(traffic)}</p>")
    for title, problems in _site_problems(summary):
        items = "".join(
            f"<li><b>{esc(site)}</b>: {esc(reason)}</li>" for site, reason in problems.items()
        )
        parts.append(f"<h2 class='problem'>{esc(title)}</h2><ul>{items}</ul>")
    rows = "".join(
        f"<tr><td style='text-align:left'>{esc(site)}</td><td>{_fmt(dice)}</td>"
        f"<td>{_fmt(spent.get(site))}</td></tr>"
        for site, dice in sorted(final.items())
    )
    parts.append(
        f"<table><tr><th>site</th><th>final Dice</th><th>DP epsilon spent</th></tr>{rows}</table>"
    )
    return parts


def _html_results(report: _Report) -> list[str]:
    """Tumour regions, epsilon per round and the membership audit (each when present)."""
    esc, parts = html.escape, []
    if report.regions:
        columns = list(next(iter(report.regions.values())))
        head = "".join(f"<th>{esc(c)}</th>" for c in columns)
        body = "".join(
            f"<tr><td style='text-align:left'>{esc(site)}</td>"
            + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in columns)
            + "</tr>"
            for site, v in sorted(report.regions.items())
        )
        parts.append(
            f"<h2>Tumour regions, round {report.region_round} model (validation)</h2>"
            f"<table><tr><th>site</th>{head}</tr>{body}</table>"
        )
    if report.eps:
        parts.append("<h2>DP epsilon spent per site (cumulative)</h2>")
        parts.append(_html_table(report.eps_rounds, report.eps, mean=False))
    if report.audit:
        spent = report.summary.get("epsilon_spent_per_site") or {}
        body = "".join(
            f"<tr><td style='text-align:left'>{esc(r['site'])}</td><td>{r['auc']:.3f}{_few(r)}</td>"
            f"<td>{r['low']:.3f}-{r['high']:.3f}</td><td>{r['members']} / {r['non_members']}"
            f"</td><td>{_fmt(spent.get(r['site']))}</td></tr>"
            for r in report.audit
        )
        parts.append(
            f"<h2>{esc(AUDIT_TITLE)}</h2><p class='note'>{esc(AUDIT_NOTE)}</p><table>"
            "<tr><th>site</th><th>attack AUC</th><th>95 % interval</th>"
            "<th>training / validation cases</th><th>epsilon spent</th></tr>"
            f"{body}</table>"
        )
    return parts


def _html_overlays(report: _Report) -> list[str]:
    """Prediction vs ground truth: the legend, each site's overlay image, or why none."""
    esc = html.escape
    parts = ["<h2>Prediction vs ground truth (validation cases)</h2>"]
    if report.legend:
        swatches = "".join(
            f"<span class='swatch' style='background:{esc(c)}'></span>{esc(n)}"
            for n, c in report.legend
        )
        parts.append(
            f"<p>{swatches} &mdash; in each pair: ground truth left, prediction right.</p>"
        )
    for site, png in sorted(report.overlays.items()):
        parts.append(
            f"<h3>{esc(site)}</h3><div class='overlay'><img src='{esc(png.name)}' "
            f"alt='overlays {esc(site)}'></div>"
        )
    if report.overlay_note:
        parts.append(f"<p class='note'>{esc(report.overlay_note)}</p>")
    return parts


def _site_problems(summary: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Sections for sites that failed or refused (shown above everything else)."""
    sections = []
    if summary.get("failed_sites"):
        sections.append(
            (
                "Sites that FAILED (their traceback is in the site's log)",
                dict(summary["failed_sites"]),
            )
        )
    if summary.get("refused_by_policy"):
        sections.append(
            (
                "Sites that refused the run (their own privacy policy)",
                dict(summary["refused_by_policy"]),
            )
        )
    if summary.get("refused_nodes"):
        sections.append(
            (
                "Nodes the server refused (identity not verified)",
                {
                    f"node {r['node']} (claimed {r.get('claimed_site') or 'nothing'})": r["reason"]
                    for r in summary["refused_nodes"]
                },
            )
        )
    return sections


def traffic_line(summary: Mapping[str, Any]) -> str | None:
    """One line on the bytes a run sent (``summary.json``'s totals), or None if not recorded."""
    up, down = summary.get("bytes_up_total"), summary.get("bytes_down_total")
    if not up and not down:
        return None
    rounds = len(summary.get("bytes_per_round") or {})
    return (
        f"bytes sent (update codec {summary.get('codec', 'none')}): up {up / 1e6:.2f} MB, "
        f"down {down / 1e6:.2f} MB over {rounds} rounds (all sites, train and evaluate)"
    )


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))
