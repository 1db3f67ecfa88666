"""The two Flower entry points (ServerApp, ClientApp): thin wiring, no torch or MONAI."""
