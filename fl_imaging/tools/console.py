"""What `fl-imaging run` shows of Flower's log stream, and where the rest goes.

``flwr run --stream`` relays every line of the SuperLink, the simulation engine (Ray)
and both apps: Flower's set-up notices, one line per sampling and aggregation call,
Ray's actor prefixes, library deprecation warnings, each site's per-epoch progress.
The console keeps the lines a user reads a run by (each round, each site's training
summary, Dice, epsilon, failures, refusals, the result) and drops known noise. Every
line, shown or not, is kept in the run folder's ``console.log``; ``--verbose`` shows
them all.

Never dropped, whatever the rules say: warnings and errors of fl-imaging, and any line
about privacy (Opacus, DP, epsilon, delta, the ledger, a policy) or secure aggregation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Ray prefixes every line an actor prints: "(ClientAppActor pid=123) "; with colour codes
_ACTOR_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\(\w+ pid=\d+\)(?:\x1b\[0m)? ?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# lines a user never needs in a local simulation (all kept in console.log)
NOISE = (
    re.compile(r"^INFO\s*:\s*$"),  # Flower's empty INFO line at the end of a stream
    re.compile(r"^INFO\s*:\s+Starting logstream for run_id"),
    re.compile(r"^INFO\s*:\s+Starting Flower Simulation"),
    re.compile(r"^WARNING\s*:\s+Since flwr 1\.32, default simulated SuperNodes"),
    re.compile(r"^INFO\s*:\s+Federation `[^`]*` \(\d+ simulated SuperNodes\)"),
    re.compile(r"^INFO\s*:\s+To change federation size"),
    re.compile(r"^INFO\s*:\s+flwr federation simulation-config"),
    re.compile(r"^Successfully installed \S+ to "),
    re.compile(r"^INFO\s*:\s+configure_(train|evaluate): Sampled \d+ nodes"),
    re.compile(r"^INFO\s*:\s+aggregate_(train|evaluate): Received \d+ results and 0 failures"),
    # a site's per-epoch progress (its per-round summary line stays)
    re.compile(r"^\d\d:\d\d:\d\d INFO \[[^\]]+ r\d+\] epoch \d+/\d+ loss"),
    # library deprecation notices and the source line Python prints under each
    re.compile(
        r"/site-packages/(ray|torchvision|monai|typer|click|pathspec)/.*"
        r"(DeprecationWarning|FutureWarning): "
    ),
    re.compile(r"^\s+warnings\.warn\("),
    re.compile(r"^\s+warn_deprecated\("),
    # the simulation engine's shutdown notice for each actor
    re.compile(r"WARNING\s*:\s*Manually terminating ClientAppActor"),
)
# whatever matches here is shown even when a noise rule matches it
KEEP = (
    re.compile(r"opacus|privacy|epsilon|\bdelta\b|ledger|policy|secure agg|secagg", re.I),
    re.compile(r"\bDP\b|DP-SGD|REFUSED|FAILED|ERROR|Traceback"),
)
# Flower prints some lines twice: coloured ("WARNING :   x") and timestamped
# ("12/02/2026 04:29:34:WARNING:x"); the message after either prefix identifies a line
_PREFIX = re.compile(r"^(?:\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:)?(?:DEBUG|INFO|WARNING|ERROR)\s*:\s*")
_DEBUG = re.compile(r"^(?:\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:)?DEBUG\s*:")


@dataclass
class ConsoleFilter:
    """Decides, line by line, what the console shows (``verbose``: everything)."""

    verbose: bool = False
    hidden: int = field(default=0, init=False)  # lines left to console.log only
    _last: str = field(default="", init=False)  # the message of the last line shown

    def show(self, line: str) -> str | None:
        """The line as the console shows it (Ray's actor prefix removed), or None to hide it.

        Hidden: a noise line (:data:`NOISE`), a DEBUG line, and the second copy of a
        message Flower prints twice in a row; never a line :data:`KEEP` matches.
        """
        if self.verbose:
            return line
        cleaned = _ACTOR_PREFIX.sub("", line)
        plain = _ANSI.sub("", cleaned).rstrip("\n")
        message = _PREFIX.sub("", plain).strip()
        kept = any(rule.search(plain) for rule in KEEP)
        noise = (
            any(rule.search(plain) for rule in NOISE)
            or _DEBUG.search(plain) is not None
            or (bool(message) and message == self._last)
        )
        if noise and not kept:
            self.hidden += 1
            return None
        self._last = message
        return cleaned
