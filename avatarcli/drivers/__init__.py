"""Drivers, by the input that drives the portrait. Adding one means adding a module here and a line below."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from avatarcli.errors import AvatarError

if TYPE_CHECKING:
    from avatarcli.drivers.base import Driver
    from avatarcli.pipeline import AnimateJob

# job field that names the driving input -> the module holding that driver's DRIVER object
DRIVER_MODULES = {
    "audio": "avatarcli.drivers.stableavatar",
    "driving": "avatarcli.drivers.flashportrait",
}


def driver_name(job: AnimateJob) -> str:
    given = [name for name in DRIVER_MODULES if getattr(job, name, None) is not None]
    if len(given) != 1:
        options = " or ".join(f"--{name}" for name in DRIVER_MODULES)
        raise AvatarError(f"give exactly one of {options} (got {'both' if given else 'neither'})")
    return given[0]


def select_driver(job: AnimateJob) -> Driver:
    return importlib.import_module(DRIVER_MODULES[driver_name(job)]).DRIVER
