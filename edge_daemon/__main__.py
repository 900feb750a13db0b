"""``edge-daemon``: the on-device service's command line.

Exit codes (for systemd's RestartPreventExitStatus=): 0 ok, 2 configuration error,
3 key store (TPM) error, 4 capture error, 5 inference error, 6 other edge error.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from edge_daemon.errors import CaptureError, ConfigError, EdgeError, InferenceError, KeyStoreError

EXIT_OK, EXIT_CONFIG, EXIT_KEYS, EXIT_CAPTURE, EXIT_INFERENCE, EXIT_OTHER = 0, 2, 3, 4, 5, 6
log = logging.getLogger("edge_daemon")


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


def _cmd_process(args: argparse.Namespace) -> int:
    from edge_daemon.capture import WavFileSource
    from edge_daemon.config import FileSourceConfig, GatePolicy
    from edge_daemon.inference.onnx_backend import OnnxClassifier
    from edge_daemon.pipeline import Classified, make_gate, run_stream
    from edge_daemon.privacy.vad import SileroVad
    from fleet_protocol.features import WINDOW_SAMPLES

    source = WavFileSource(FileSourceConfig(path=args.input))
    classifier = OnnxClassifier(args.model)
    events: list[dict[str, object]] = []

    def record(c: Classified) -> None:
        events.append({"start_s": c.start_s, "label": c.label, "score": round(c.score, 4)})

    stats = run_stream(
        source.blocks(), make_gate(GatePolicy(), SileroVad()), lambda: classifier, record
    )
    args.out.mkdir(parents=True, exist_ok=True)
    win_s = WINDOW_SAMPLES / 16_000
    spans = [[i * win_s, (i + 1) * win_s] for i in stats.kept_indices]
    (args.out / "kept_segments.json").write_text(json.dumps(spans))
    with open(args.out / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    print(f"{stats.windows_kept}/{stats.windows_in} windows kept; wrote {args.out}")
    return EXIT_OK


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
        "process", help="run the on-device pipeline on a WAV file (no broker, TPM or network)"
    )
    pr.add_argument("input", type=Path, help="16 kHz mono 16-bit WAV")
    pr.add_argument(
        "--out", type=Path, required=True, help="writes kept_segments.json and events.jsonl"
    )
    pr.add_argument("--model", type=Path, required=True, help="int8 ONNX classifier")
    pr.set_defaults(func=_cmd_process)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except KeyStoreError as e:
        log.error("key store: %s", e)
        return EXIT_KEYS
    except CaptureError as e:
        log.error("capture: %s", e)
        return EXIT_CAPTURE
    except InferenceError as e:
        log.error("inference: %s", e)
        return EXIT_INFERENCE
    except EdgeError as e:
        log.error("%s", e)
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
