"""The secret randomness of DP-SGD: noise and Poisson sampling the server cannot reproduce.

DP-SGD protects a patient only if the adversary does not know the noise. The run
config (and so ``plan.seed``) is composed by the coordinator, so nothing seeded from it
may drive the privacy noise or the choice of which patients a step samples. Every
private round therefore draws a fresh 64-bit seed from the operating system's
cryptographically secure source (:func:`os.urandom`), seeds one
:class:`torch.Generator` for the Gaussian noise and one for the Poisson sampling
with it, and forgets it: the seed is never derived from the configuration, never
written to disk and never sent.

What this does and does not give (docs/PRIVACY.md):

* The noise and batch membership of every step are unpredictable to anyone without
  the site's process memory: two rounds with the same config and data differ.
* PyTorch's generator (Mersenne Twister on CPU, Philox on CUDA) is not itself a
  cryptographic generator: an observer of many raw outputs could predict later ones.
  No raw output leaves the site: each noise draw is added to a clipped gradient sum
  and only the trained weights (after many such steps) are released.
* Opacus' ``secure_mode`` noise (the sum of four Gaussian draws, which defeats the
  floating-point attacks on Gaussian sampling) is switched on for the optimizer: see
  :func:`fl_imaging.privacy.dp_sgd.train_private`. Opacus' own ``secure_mode`` of the
  PrivacyEngine would also replace the generator by ``torchcsprng``, which has no
  build for current PyTorch.
"""

from __future__ import annotations

import os

import torch

SEED_BYTES = 8  # torch.Generator seeds are 64-bit


def secret_seed() -> int:
    """A 64-bit seed from the OS's cryptographically secure source (never stored or sent)."""
    return int.from_bytes(os.urandom(SEED_BYTES), "little")


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by :func:`secret_seed` (nothing the server knows)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secret_seed())
    return generator
