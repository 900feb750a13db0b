"""Logs to journald with structured fields, for both services; plain stderr elsewhere.

Owns ``JournalHandler`` (journald's native protocol: one datagram per record to
``/run/systemd/journal/socket``, ``KEY=value`` lines, the binary form for values with a
newline) and ``setup_logging`` (what an entry point calls: the journal when systemd
connected stderr to it, ``$JOURNAL_STREAM``, else a plain stderr format).

Each record carries ``MESSAGE``, ``PRIORITY`` (syslog level), ``SYSLOG_IDENTIFIER``,
``LOGGER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, the service's fixed fields (e.g.
``DEVICE``, ``VERSION``) and any of ``device``, ``batch``, ``version``, ``adapter``
passed in ``extra=``: ``journalctl -u edge-daemon DEVICE=edge-01 BATCH=…`` finds them.

Invariants: a send never raises into the caller (a full or missing socket falls back to
stderr for that record); field names are upper-case ASCII as journald requires; a record
is capped at ``MAX_RECORD`` bytes so it fits one datagram.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_RECORD = 48 * 1024
EXTRA_FIELDS = ("device", "batch", "version", "adapter")
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _field(key: str, value: str) -> bytes:
    data = value.encode(errors="replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def encode_record(fields: Mapping[str, str]) -> bytes:
    """One journald native-protocol datagram."""
    out = b"".join(_field(k, v) for k, v in fields.items())
    return out[:MAX_RECORD]


class JournalHandler(logging.Handler):
    def __init__(
        self,
        identifier: str,
        fields: Mapping[str, str] | None = None,
        address: str = JOURNAL_SOCKET,
    ) -> None:
        super().__init__()
        self.identifier = identifier
        self.fields = {k.upper(): str(v) for k, v in (fields or {}).items()}
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = logging.StreamHandler(sys.stderr)
        self._fallback.setFormatter(logging.Formatter(PLAIN_FORMAT))

    def fields_of(self, record: logging.LogRecord) -> dict[str, str]:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
        fields = {
            "MESSAGE": msg,
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            **self.fields,
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name.upper()] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.sendto(encode_record(self.fields_of(record)), self.address)
        except OSError:
            self._fallback.emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def _stderr_is_journal(env: Mapping[str, str]) -> bool:
    stream = env.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    identifier: str,
    level: int,
    fields: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger; the journal under systemd, plain stderr otherwise.

    Like ``logging.basicConfig``, nothing changes when the root logger has handlers
    already (a test harness's, or an embedding program's).
    """
    env = os.environ if env is None else env
    root = logging.getLogger()
    if root.handlers:
        return root.handlers[0]
    handler: logging.Handler
    if _stderr_is_journal(env) and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler(identifier, fields)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def add_fields(**fields: str) -> None:
    """Fixed fields (e.g. the device id, once the config is read) for every record."""
    for h in logging.getLogger().handlers:
        if isinstance(h, JournalHandler):
            h.fields.update({k.upper(): str(v) for k, v in fields.items()})
