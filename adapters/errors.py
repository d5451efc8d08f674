"""The error raised for adapter files that cannot be read or do not match their config."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """An adapter file is malformed; the message names the file or tensor and the problem."""
