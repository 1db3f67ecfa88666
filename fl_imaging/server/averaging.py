"""The moving average of the global model over rounds (``strategy.global_ema_decay``).

Under DP-SGD each round's global model carries the noise the sites added that round; an
exponential moving average of the global models over rounds averages part of it out.
It is computed by the server from the models it already holds, so it is
post-processing: it costs no privacy and needs nothing new from the sites.

Training goes on from the plain aggregate; the average is the model the run evaluates,
checkpoints (``state_dict``; the aggregate is kept beside it for resume) and delivers.
The average starts at the first aggregated model: the initial model (random or a warm
start) is not folded in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class GlobalAverage:
    """Exponential moving average of the global model's tensors, one fold per round.

    ``average = decay * average + (1 - decay) * model`` for floating-point tensors
    (``torch.optim.swa_utils``' EMA update); other tensors (counters) take the newest
    model's values.

    Args:
        decay: in (0, 1); the weight of the average so far.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"strategy.global_ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.folded = 0  # global models averaged so far
        self._average: dict[str, torch.Tensor] = {}
        self._update = get_ema_multi_avg_fn(decay)

    def start(self, average: Mapping[str, torch.Tensor], folded: int) -> None:
        """Continue from an average of ``folded`` models (a resumed run's checkpoint)."""
        self._average = {k: v.detach().clone() for k, v in average.items()}
        self.folded = folded

    def fold(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold a round's global model into the average; return the average (a copy).

        Raises:
            ValueError: ``model`` has other tensors than the average.
        """
        if self.folded == 0:
            self.start(model, 0)
        elif set(model) != set(self._average):
            missing = sorted(set(self._average) ^ set(model))
            raise ValueError(f"the global model's tensors changed between rounds: {missing[:4]}")
        else:
            floats = [k for k, v in self._average.items() if torch.is_floating_point(v)]
            self._update(
                [self._average[k] for k in floats], [model[k].detach() for k in floats], None
            )
            for key in set(self._average) - set(floats):
                self._average[key] = model[key].detach().clone()
        self.folded += 1
        return {k: v.clone() for k, v in self._average.items()}
