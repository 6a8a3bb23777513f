"""JSON-lines logging for twistd: ``twistd --logger tcptunnel.jsonlog.observer tcptunnel ...``.

Each event becomes one JSON object per line with all its fields (instance index, peer,
session, target, bytes, durations ...), for log shippers.  Lines go to standard output, or
to the file named by the environment variable ``TCPTUNNEL_JSON_LOG``.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    """The observer factory twistd's --logger option calls."""
    path = os.environ.get("TCPTUNNEL_JSON_LOG")
    stream: IO[str] = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    return jsonFileLogObserver(stream)
