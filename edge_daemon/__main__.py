"""``edge-daemon``: the on-device service's command line.

Exit codes (for systemd's RestartPreventExitStatus=): 0 ok, 2 configuration error,
3 key store (TPM) error, 4 capture error, 5 inference error, 6 other edge error.

``process IN --out DIR`` runs the device pipeline on a WAV/FLAC file for an auditor.
Its invariants: the input is checked by the daemon's own file source
(``edge_daemon.capture.open_source``), the gate is ``pipeline.make_gate`` and the model
comes from ``inference.backends.make_classifier``, so the file takes the device's path;
``kept_segments.json`` holds the spans ``[start_s, start_s + 1]`` of the kept windows
(``Classified.start_s``), sorted and merged where they touch; ``events.jsonl`` holds one
``fleet_protocol.messages.Event`` per kept window, byte for byte as a device publishes it
(``time_ms`` = ``--start-time-ms`` + the window's offset); both files are written only
after the whole input went through, atomically; every failure is one line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from edge_daemon.errors import CaptureError, ConfigError, EdgeError, InferenceError, KeyStoreError
from fleet_protocol.features import SAMPLE_RATE, WINDOW_SAMPLES
from fleet_protocol.io.files import write_atomic

EXIT_OK, EXIT_CONFIG, EXIT_KEYS, EXIT_CAPTURE, EXIT_INFERENCE, EXIT_OTHER = 0, 2, 3, 4, 5, 6
log = logging.getLogger("edge_daemon")
OFFLINE_DEVICE = "offline"  # events' device id when `process` runs without --config
WINDOW_S = WINDOW_SAMPLES / SAMPLE_RATE


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_daemon.app import EdgeApp
    from edge_daemon.config import load_config

    app = EdgeApp(load_config(args.config))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app.run(stop)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid configuration for device {cfg.device_id}")
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config
    from edge_daemon.keys.tpm import TpmKeyStore

    cfg = load_config(args.config)
    with TpmKeyStore(cfg.tpm.tcti, cfg.state_dir / "keys") as keys:
        keys.storage_key()
        sys.stdout.write(keys.signing_public_key_pem().decode())
    return EXIT_OK


def merge_spans(starts_s: list[float], length_s: float) -> list[list[float]]:
    """``[start, end]`` spans of windows starting at ``starts_s``, each ``length_s`` long,
    sorted, with touching or overlapping ones merged: [0, 1] and [1, 2] give [0, 2].

    Starts are rounded to whole samples first so that float noise never splits a span.
    """
    win = round(length_s * SAMPLE_RATE)
    spans: list[list[int]] = []
    for start in sorted({round(s * SAMPLE_RATE) for s in starts_s}):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], start + win)
        else:
            spans.append([start, start + win])
    return [[a / SAMPLE_RATE, b / SAMPLE_RATE] for a, b in spans]


def _check_input(path: Path) -> None:
    """The checks ``FileSource`` makes, worded for this command (it names ``source.path``)."""
    if not path.exists():
        raise CaptureError(f"{path}: no such file; give the path of a 16 kHz mono WAV or FLAC")
    if path.is_dir():
        raise CaptureError(f"{path}: is a directory; give the path of a WAV or FLAC file")


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".edge-daemon-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise EdgeError(
            f"--out {out}: cannot write there ({e.strerror}); give a writable directory"
        ) from e


def _cmd_process(args: argparse.Namespace) -> int:
    from edge_daemon.capture import open_source
    from edge_daemon.config import FileSourceConfig, GatePolicy, load_config
    from edge_daemon.inference.backends import (
        BackendConfig,
        ModelFiles,
        OnnxBackendConfig,
        make_classifier,
    )
    from edge_daemon.pipeline import Classified, make_gate, run_stream
    from edge_daemon.privacy.vad import SileroVad
    from fleet_protocol.messages import Event

    device, gate_policy, threads = OFFLINE_DEVICE, GatePolicy(), 1
    backend: BackendConfig = OnnxBackendConfig()
    files = ModelFiles(args.model, args.model)  # --model replaces the config's files
    if args.config is not None:
        cfg = load_config(args.config)
        device, gate_policy = cfg.device_id, cfg.gate
        backend, threads = cfg.model.backend, cfg.model.threads
        if args.model is None:
            files = ModelFiles(cfg.model.base_fp32, cfg.model.base_int8)
    _check_input(args.input)
    source = open_source(FileSourceConfig(path=args.input))
    if source.duration_s < WINDOW_S:
        raise CaptureError(
            f"{args.input}: {source.duration_s:.2f} s of audio, shorter than one "
            f"{WINDOW_S:g} s window, so there is nothing to gate or classify; give a longer "
            "recording"
        )
    _prepare_out(args.out)
    gate = make_gate(gate_policy, SileroVad())
    classifier = make_classifier(backend, files, threads)
    starts: list[float] = []
    events: list[bytes] = []

    def record(c: Classified) -> None:
        starts.append(c.start_s)
        time_ms = args.start_time_ms + round(c.start_s * 1000)
        score = min(1.0, max(0.0, round(c.score, 4)))
        events.append(
            Event(
                device=device,
                time_ms=time_ms,
                label=c.label,
                score=score,
                model_sha256=c.model_sha256,
            ).to_bytes()
        )

    stats = run_stream(source.blocks(), gate, lambda: classifier, record)
    spans = merge_spans(starts, WINDOW_S)
    try:
        write_atomic(args.out / "kept_segments.json", json.dumps(spans).encode(), 0o644)
        write_atomic(args.out / "events.jsonl", b"".join(e + b"\n" for e in events), 0o644)
    except OSError as e:
        raise EdgeError(f"--out {args.out}: cannot write the results ({e.strerror})") from e
    print(
        f"{stats.windows_kept}/{stats.windows_in} windows kept in {len(spans)} span(s); "
        f"wrote {args.out}"
    )
    return EXIT_OK


PROCESS_HELP = """\
Run the on-device pipeline on a recording: the privacy gate, upload features and the
classifier, exactly as a device does, with no broker, TPM or network.

Input: WAV or FLAC (any PCM width or float), 16 kHz, mono, at least 1 s. Anything else
is refused with one line saying what is wrong and how to convert it.

Outputs in --out:
  kept_segments.json  a JSON list of [start_s, end_s] spans of the input, in seconds
                      from its first sample: the 1 s windows the gate kept (each from its
                      start sample, start + 1 s), sorted, touching windows merged
                      ([0,1] and [1,2] give [0,2]). The last windows of a file may be
                      dropped when the file ends inside their after-margin.
  events.jsonl        one line per kept window's classification, in the format of the
                      fleet/v1/<device>/events topic (docs/schemas/event.schema.json):
                      device, time_ms, label, score, model_sha256. time_ms is
                      --start-time-ms plus the window's start offset in ms (so, by
                      default, milliseconds from the file start). Unlike a device, which
                      publishes only scores at or above model.event_threshold, every
                      classification is written.

With --config (a device configuration, as `edge-daemon run` reads it) the gate policy
(`gate`), the inference backend (`model.backend`, `model.threads`) and the model files
(`model.base_int8` / `model.base_fp32`) are the device's; its broker, TPM, source and
other sections are validated but not used. --model replaces the model file: a device
that installed an update runs its adapter-merged model (`model_path` in
state_dir/ota/trusted.json, e.g. state_dir/ota/models/adapter-v3.int8.onnx); pass
that file to audit it.

Exit codes: 0 ok, 2 bad configuration, 4 bad input file, 5 model or backend, 6 --out.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-daemon", description="sovereign-edge on-device service")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the daemon until SIGTERM")
    r.add_argument("--config", type=Path, required=True, help="device configuration (JSON)")
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate-config", help="check a configuration file and report errors")
    v.add_argument("--config", type=Path, required=True)
    v.set_defaults(func=_cmd_validate)
    k = sub.add_parser("keys", help="create the TPM keys if missing; print the signing public key")
    k.add_argument("--config", type=Path, required=True)
    k.set_defaults(func=_cmd_keys)
    pr = sub.add_parser(
        "process",
        help="run the on-device pipeline on a WAV or FLAC file (no broker, TPM or network)",
        description=PROCESS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("input", type=Path, help="WAV or FLAC, 16 kHz mono")
    pr.add_argument(
        "--out", type=Path, required=True, help="writes kept_segments.json and events.jsonl here"
    )
    pr.add_argument(
        "--model",
        type=Path,
        help="ONNX classifier to run (the int8 base model by default); required without"
        " --config, else it replaces the config's model files",
    )
    pr.add_argument(
        "--config",
        type=Path,
        help="device configuration: run its gate policy, inference backend and model",
    )
    pr.add_argument(
        "--start-time-ms",
        type=_non_negative_int,
        default=0,
        metavar="UNIX_MS",
        help="Unix time (ms) of the file's first sample, added to events' time_ms (default 0)",
    )
    pr.set_defaults(func=_cmd_process)
    return p


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _one_line(text: str) -> str:
    """A multi-line message as one line: a config's "x: invalid configuration:" followed
    by one indented line per error becomes "x: invalid configuration: a; b"."""
    out = ""
    for part in filter(None, (line.strip() for line in text.splitlines())):
        sep = "" if not out else " " if out.endswith(":") else "; "
        out += sep + part
    return out


def _exit_code(e: EdgeError) -> tuple[int, str]:
    """The exit code for ``e`` and the prefix its message is logged with."""
    for cls, code, prefix in (
        (ConfigError, EXIT_CONFIG, ""),
        (KeyStoreError, EXIT_KEYS, "key store: "),
        (CaptureError, EXIT_CAPTURE, "capture: "),
        (InferenceError, EXIT_INFERENCE, "inference: "),
    ):
        if isinstance(e, cls):
            return code, prefix
    return EXIT_OTHER, ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "process" and args.model is None and args.config is None:
        parser.error("process: give --model (an ONNX classifier) or --config (a device config)")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except EdgeError as e:
        code, prefix = _exit_code(e)
        if args.command == "process":  # an auditor at a terminal: one plain line
            print(f"edge-daemon process: error: {_one_line(str(e))}", file=sys.stderr)
        else:
            log.error("%s%s", prefix, e)
        return code


if __name__ == "__main__":
    sys.exit(main())
