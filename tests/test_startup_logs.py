"""Start-up logs hold nothing a user can do nothing about: bitsandbytes' hint about the optional
Hugging Face ``kernels`` package is demoted to DEBUG (server/engine/quiet.py), and nothing else.

The import-time tests run in fresh subprocesses (bitsandbytes logs it once, while it is first
imported); they are skipped where bitsandbytes does not log it at all (a CPU without
AVX512-BF16, or the ``kernels`` package installed and able to fetch its kernel).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from prolora_serve.server.engine.quiet import DEMOTED, DemoteToDebug, quiet_unactionable_warnings

LOGGER = "bitsandbytes.backends.cpu.ops"
MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
FORMAT = "%(levelname)s %(name)s: %(message)s"


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def logging_setup(level: str | None) -> str:
    return "" if level is None else f"import logging; logging.basicConfig(level={level!r}, format={FORMAT!r})\n"


@pytest.fixture(scope="module")
def bitsandbytes_logs_it(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cwd outside the repository (so its kernels/ folder is not importable as top-level
    ``kernels``), after checking that a bare import of bitsandbytes logs the message."""
    cwd = tmp_path_factory.mktemp("cwd")
    out = run_python(logging_setup("WARNING") + "import bitsandbytes\n", cwd)
    if f"WARNING {LOGGER}: {MESSAGE}" not in out:
        pytest.skip("bitsandbytes does not log the kernels-community hint here")
    return cwd


@pytest.mark.parametrize("level", [None, "INFO"])  # no logging set up; the server default
def test_server_import_path_hides_the_hint(bitsandbytes_logs_it: Path, level: str | None) -> None:
    """quantize.py is the server's first importer of bitsandbytes (via the loader)."""
    out = run_python(logging_setup(level) + "import prolora_serve.server.engine.loader\n",
                     bitsandbytes_logs_it)
    assert MESSAGE not in out


def test_the_hint_stays_visible_at_debug(bitsandbytes_logs_it: Path) -> None:
    out = run_python(logging_setup("DEBUG") + "import prolora_serve.server.engine.quantize\n",
                     bitsandbytes_logs_it)
    assert f"DEBUG {LOGGER}: {MESSAGE}" in out
    assert f"WARNING {LOGGER}: {MESSAGE}" not in out


# --- the filter on synthetic records (any machine) ----------------------------------------------

def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, "ops.py", 1, msg, args, None)


def hint() -> logging.LogRecord:
    return record(LOGGER, logging.WARNING, MESSAGE + ": %s. Please make sure you already "
                  "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")


def test_filter_demotes_only_that_message() -> None:
    demote = DemoteToDebug(LOGGER, DEMOTED[LOGGER])
    logger = logging.getLogger(LOGGER)
    saved = logger.level
    try:
        logger.setLevel(logging.INFO)
        demoted = hint()
        assert demote.filter(demoted) is False  # the logger is not enabled for DEBUG: dropped
        assert (demoted.levelno, demoted.levelname) == (logging.DEBUG, "DEBUG")
        logger.setLevel(logging.DEBUG)
        assert demote.filter(hint()) is True  # kept, as a DEBUG record
        for other in (record(LOGGER, logging.WARNING, "some other bitsandbytes warning"),
                      record(LOGGER, logging.ERROR, MESSAGE + ": %s", "boom"),
                      record("bitsandbytes.cextension", logging.WARNING, MESSAGE + ": %s", "x")):
            level = other.levelno
            assert demote.filter(other) is True and other.levelno == level
    finally:
        logger.setLevel(saved)


def test_installed_filter_through_handlers() -> None:
    """End to end in this process: a WARNING-level handler on the logger does not see the hint,
    a DEBUG one sees it as DEBUG, another warning of the same logger passes untouched."""
    quiet_unactionable_warnings()
    quiet_unactionable_warnings()  # idempotent
    logger = logging.getLogger(LOGGER)
    assert sum(isinstance(f, DemoteToDebug) for f in logger.filters) == 1
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            seen.append(rec)

    handler, saved = Collect(logging.NOTSET), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.setLevel(logging.WARNING)
        logger.warning(MESSAGE + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("a warning users should see")
        assert [(r.levelname, r.getMessage()) for r in seen] == [("WARNING", "a warning users should see")]
        seen.clear()
        logger.setLevel(logging.DEBUG)
        logger.warning(MESSAGE + ": %s", "No module named 'kernels'")
        assert [r.levelname for r in seen] == ["DEBUG"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
