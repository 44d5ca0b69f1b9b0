"""Drivers, by the input that drives the portrait. Adding one means adding a module here and a line below."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from avatarcli.errors import AvatarError

if TYPE_CHECKING:
    from avatarcli.drivers.base import Driver
    from avatarcli.job import AnimateJob

# job field that names the driving input (avatarcli.job.DRIVING_INPUTS) -> the module holding its DRIVER object
DRIVER_MODULES = {
    "audio": "avatarcli.drivers.stableavatar",
    "driving": "avatarcli.drivers.flashportrait",
}


def driver_name(job: AnimateJob) -> str:
    name = job.driving_input
    if name is None:
        given = [key for key in DRIVER_MODULES if getattr(job, key, None) is not None]
        options = " or ".join(f"--{key}" for key in DRIVER_MODULES)
        raise AvatarError(f"give exactly one of {options} (got {'both' if given else 'neither'})")
    return name


def select_driver(job: AnimateJob) -> Driver:
    return importlib.import_module(DRIVER_MODULES[driver_name(job)]).DRIVER
