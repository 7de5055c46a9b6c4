"""kvcalib — training-free calibration of KV-cache compression per context."""

__version__ = "0.1.0"
