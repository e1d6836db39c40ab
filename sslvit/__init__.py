"""sslvit: BEiT-style masked-patch pretraining of parallel Vision Transformers with pluggable stems."""

from sslvit.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__"]
