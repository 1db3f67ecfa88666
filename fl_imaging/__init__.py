"""fl-imaging: federated 3D medical image segmentation with Flower, MONAI and Opacus."""

__version__ = "0.1.0"
