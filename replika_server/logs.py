"""Logging set-up, done once in the entry point: JSON lines when not on a terminal, readable lines when on one.

Logs go to standard error by default, keeping standard output for what a command prints; a container sets
``log_stream = "stdout"``, where its runtime collects a service's logs."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: str = "info", fmt: str = "auto", stream: str = "stderr") -> None:
    """Configure structlog for the process. ``fmt`` is ``auto``, ``json`` or ``console``; ``stream`` is
    ``stderr`` or ``stdout``."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        # A filtering bound logger makes disabled levels cost one method call and nothing more.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
