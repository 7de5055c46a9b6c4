"""kvcalib — training-free calibration of KV-cache compression per context."""

from importlib import metadata

try:
    __version__ = metadata.version("kvcalib")  # the installed distribution's version (pyproject's `version`)
except metadata.PackageNotFoundError:  # a bare checkout on sys.path, not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    """``kvcalib.compress`` resolves lazily (``import kvcalib`` / ``kvcalib.client`` stay torch-free)."""
    if name == "compress":
        from kvcalib.calib.integrations.hf import compress

        return compress
    raise AttributeError(f"module 'kvcalib' has no attribute {name!r}")
