"""The network and the local training and evaluation loops (no Flower)."""
