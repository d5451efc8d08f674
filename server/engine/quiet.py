"""Start-up log messages a user can do nothing about, demoted to DEBUG (each by its exact text).

bitsandbytes (seen with 0.50), when ``bitsandbytes.backends.cpu.ops`` is imported on an
AVX512-BF16 CPU, tries to fetch an optional 4-bit GEMM from the Hugging Face Hub through the
optional ``kernels`` package; where that package is missing or nothing can be fetched it logs,
at WARNING on the logger ``bitsandbytes.backends.cpu.ops``: "Failed to load CPU
gemm_4bit_forward from kernels-community: <error>. Please make sure you already `pip install
kernels` ...". It then uses its native ``gemv_4bit_inference_cpu_nf4_bf16``, the kernel our
``NF4Linear`` calls directly anyway (quantize.py), and these machines cannot fetch from the Hub:
the message is noise in every start-up log. It stays visible at DEBUG.

``quiet_unactionable_warnings()`` must run before bitsandbytes is first imported (the message
is logged during that import): the engine package's ``__init__`` calls it, so it runs before
quantize.py or bench_model.py import bitsandbytes. Other bitsandbytes messages, and this logger's other messages, are
left alone.
"""

from __future__ import annotations

import logging

# logger name -> the beginnings of the exact messages (the format string, before %-args).
DEMOTED = {
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community:",
    ),
}


class DemoteToDebug(logging.Filter):
    """Re-levels matching WARNING records of one logger to DEBUG, and drops them unless that
    logger is enabled for DEBUG (the check ``logger.debug`` would have made: handlers of
    ancestor loggers do not re-check their loggers' levels on propagated records)."""

    def __init__(self, logger_name: str, prefixes: tuple[str, ...]) -> None:
        super().__init__(logger_name)
        self.logger_name = logger_name
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name != self.logger_name or record.levelno != logging.WARNING
                or not isinstance(record.msg, str) or not record.msg.startswith(self.prefixes)):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(self.logger_name).isEnabledFor(logging.DEBUG)


def quiet_unactionable_warnings() -> None:
    """Install the filters (idempotent). Call before importing bitsandbytes."""
    for name, prefixes in DEMOTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteToDebug) for f in logger.filters):
            logger.addFilter(DemoteToDebug(name, prefixes))
