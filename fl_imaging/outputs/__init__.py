"""The run folder: metrics, checkpoints, summary, report, overlays."""
