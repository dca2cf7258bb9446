"""``earlyexit demo``: the main job (see :mod:`earlyexit.demo.run`)."""

from earlyexit.demo.run import main

__all__ = ["main"]
