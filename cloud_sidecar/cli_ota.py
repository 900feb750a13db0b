"""``cloud-sidecar ota`` and ``cloud-sidecar rollout``: the OTA repository's commands.

Handlers return 0; errors raise the sidecar's exceptions, which ``cloud_sidecar.__main__``
maps to its exit codes (a bad rollback target is a ``ConfigError``, an unacknowledged
publication a ``CloudError``). Every signing and rollback is audited here.
"""

from __future__ import annotations

import argparse

from cloud_sidecar.errors import CloudError, ConfigError


def _ota_rollback(args: argparse.Namespace) -> int:
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_hsm
    from cloud_sidecar.ota_repo import OtaRepository, publish_via_broker

    cfg = load_config(args.config)
    audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
    hsm = open_hsm(cfg)
    try:
        repo = OtaRepository(cfg.ota_repo_dir, cfg.ota.channel, hsm.signing_public_key_pem())
        pub = repo.roll_back(
            args.to_adapter,
            expires_days=cfg.ota.expires_days,
            keyid=hsm.signing_key_id(),
            sign_digest=hsm.sign_digest,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    finally:
        hsm.close()
    subject = f"adapter-v{args.to_adapter}"
    audit.append(
        "ota.rollback", subject, version=pub.version, adapter_version=pub.target.adapter_version
    )
    audit.append("ota.signed", subject, version=pub.version, target=pub.target.name)
    if args.publish:
        if not publish_via_broker(cfg, repo, pub, "cloud-sidecar-rollback"):
            raise CloudError("the broker did not acknowledge the rollback publication")
        audit.append("ota.published", subject, version=pub.version, channel=cfg.ota.channel)
    print(
        f"targets v{pub.version}: adapter v{pub.target.adapter_version} = earlier v{args.to_adapter}"
    )
    return 0


def cmd_ota(args: argparse.Namespace) -> int:
    if args.ota_command == "rollback":
        return _ota_rollback(args)
    from cloud_sidecar import ota_publish
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_hsm

    cfg = load_config(args.config)
    if args.ota_command == "export":
        files = ota_publish.export(cfg, args.dir)
        print(f"exported {len(files)} files in the TUF layout to {args.dir}")
        return 0
    audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
    hsm = open_hsm(cfg)
    try:
        if args.ota_command == "rotate-key":  # one online role's HSM key, in a new root
            version = ota_publish.rotate_online_key(cfg, hsm, args.role)
            audit.append("ota.key_rotated", args.role, root_version=version)
            what = f"{args.role} key rotated: root v{version}"
        else:
            version = ota_publish.refresh_timestamp(cfg, hsm)
            audit.append("ota.timestamp", f"timestamp-v{version}", version=version)
            what = f"timestamp v{version}"
    finally:
        hsm.close()
    if args.publish and not ota_publish.publish_metadata(cfg, "cloud-sidecar-timestamp"):
        raise CloudError("the broker did not acknowledge the metadata publication")
    print(what)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from cloud_sidecar import ota_publish
    from cloud_sidecar.config import load_config

    cfg = load_config(args.config)
    target = getattr(args, "target", None)
    print(
        ota_publish.rollout_command(cfg, args.rollout_command, target, getattr(args, "steps", None))
    )
    changes = args.rollout_command != "status"
    if args.publish and changes and not ota_publish.publish_metadata(cfg, "cloud-sidecar-rollout"):
        raise CloudError("the broker did not acknowledge the metadata publication")
    return 0
