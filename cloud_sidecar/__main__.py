"""``cloud-sidecar``: the EU-side service's command line.

Exit codes (for systemd's RestartPreventExitStatus=): 0 ok, 2 configuration error,
3 HSM error, 4 audit chain broken, 5 training or gate refused, 6 other sidecar error,
7 input refused (e.g. a label import, or a release without approval; nothing was changed).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from cloud_sidecar.cli_ota import cmd_ota, cmd_rollout
from cloud_sidecar.errors import (
    AuditError,
    CloudError,
    ConfigError,
    GateRejectedError,
    HsmError,
    RegistryError,
    TrainingError,
)
from fleet_protocol.io.journal import setup_logging

EXIT_OK, EXIT_CONFIG, EXIT_HSM, EXIT_AUDIT, EXIT_TRAIN, EXIT_OTHER, EXIT_INPUT = 0, 2, 3, 4, 5, 6, 7
LAYOUTS = ("folders", "esc50", "urbansound8k", "csv")  # cloud_sidecar.audio_dataset (numpy)
log = logging.getLogger("cloud_sidecar")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    if args.dataset is None:
        raise TrainingError(
            "pretrain needs --dataset DIR: labeled audio as a folder per class, or an"
            " ESC-50, UrbanSound8K or path,label CSV layout (docs/datasets.md); for the"
            " synthetic city, write one with `devstack write-dataset --out DIR`"
        )
    from cloud_sidecar.audio_dataset import DatasetConfig
    from cloud_sidecar.pretrain import pretrain

    cfg = DatasetConfig(
        strict=args.strict,
        bad_files="skip" if args.skip_bad_files else "fail",
        held_out_folds=tuple(args.held_out_fold) if args.held_out_fold else None,
    )
    base = pretrain(
        args.out,
        args.dataset,
        layout=args.layout,
        class_map=args.class_map,
        dataset_config=cfg,
        seed=args.seed,
        epochs=args.epochs,
    )
    card = json.loads(base.card.read_text())
    print(
        json.dumps(
            {
                "dir": str(base.dir),
                "sha256_fp32": base.sha256_fp32,
                "dataset_manifest_sha256": card["dataset"]["manifest_sha256"],
                "held_out": card["held_out"],
            }
        )
    )
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from cloud_sidecar.app import SidecarApp
    from cloud_sidecar.config import load_config

    app = SidecarApp(load_config(args.config))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app.run(stop)
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from cloud_sidecar.config import load_config
    from cloud_sidecar.train import run_training

    cfg = load_config(args.config)
    if not args.if_triggered:
        print(json.dumps(run_training(cfg), indent=1))
        return EXIT_OK
    from cloud_sidecar import triggers
    from cloud_sidecar.store_api import open_store

    state = cfg.data_dir / "triggers.json"
    store = open_store(cfg)
    try:
        decision = triggers.evaluate(store, state, cfg.triggers, cfg.open_audit())
    finally:
        store.close()
    if not decision.fired:
        print(json.dumps({"trained": False, **decision.figures}, indent=1))
        return EXIT_OK
    log.info("training triggered by %s", ", ".join(decision.fired))
    try:
        print(json.dumps(run_training(cfg), indent=1))
    finally:
        store = open_store(cfg)
        try:
            triggers.record_attempt(store, state)
        finally:
            store.close()
    return EXIT_OK


def _cmd_release(args: argparse.Namespace) -> int:
    from cloud_sidecar import release
    from cloud_sidecar.config import load_config

    cfg = load_config(args.config)
    if args.release_command == "approve":
        out = release.approve(cfg, args.version, args.approver, args.note)
    else:
        out = release.publish(cfg, args.version, cohort=args.cohort, broker=not args.no_broker)
    print(json.dumps(out, indent=1))
    return EXIT_OK


def _cmd_registry(args: argparse.Namespace) -> int:
    from cloud_sidecar.config import load_config
    from cloud_sidecar.registry import Registry

    registry = Registry(load_config(args.config).data_dir / "registry")
    if args.registry_command == "list":
        for e in registry.entries():
            print(
                f"{e['version']:<10} {','.join(e['aliases']) or '-':<30}"
                f" approvals={len(e['approvals'])} parent={e['lineage']['parent']}"
                f" dataset={e['lineage']['dataset_id'][:12]} created={e['created_at']}"
            )
    else:
        print(json.dumps(registry.get(args.version), indent=1))
    return EXIT_OK


def _cmd_fleet(args: argparse.Namespace) -> int:
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.config import load_config
    from cloud_sidecar.store_api import open_store

    cfg = load_config(args.config)
    store = open_store(cfg)
    audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
    try:
        if args.fleet_command == "register":
            pem = args.public_key.read_bytes()
            if len(pem) > 8192:
                raise ConfigError(f"{args.public_key} is not a public key (over 8 KiB)")
            dev = store.register_device(args.device, pem)
            audit.append("fleet.registered", args.device, key_id=dev.key_id)
            print(f"registered {args.device} (key {dev.key_id})")
        elif args.fleet_command in ("claim", "revoke"):
            from cloud_sidecar.fleet import end_session, open_fleet
            from cloud_sidecar.metrics import Metrics

            fleet = open_fleet(cfg, store, audit, Metrics())
            if args.fleet_command == "claim":
                # printed once: only its hash is stored; hand it to the device's first boot
                print(fleet.create_claim(args.device))
            else:
                serials = fleet.revoke(args.device)
                ended = end_session(cfg, args.device)  # the CRL applies from the next handshake
                print(
                    f"revoked {args.device}: {len(serials)} certificate(s) in the CRL;"
                    f" open session {'closed' if ended else 'NOT closed'}"
                )
        elif args.fleet_command == "disable":
            if not store.set_device_status(args.device, "disabled"):
                raise ConfigError(f"unknown device {args.device}")
            audit.append("fleet.disabled", args.device)
            print(f"disabled {args.device}")
        else:
            print(json.dumps(store.samples_per_device(), indent=1))
    finally:
        store.close()
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from cloud_sidecar.audit import verify_log

    if args.audit_command == "checkpoint":
        return _cmd_audit_checkpoint(args)
    pem = None
    if args.public_key is not None:
        pem = args.public_key.read_bytes()[:8192]
    r = verify_log(args.log, pem, args.checkpoints)
    print(f"{args.log}: {r.entries} entries, chain intact, head {r.head[:16]}")
    if r.checkpoints:
        how = "signatures verified" if r.signatures_checked else "signatures NOT checked"
        print(f"{r.checkpoints} checkpoints ({how}); last at entry {r.last_checkpoint_seq}")
    else:
        print("no checkpoints in the log")
    if args.checkpoints is not None:
        print(f"{args.checkpoints}: {r.external_checkpoints} checkpoints match the log")
    return EXIT_OK


def _cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_hsm

    cfg = load_config(args.config)
    with open_hsm(cfg) as hsm:
        record = cfg.open_audit().checkpoint(hsm.sign_digest, hsm.signing_key_id())
    print(json.dumps(record))
    return EXIT_OK


def _cmd_keys_rotate_unwrap(args: argparse.Namespace) -> int:
    """New upload-unwrap key; the old one stays for batches in flight (ADR 0002, 0017)."""
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_hsm
    from fleet_protocol.io.files import write_atomic

    cfg = load_config(args.config)
    with open_hsm(cfg) as hsm:
        old = hsm.unwrap_key_id()
        new = hsm.rotate_unwrap_key()
        write_atomic(args.out, hsm.unwrap_public_key_pem(), 0o644)
    cfg.open_audit().append("hsm.unwrap_rotated", "cloud-sidecar", old=old, new=new)
    print(json.dumps({"old": old, "new": new, "public_key": str(args.out)}))
    return EXIT_OK


def _cmd_keys_rotate_data(args: argparse.Namespace) -> int:
    """New data key for the store's features; rows sealed before stay readable (ADR 0022)."""
    from cloud_sidecar.config import load_config
    from cloud_sidecar.store_api import open_store

    cfg = load_config(args.config)
    store = open_store(cfg)  # audits store.data_key_created (reason "rotated")
    try:
        kid = store.rotate_data_key()
    finally:
        store.close()
    print(json.dumps({"data_key": kid}))
    return EXIT_OK


def _cmd_labels_import(args: argparse.Namespace) -> int:
    from cloud_sidecar.config import load_config
    from cloud_sidecar.labels import LabelService
    from cloud_sidecar.metrics import Metrics
    from cloud_sidecar.store_api import open_store
    from fleet_protocol.topics import check_device_id

    cfg = load_config(args.config)
    source = check_device_id(args.source)
    store = open_store(cfg)
    try:
        result = LabelService(store, cfg.open_audit(), Metrics()).import_csv(args.csv, source)
    finally:
        store.close()
    if result.status != "accepted":
        for err in result.errors:
            print(f"{args.csv}: {err.message} ({err.reason})", file=sys.stderr)
        print(f"{args.csv}: refused; nothing was imported", file=sys.stderr)
        return EXIT_INPUT
    print(json.dumps({"imported": result.accepted, "source": source}))
    return EXIT_OK


def _cmd_broker_acl(args: argparse.Namespace) -> int:
    from cloud_sidecar.broker_acl import write_broker_acl
    from cloud_sidecar.config import load_config

    write_broker_acl(
        load_config(args.config), args.label_source, args.out, args.enroll_out, args.service_out
    )
    extra = [p for p in (args.enroll_out, args.service_out) if p]
    print(f"wrote {args.out}" + "".join(f" and {p}" for p in extra))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from cloud_sidecar.config import load_config

    load_config(args.config)
    print(f"{args.config}: valid")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloud-sidecar", description="sovereign-edge EU-side service")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser(
        "pretrain", help="train the base CNN on a labeled audio dataset; export ONNX fp32+int8"
    )
    pt.add_argument(
        "--dataset",
        type=Path,
        help="dataset directory (required): a folder per class, or an ESC-50, UrbanSound8K"
        " or path,label CSV layout; see docs/datasets.md",
    )
    pt.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help="auto: meta/esc50.csv, metadata/UrbanSound8K.csv or manifest.csv if present,"
        " else folders",
    )
    pt.add_argument(
        "--class-map",
        type=Path,
        help="JSON {dataset label: model class or null}; overrides the built-in maps",
    )
    pt.add_argument(
        "--strict", action="store_true", help="refuse a label no class map knows (default: skip)"
    )
    pt.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="skip and count unreadable or missing audio files (up to 5%%) instead of stopping",
    )
    pt.add_argument(
        "--held-out-fold",
        type=int,
        action="append",
        help="a fold to hold out where the CSV has folds (repeatable; default: the highest)",
    )
    pt.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory for base.pt, ONNX files, golden/replay sets, dataset manifest, model card",
    )
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--epochs", type=int, default=6)
    pt.set_defaults(func=_cmd_pretrain)

    sv = sub.add_parser("serve", help="run ingest workers until SIGTERM")
    sv.add_argument("--config", type=Path, required=True)
    sv.set_defaults(func=_cmd_serve)

    tr = sub.add_parser(
        "train", help="dataset → LoRA → gate → signed bundle in the registry (never publishes)"
    )
    tr.add_argument("--config", type=Path, required=True)
    tr.add_argument(
        "--if-triggered",
        action="store_true",
        help="train only if the schedule or a drift signal fires (audited; the timer's mode)",
    )
    tr.set_defaults(func=_cmd_train)

    rl = sub.add_parser("release", help="approve a registered version; publish it over OTA")
    rl.add_argument("--config", type=Path, required=True)
    rsub = rl.add_subparsers(dest="release_command", required=True)
    ap = rsub.add_parser("approve", help="record a named approver's approval (audited)")
    ap.add_argument("version")
    ap.add_argument("--approver", required=True, help="who approves (recorded and audited)")
    ap.add_argument("--note", default="", help="e.g. the privacy review's reference")
    pb = rsub.add_parser("publish", help="sign an approved version into the OTA channel")
    pb.add_argument("version")
    pb.add_argument("--cohort", help="rollout cohort (default: ota.cohort; not 'all': canary)")
    pb.add_argument("--no-broker", action="store_true", help="sign only; publish later")
    rl.set_defaults(func=_cmd_release)

    rg = sub.add_parser("registry", help="the model registry")
    rg.add_argument("--config", type=Path, required=True)
    gsub = rg.add_subparsers(dest="registry_command", required=True)
    gsub.add_parser("list", help="versions, aliases, approvals, lineage")
    sh = gsub.add_parser("show", help="one version's full entry")
    sh.add_argument("version")
    rg.set_defaults(func=_cmd_registry)

    ot = sub.add_parser("ota", help="OTA repository")
    ot.add_argument("--config", type=Path, required=True)
    osub = ot.add_subparsers(dest="ota_command", required=True)
    rb = osub.add_parser(
        "rollback", help="roll forward to a new version that carries an earlier adapter"
    )
    rb.add_argument("--to-adapter", type=int, required=True, help="the earlier adapter version")
    rb.add_argument("--publish", action="store_true", help="publish over MQTT")
    ex = osub.add_parser("export", help="write the TUF repository in the standard layout")
    ex.add_argument("dir", type=Path, help="destination (metadata/, targets/)")
    ts = osub.add_parser("refresh-timestamp", help="sign a fresh timestamp (run by a timer)")
    ts.add_argument("--publish", action="store_true", help="publish the metadata over MQTT")
    rk = osub.add_parser("rotate-key", help="new HSM key for one TUF online role (new root)")
    rk.add_argument("role", choices=("targets", "snapshot", "timestamp"))
    rk.add_argument("--publish", action="store_true", help="publish the metadata over MQTT")
    ot.set_defaults(func=cmd_ota)

    ro = sub.add_parser("rollout", help="staged rollout of one TUF target (audited)")
    ro.add_argument("--config", type=Path, required=True)
    ro.add_argument("--publish", action="store_true", help="publish changed metadata over MQTT")
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    st = rsub.add_parser("start", help="sign the target for the first step's percentage")
    st.add_argument("target", help="the target's name in the TUF repository")
    st.add_argument("--steps", default="10,50,100", help="rising percentages, e.g. 5,25,100")
    rsub.add_parser("status", help="each device's state and version")
    rsub.add_parser("step", help="widen, finish or abort as the health reports say (timer)")
    rsub.add_parser("pause", help="hold the rollout at its step")
    rsub.add_parser("resume", help="let it widen again")
    rsub.add_parser("abort", help="withdraw the target; roll forward to the adapter before it")
    gr = rsub.add_parser("groups", help="sign device groups and per-group release pins")
    gr.add_argument("target", metavar="FILE", help='{"groups": {...}, "pins": {"g": N}}')
    ro.set_defaults(func=cmd_rollout)

    fl = sub.add_parser("fleet", help="device registry")
    fl.add_argument("--config", type=Path, required=True)
    fsub = fl.add_subparsers(dest="fleet_command", required=True)
    reg = fsub.add_parser("register", help="register a device's TPM signing public key")
    reg.add_argument("device")
    reg.add_argument("--public-key", type=Path, required=True)
    dis = fsub.add_parser("disable", help="refuse further uploads from a device")
    dis.add_argument("device")
    fsub.add_parser("list", help="devices and their stored sample counts")
    cl = fsub.add_parser("claim", help="issue a one-time enrollment claim; prints it once")
    cl.add_argument("device")
    rv = fsub.add_parser("revoke", help="revoke a device's certificates (CRL) and refuse it")
    rv.add_argument("device")
    fl.set_defaults(func=_cmd_fleet)

    au = sub.add_parser("audit", help="audit log tools")
    asub = au.add_subparsers(dest="audit_command", required=True)
    ver = asub.add_parser("verify", help="check the hash chain; non-zero exit on any tampering")
    ver.add_argument("log", type=Path)
    ver.add_argument(
        "--public-key", type=Path, help="trusted HSM signing public key (PEM): check checkpoints"
    )
    ver.add_argument(
        "--checkpoints",
        type=Path,
        help="checkpoint file kept elsewhere: shows truncation or a rewritten log",
    )
    cp = asub.add_parser("checkpoint", help="sign the chain head with the HSM and append it")
    cp.add_argument("--config", type=Path, required=True)
    au.set_defaults(func=_cmd_audit)

    ks = sub.add_parser("keys", help="HSM key custody")
    ksub = ks.add_subparsers(dest="keys_command", required=True)
    ru = ksub.add_parser(
        "rotate-unwrap",
        help="generate a new upload-unwrap key (the old one keeps opening batches in flight)",
    )
    ru.add_argument("--config", type=Path, required=True)
    ru.add_argument("--out", type=Path, required=True, help="where to write the new public key")
    ru.set_defaults(func=_cmd_keys_rotate_unwrap)
    rd = ksub.add_parser(
        "rotate-data-key",
        help="seal new feature rows under a new store data key (older rows stay readable)",
    )
    rd.add_argument("--config", type=Path, required=True)
    rd.set_defaults(func=_cmd_keys_rotate_data)

    lb = sub.add_parser("labels", help="labels from downstream systems (docs/labels.md)")
    lb.add_argument("--config", type=Path, required=True)
    lsub = lb.add_subparsers(dest="labels_command", required=True)
    li = lsub.add_parser(
        "import", help="import a CSV of device,label,start,end|event_id; all or nothing"
    )
    li.add_argument("--csv", type=Path, required=True)
    li.add_argument("--source", required=True, help="who made these labels (audited)")
    li.set_defaults(func=_cmd_labels_import)

    ba = sub.add_parser(
        "broker-acl",
        help="write the broker's ACL (Mosquitto acl_file) for this sidecar and label sources",
    )
    ba.add_argument("--config", type=Path, required=True)
    ba.add_argument(
        "--label-source",
        action="append",
        default=[],
        metavar="NAME",
        help="a downstream system's certificate CN allowed to send labels (repeatable)",
    )
    ba.add_argument("--out", type=Path, required=True, help="the device listener's acl_file")
    ba.add_argument("--enroll-out", type=Path, help="also write the enrollment listener's acl_file")
    ba.add_argument(
        "--service-out",
        type=Path,
        help="also write the service listener's acl_file (the sidecar's own CA and listener;"
        " set use_username_as_clientid on the device listener: docs/adr/0018)",
    )
    ba.set_defaults(func=_cmd_broker_acl)

    vc = sub.add_parser("validate-config", help="check a configuration file and report errors")
    vc.add_argument("--config", type=Path, required=True)
    vc.set_defaults(func=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("cloud-sidecar", logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except HsmError as e:
        log.error("HSM: %s", e)
        return EXIT_HSM
    except AuditError as e:
        log.error("audit: %s", e)
        return EXIT_AUDIT
    except (TrainingError, GateRejectedError) as e:
        log.error("%s", e)
        return EXIT_TRAIN
    except CloudError as e:
        log.error("%s", e)
        return EXIT_INPUT if isinstance(e, RegistryError) else EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
