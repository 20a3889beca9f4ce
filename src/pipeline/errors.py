"""Errors that end a command with one sentence (cli.main catches them); importable without torch."""

from __future__ import annotations


class DataError(ValueError):
    """The data folder is not usable; the message names the folder, class or file."""


class ConfigError(ValueError):
    """A config key or value the run cannot use; the message names it and what would fit."""
