"""The hospital's outbound audit log: one line per reply its site sent, kept at the site.

A data-protection officer asks "what exactly left our hospital?". Every reply of the
ClientApp (training updates, validation metrics, SecAgg+ protocol stages, errors) is
appended to ``<state_dir>/outbound_audit.jsonl`` before it is handed to Flower:

* ``time``, ``run_id``, ``round``, ``message_type`` and ``site``;
* ``bytes``: the reply as Flower serialises it (the server's ``bytes_up`` for it);
* ``sha256``: Flower's content address of the reply's records (``RecordDict.object_id``:
  the SHA-256 of their serialisation), which the server can recompute from what it got;
* ``arrays``: every array's name and shape, per record; ``metrics``: every metric;
  ``configs``: every config value (byte strings as their length only);
* ``epsilon_spent`` when the reply reports one; ``error`` for an error reply.

The log is append-only (``O_APPEND``, 0600), survives restarts and is never sent.
``fl-imaging site audit`` prints it as a table. This module never imports torch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fl_imaging.site.private_files import append_private

AUDIT_LOG = "outbound_audit.jsonl"


def _value(value: Any) -> Any:
    """A config or metric value as JSON: bytes as their size, non-finite floats as text."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def describe_records(content: Any) -> dict[str, Any]:
    """Names and shapes of every array, and every metric and config value, of a RecordDict."""
    arrays = {
        name: {key: list(array.shape) for key, array in record.items()}
        for name, record in content.array_records.items()
    }
    metrics = {
        name: {key: _value(v) for key, v in record.items()}
        for name, record in content.metric_records.items()
    }
    configs = {
        name: {key: _value(v) for key, v in record.items()}
        for name, record in content.config_records.items()
    }
    return {"arrays": arrays, "metrics": metrics, "configs": configs}


def audit_entry(
    *,
    site: str,
    run_id: int,
    server_round: int | None,
    message_type: str,
    num_bytes: int,
    sha256: str,
    records: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One audit line (see the module docstring for the fields)."""
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": run_id,
        "round": server_round,
        "message_type": message_type,
        "site": site,
        "bytes": num_bytes,
        "sha256": sha256,
    }
    if records is not None:
        entry.update(records)
        spent = [m.get("epsilon-spent") for m in records.get("metrics", {}).values()]
        spent = [s for s in spent if isinstance(s, int | float)]
        if spent:
            entry["epsilon_spent"] = spent[0]
    if error is not None:
        entry["error"] = error
    return entry


def append_audit(state_dir: Path, entry: Mapping[str, Any]) -> None:
    """Append ``entry`` to the site's audit log (created 0600; the folder 0700)."""
    append_private(state_dir / AUDIT_LOG, json.dumps(entry, sort_keys=False) + "\n")


def read_audit(state_dir: Path) -> Iterator[dict[str, Any]]:
    """The entries of a site's audit log, oldest first (none when it has none)."""
    path = state_dir / AUDIT_LOG
    if not path.is_file():
        return
    with path.open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def audit_table(entries: list[dict[str, Any]]) -> list[str]:
    """The lines ``fl-imaging site audit`` prints: one per reply sent."""
    lines = [
        f"{'time':<24} {'run':>20} {'round':>5} {'type':<9} {'bytes':>10} {'sha256':<12} "
        f"{'arrays':>6} {'epsilon':>8}  metrics / error"
    ]
    for e in entries:
        arrays = sum(len(r) for r in e.get("arrays", {}).values())
        metrics = {k: v for m in e.get("metrics", {}).values() for k, v in m.items()}
        shown = e.get("error") or ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        eps = e.get("epsilon_spent")
        eps_text = f"{eps:.3f}" if isinstance(eps, int | float) else "-"
        lines.append(
            f"{e['time']:<24} {e['run_id']!s:>20} {e['round']!s:>5} {e['message_type']:<9} "
            f"{e['bytes']:>10} {e['sha256'][:12]:<12} {arrays:>6} {eps_text:>8}  {shown}"
        )
    return lines
