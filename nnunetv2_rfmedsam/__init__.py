"""RFMedSAM 2 as an nnU-Net v2 plugin."""
__version__ = "0.1.0"
