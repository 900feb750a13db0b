"""The SQLite store's schema and its numbered upgrades (cloud_sidecar/store.py runs them).

Owns: ``SCHEMA`` (version 1), ``UPGRADES[n]`` (SQL taking a store from version n-1 to
n) and ``SCHEMA_VERSION``. Invariants: one upgrade per version, each run in one
transaction; version numbers match the PostgreSQL store's (cloud_sidecar/store_pg.py);
version 5 (``data_keys``) is completed in Python by ``Store``, which seals the
features stored in clear before it, in the same transaction (docs/adr/0022).
"""

from __future__ import annotations

SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    public_key_pem BLOB NOT NULL,
    key_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    registered_at_ms INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    seq INTEGER NOT NULL,
    digest TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    region TEXT NOT NULL
);
CREATE TABLE samples (
    sample_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    batch_id TEXT NOT NULL REFERENCES batches(batch_id),
    captured_at_ms INTEGER NOT NULL,
    predicted TEXT NOT NULL,
    score REAL NOT NULL,
    feedback TEXT,
    reason TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    features BLOB NOT NULL,
    region TEXT NOT NULL,
    PRIMARY KEY (device_id, sample_id)
);
"""


# Upgrade steps: _UPGRADES[n] takes a store at version n-1 to version n (one transaction).
UPGRADES: dict[int, str] = {
    # 2: enrollment (cloud_sidecar/fleet.py): one-time claims, issued certificate serials
    2: """
CREATE TABLE claims (
    claim_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER,
    region TEXT NOT NULL
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    not_before_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    issued_at_ms INTEGER NOT NULL,
    via TEXT NOT NULL,
    revoked_at_ms INTEGER,
    region TEXT NOT NULL
);
CREATE INDEX certificates_device ON certificates(device_id);
""",
    # 3: labels come from outside the device (cloud_sidecar/labels.py), joined to samples
    # by device and capture time; the simulated per-sample feedback column goes
    3: """
CREATE TABLE labels (
    label_id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    import_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    region TEXT NOT NULL
);
CREATE INDEX labels_device_time ON labels(device_id, start_ms);
CREATE INDEX samples_device_time ON samples(device_id, captured_at_ms);
ALTER TABLE samples DROP COLUMN feedback;
""",
    # 4: replay window per device and sequence epoch (docs/adr/0017); batches so far are
    # epoch 0 (envelope header v1), whose window starts at the old strict ``last_seq``
    4: """
ALTER TABLE batches ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX batches_device_epoch_seq ON batches(device_id, epoch, seq);
CREATE TABLE replay_windows (
    device_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, epoch)
);
INSERT INTO replay_windows SELECT device_id, 0, last_seq, registered_at_ms FROM devices
    WHERE last_seq >= 0;
""",
}

UPGRADES[5] = """
CREATE TABLE data_keys (
    kid TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"""
assert sorted(UPGRADES) == list(range(2, SCHEMA_VERSION + 1)), "one upgrade per version"

__all__ = ["SCHEMA", "SCHEMA_VERSION", "UPGRADES"]
