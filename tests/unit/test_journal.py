"""Structured logs for journald (``fleet_protocol.io.journal``), read by a test socket."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

from fleet_protocol.io.journal import JournalHandler, encode_record


def _parse(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            data = rest
        else:  # binary form: KEY \n u64 length, value \n
            (n,) = struct.unpack("<Q", rest[:8])
            out[line.decode()] = rest[8 : 8 + n].decode()
            data = rest[8 + n + 1 :]
    return out


def test_records_carry_priority_identifier_and_the_device_batch_version_fields(
    tmp_path: Path,
) -> None:
    sock_path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(5)
    handler = JournalHandler("edge-daemon", {"device": "pi-07"}, address=str(sock_path))
    log = logging.getLogger("test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("batch %s resent", "b-1", extra={"batch": "b-1", "version": "3"})
        fields = _parse(server.recv(65536))
        assert fields["MESSAGE"] == "batch b-1 resent"
        assert fields["PRIORITY"] == "4"
        assert fields["SYSLOG_IDENTIFIER"] == "edge-daemon"
        assert (fields["DEVICE"], fields["BATCH"], fields["VERSION"]) == ("pi-07", "b-1", "3")
        assert fields["LOGGER"] == "test.journal" and fields["CODE_FUNC"]
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("failed")
        fields = _parse(server.recv(65536))
        assert fields["PRIORITY"] == "3"
        assert "ValueError: bad\nthing" in fields["MESSAGE"]  # multi-line: binary form
    finally:
        log.removeHandler(handler)
        handler.close()
        server.close()


def test_a_missing_journal_falls_back_to_stderr_without_raising(tmp_path: Path) -> None:
    handler = JournalHandler("x", address=str(tmp_path / "none"))
    handler.emit(logging.LogRecord("n", logging.INFO, __file__, 1, "hello", None, None))
    handler.close()


def test_multi_line_values_use_the_binary_form() -> None:
    assert encode_record({"A": "1", "B": "x\ny"}) == b"A=1\nB\n" + struct.pack("<Q", 3) + b"x\ny\n"
