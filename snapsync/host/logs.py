"""Log lines for journald, cron mail and log shippers: one line per event, as text or JSON.

Events carry their facts as ``extra`` fields (``event``, ``group``, ``target``, ``dataset``,
``snapshot``, ``bytes``...), so ``--log-format json`` gives a shipper fields to filter on instead of
prose to parse. Text lines leave the time out: journald and cron stamp them already.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from snapsync.errors import printable

if TYPE_CHECKING:
    from snapsync.recovery.drill import DrillReport
    from snapsync.ops.runner import GroupReport

LogFormat = Literal["text", "json"]
log = logging.getLogger("snapsync")

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The event's own facts: whatever the caller passed as ``extra``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"snapsync: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        return printable(text, limit=16000)  # a peer's or a file's words: no fake lines, no terminal escapes


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry |= fields(record)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


LIBRARIES = ("boto3", "botocore", "s3transfer", "urllib3")
"""Loggers whose info lines ("Found credentials in shared credentials file", once per client) are
their library's chatter, not snapsync's steps: shown with ``--debug`` only, warnings always."""


def setup(fmt: LogFormat, level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if level > logging.DEBUG else logging.DEBUG)


def log_reports(command: str, reports: list[GroupReport]) -> None:
    """A command's outcome, one line per group and per target: what the table shows, as events."""
    for r in reports:
        facts = {"event": f"{command}-group", "group": r.group, "ok": not r.errors, "snapshot": r.snapshot,
                 "deleted": len(r.deleted), "errors": r.errors}
        if r.errors:
            log.warning("%s: group %s failed: %s", command, r.group, "; ".join(r.errors), extra=facts)
        else:
            log.info("%s: group %s ok (snapshot %s, %d pruned)", command, r.group, r.snapshot or "none taken", len(r.deleted), extra=facts)
        for t in r.targets:
            way = f"{t.group} {'<-' if t.direction == 'pull' else '->'} {t.target}"
            facts = {"event": f"{command}-target", "group": t.group, "target": t.target, "direction": t.direction, "ok": t.ok,
                     "bytes": t.bytes_sent, "sent": len(t.sent), "lag_seconds": None if t.lag is None else int(t.lag.total_seconds()),
                     "seconds": round(t.seconds, 3), "errors": t.errors}
            if t.errors:
                log.warning("%s: %s failed: %s", command, way, "; ".join(t.errors), extra=facts)
            else:
                log.info("%s: %s ok (%d sent, %d bytes)", command, way, len(t.sent), t.bytes_sent, extra=facts)


def log_drills(reports: list[DrillReport]) -> None:
    for r in reports:
        facts = {"event": "drill", "group": r.group, "target": r.target, "ok": r.ok, "snapshot": r.snapshot,
                 "seconds": round(r.seconds, 3), "restored_bytes": r.restored_bytes, "error": r.error}
        if r.ok:
            log.info("drill: %s from %s ok (%s)", r.group, r.target, r.snapshot, extra=facts)
        else:
            bad = "; ".join(f"{c.name}: {c.detail}" for c in r.checks if not c.ok)
            log.warning("drill: %s from %s FAILED: %s", r.group, r.target, r.error or bad, extra=facts)
