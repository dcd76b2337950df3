"""Lazy module loggers: logging comes with the first message, set up as the command deferred it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from dpipes.bus import logs
from dpipes.bus.logs import LazyLogger

log = LazyLogger("dpipes.probe")
def set_up():
    import logging
    logging.basicConfig(level=logging.WARNING, format="dpipes: %(levelname)s %(name)s: %(message)s")
logs.on_first_use(set_up)
print("logging" in sys.modules, flush=True)
log.debug("not shown")
log.warning("dropped %d", 1)
print("logging" in sys.modules, flush=True)
"""


def test_a_lazy_logger_imports_logging_at_its_first_message_with_the_deferred_set_up() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
    assert done.stderr == "dpipes: WARNING dpipes.probe: dropped 1\n"
