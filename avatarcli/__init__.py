"""avatarcli: unbounded-length talking-portrait video on Wan2.1 diffusion transformers.

Data path (one sub-package per stage):
    media (inputs) -> features -> models -> sampling -> decode -> sink
"""

from avatarcli.errors import AvatarError

__version__ = "0.1.0"
__all__ = ["AvatarError", "__version__"]
