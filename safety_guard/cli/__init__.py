"""The ``safety-guard`` command (:mod:`.main`)."""

from safety_guard.cli.main import main

__all__ = ["main"]
