"""Pre-flight privacy plan: what DP-SGD a private site will run, before any training.

For each private site, from its manifest and the run plan, the same figures the site
computes when its first round starts (:func:`fl_imaging.site.rounds.train_round`): training
cases ``N``, batch ``B``, steps per epoch ``ceil(N / B)`` and so the Poisson sampling rate
``q = 1 / steps per epoch``, steps per round and in all, the noise multiplier the
accountant needs for what is left of the budget, and the epsilon after each round.

``noise_to_signal`` is the noise std on the *averaged* gradient relative to the
clipping norm, ``sigma / (q N)``: every weight of each step's update gets Gaussian noise
of that many clipping norms. The boundary between runs that learnt and runs that did not
is not sharp (what the global model gets is every site's noise together); the measured
runs are in docs/RESULTS.md, "Private training". A site at or above :data:`NOISY` is
warned about, with what would lower it; Adam under DP-SGD is warned about whatever the
noise (it learnt nothing here where SGD learnt).

``run_signal_to_noise`` sums over the run: ``T`` steps add at most ``T`` clipping norms
of signal and noise of norm about ``sqrt(T)`` times each step's. Because the accountant
raises sigma with the steps, larger batches, more epochs or more rounds at the same budget
leave it almost where it was (in the measured runs, docs/RESULTS.md); epsilon,
more patients and fewer trained weights raise it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fl_imaging.privacy.accounting import History, epsilon_of, noise_for_budget

# noise std on the averaged gradient, in clipping norms, from which sites are warned
# about: above the sites of every run that learnt here (docs/RESULTS.md, "Private training")
NOISY = 0.25


@dataclass(frozen=True)
class SitePrivacyPlan:
    """The DP-SGD a private site will run in this run (before it trains)."""

    site: str
    num_train: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    total_steps: int
    rounds: int
    epsilon_budget: float
    delta: float
    accountant: str
    already_spent: float
    noise_multiplier: float | None  # None: the budget is already spent
    epsilon_per_round: list[float] = field(default_factory=list)
    # weights that get noise (the trainable ones); 0: unknown
    num_weights: int = 0
    optimizer: str = "sgd"

    @property
    def expected_batch(self) -> float:
        """Patients per step on average (Poisson sampling: q N)."""
        return self.sample_rate * self.num_train

    @property
    def noise_to_signal(self) -> float | None:
        """Noise std on the averaged gradient per weight, in clipping norms: sigma / (q N)."""
        if self.noise_multiplier is None:
            return None
        return self.noise_multiplier / self.expected_batch

    @property
    def noise_norm(self) -> float | None:
        """Norm of each step's noise on the averaged gradient, in clipping norms.

        ``noise_to_signal * sqrt(weights)``; the clipped signal's norm is at most 1.
        """
        if self.noise_to_signal is None or not self.num_weights:
            return None
        return self.noise_to_signal * math.sqrt(self.num_weights)

    @property
    def run_signal_to_noise(self) -> float | None:
        """The most signal the run's steps can add up, over the noise they add up.

        ``sqrt(total_steps) / noise_norm``: ``T`` steps move the model by at most ``T``
        clipping norms of clipped signal (every step's averaged gradient aligned) and by
        noise of norm about ``sqrt(T) * noise_norm``. At a fixed budget it barely moves with
        the batch, the epochs or the rounds (the accountant raises sigma with the steps);
        it grows with epsilon, about in proportion to the patients, and with fewer weights.
        """
        if self.noise_norm is None or not self.total_steps:
            return None
        return math.sqrt(self.total_steps) / self.noise_norm

    def warnings(self) -> list[str]:
        """What in this plan is known not to learn, and what would change it."""
        if self.noise_multiplier is None:
            return [
                f"site {self.site}: its budget is spent ({self.already_spent:.3f} of "
                f"{self.epsilon_budget:g}); it will not train"
            ]
        found = []
        if self.optimizer == "adam":
            found.append(
                f"site {self.site}: train.optimizer=adam under DP-SGD: Adam scales every "
                f"weight's noisy gradient to a full step; measured here it learnt nothing "
                f"where SGD with momentum learnt (docs/RESULTS.md). Use train.optimizer=sgd"
            )
        ratio = self.noise_to_signal
        if ratio is not None and ratio >= NOISY:
            found.append(
                f"site {self.site}: the noise on each averaged gradient is {ratio:.2f} "
                f"clipping norms per weight (sigma {self.noise_multiplier:.2f} / "
                f"{self.expected_batch:.1f} patients per step); private runs with every "
                f"site at {NOISY:g} or more ended far below those at less noise, with "
                "either network (docs/RESULTS.md). "
                "What lowers it: "
                + (
                    "every case in each step (train.batch_size=0: q = 1), "
                    if self.sample_rate < 1
                    else ""
                )
                + "a larger epsilon, more patients; fixed features and a small head "
                "(model=features_dp: few trained weights, each with a share of every "
                "clipped gradient); a smaller UNet or privacy.trainable lowers the "
                "noise's norm too, but measured not the Dice (its output stage keeps "
                "most of each clipped gradient); a start that needs less signal: "
                "model.init_checkpoint (make synthetic-start costs no privacy)"
            )
        return found


def plan_site(
    *,
    site: str,
    num_train: int,
    batch_size: int,
    epochs: int,
    rounds: int,
    epsilon: float,
    delta: float,
    accountant: str,
    history: Sequence[Sequence[float]] = (),
    num_weights: int = 0,
    optimizer: str = "sgd",
) -> SitePrivacyPlan:
    """The plan of one private site, as its first round of the run will compute it.

    ``history`` is the site's ledger history (earlier runs): the noise is planned for
    what is left, as the site does. ``num_weights``: the weights DP-SGD trains (and
    noises); ``optimizer``: ``train.optimizer`` (both only shape the warnings).
    """
    steps_per_epoch = math.ceil(num_train / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps = epochs * steps_per_epoch
    prior: History = [(float(s), float(q), int(n)) for s, q, n in history]
    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    try:
        sigma: float | None = noise_for_budget(
            history=prior,
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps * rounds,
            accountant=accountant,
        )
    except ValueError:
        sigma = None
    per_round = []
    if sigma is not None:
        per_round = [
            epsilon_of(
                [*prior, (sigma, sample_rate, steps * r)], delta=delta, accountant=accountant
            )
            for r in range(1, rounds + 1)
        ]
    return SitePrivacyPlan(
        site=site,
        num_train=num_train,
        batch_size=batch_size,
        sample_rate=sample_rate,
        steps_per_round=steps,
        total_steps=steps * rounds,
        rounds=rounds,
        epsilon_budget=epsilon,
        delta=delta,
        accountant=accountant,
        already_spent=spent,
        noise_multiplier=sigma,
        epsilon_per_round=per_round,
        num_weights=num_weights,
        optimizer=optimizer,
    )


def plan_lines(plans: Sequence[SitePrivacyPlan]) -> list[str]:
    """The table ``fl-imaging privacy plan`` and ``fl-imaging run`` print."""
    lines = [
        f"{'site':<18} {'cases':>5} {'batch':>5} {'q':>6} {'steps/rd':>8} {'steps':>6} "
        f"{'sigma':>7} {'noise/C':>7} {'|noise|':>7} {'S/N run':>7} {'epsilon':>8} "
        f"{'delta':>8}  "
        f"epsilon after each round"
    ]
    for p in plans:
        sigma = f"{p.noise_multiplier:.3f}" if p.noise_multiplier is not None else "spent"
        ratio = f"{p.noise_to_signal:.3f}" if p.noise_to_signal is not None else "-"
        norm = f"{p.noise_norm:.1f}" if p.noise_norm is not None else "-"
        snr = p.run_signal_to_noise
        run_snr = f"{snr:.3f}" if snr is not None else "-"
        rounds = " ".join(f"{e:.2f}" for e in p.epsilon_per_round)
        lines.append(
            f"{p.site:<18} {p.num_train:>5} {p.batch_size:>5} {p.sample_rate:>6.3f} "
            f"{p.steps_per_round:>8} {p.total_steps:>6} {sigma:>7} {ratio:>7} {norm:>7} "
            f"{run_snr:>7} {p.epsilon_budget:>8g} {p.delta:>8.1g}  {rounds}"
        )
    if any(p.num_weights for p in plans):
        weights = max(p.num_weights for p in plans)
        lines.append(
            f"noise/C: noise std per weight on each averaged gradient, in clipping norms; "
            f"|noise|: its norm over the {weights:,} trained weights (the clipped signal's "
            f"norm is at most 1); S/N run: sqrt(steps) / |noise|, the most clipped signal "
            f"the run's steps can add up over the noise they add up: batch, epochs and "
            f"rounds barely move it at a fixed budget, epsilon and patients do; an upper "
            f"bound: it assumes the signal spreads over the trained weights as the noise does"
        )
    for p in plans:
        lines += [f"warning: {w}" for w in p.warnings()]
    return lines
