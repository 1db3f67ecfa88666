"""The `fl-imaging` command and what it runs: launcher, sweeps, predict, bundles, gateway."""
