"""Differential privacy at the site: budget planning, accounting, the persistent ledger, DP-SGD."""
