"""Logging for every role: text for people, or one JSON object per line for log search."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

_ROUND_RE = re.compile(r"\bround (\d+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the job, role and worker a log search filters on."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.fields = {"role": role, "job": os.environ.get("PANGEA_JOB"), "worker": os.environ.get("PANGEA_WORKER_ID")}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in self.fields.items() if v},
        }
        round_ = _ROUND_RE.search(entry["message"])
        if round_:
            entry["round"] = int(round_.group(1))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, role: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{role}] %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("nats").setLevel(logging.WARNING)
