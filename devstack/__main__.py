"""``devstack``: start the embedded default by hand, run the demo, or write the synthetic dataset."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from devstack.errors import DevstackError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="devstack", description="the embedded default: real parts on loopback"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the whole loop and write summary.json")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--devices", type=int, default=3)
    d.add_argument(
        "--stream-seconds", type=int, default=480, help="scene audio each device streams"
    )
    d.add_argument(
        "--eval-seconds", type=int, default=180, help="held-out scene each device scores"
    )
    w = sub.add_parser(
        "write-dataset",
        help="write the synthetic city as a folder-per-class WAV dataset (for pretrain --dataset)",
    )
    w.add_argument("--out", type=Path, required=True, help="new or empty directory")
    w.add_argument(
        "--per-class", type=int, default=80, help="clips (1-4 s event segments) per class"
    )
    w.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("up", help="start the stack and keep it up until Ctrl-C")
    u.add_argument("--workdir", type=Path, default=Path("devstack-run"))
    u.add_argument("--devices", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.command == "demo":
            from devstack.demo import run_demo

            # SIGTERM unwinds like Ctrl-C, so DevStack stops every child it started by PID
            signal.signal(signal.SIGTERM, _raise_interrupt)
            run_demo(args.out, args.devices, args.stream_seconds, args.eval_seconds)
        elif args.command == "write-dataset":
            from devstack.dataset import write_dataset

            ds = write_dataset(args.out, args.per_class, args.seed)
            print(f"{ds.dir}: {ds.files} clips, {ds.windows} one-second windows")
        else:
            from devstack.stack import DevStack

            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with DevStack(args.workdir, n_devices=args.devices) as stack:
                print(
                    f"broker 127.0.0.1:{stack.broker.port}; CA {stack.ca.cert_path}; Ctrl-C stops"
                )
                for slot in stack.devices:
                    print(f"  {slot.device_id}: TPM {slot.tpm.tcti}")
                stop.wait()
    except (DevstackError, RuntimeError) as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devstack: interrupted; every component stopped", file=sys.stderr)
        return 130
    return 0


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
