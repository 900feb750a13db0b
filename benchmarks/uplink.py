"""``edge.uplink_over_raw``: bytes uploaded / bytes of raw 16-bit audio over a simulated day.

Method: the windows the gate released in the pipeline run (their predictions, scores
and features, over the scene's audio span) are replayed back to back until a day of
stream time is covered (one hour of scene: 24 passes). Each pass draws its own audit
samples. Every window goes through the real ``Selector`` and an in-memory
``ReplayStore``; every 64 samples become a batch that is encoded (``fleet_protocol.batch``)
and sealed (``fleet_protocol.envelope``: AES-256-GCM, RSA-3072-OAEP wrap, ECDSA P-256
signature; software keys, the same sizes as the HSM's and the TPM's) and counted at its
sealed size, then acknowledged. Raw audio is 2 bytes per sample at 16 kHz for the whole
day, speech windows included (they are dropped on the device, never sent). MQTT
framing (a few dozen bytes per publish) is not counted.

``max_span_s`` replays less than a day and divides by the raw bytes of that span: the
profile without an uplink budget is stationary, so one pass gives its ratio.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from edge_daemon.buffer import MemoryReplayStore
from edge_daemon.config import SelectionConfig
from edge_daemon.selection import DAY_S, Selector
from fleet_protocol import batch, envelope
from fleet_protocol.batch import SampleMeta

BATCH_SAMPLES = 64
RAW_BYTES_PER_S = 16_000 * 2


@dataclass(frozen=True)
class UplinkResult:
    span_s: float
    uploaded_bytes: int
    raw_bytes: int
    samples: int
    batches: int

    @property
    def ratio(self) -> float:
        return self.uploaded_bytes / self.raw_bytes


class _Sealer:
    def __init__(self) -> None:
        wrap = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self._device = ec.generate_private_key(ec.SECP256R1())
        self._wrap_pem = wrap.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        device_pem = self._device.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._kid_wrap = envelope.key_id_from_pem(self._wrap_pem)
        self._kid_sig = envelope.key_id_from_pem(device_pem)

    def _sign(self, digest: bytes) -> bytes:
        return self._device.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    def seal(self, plain: bytes, seq: int, batch_id: str) -> bytes:
        return envelope.seal(
            plain,
            device="bench-device",
            batch_id=batch_id,
            seq=seq,
            created_at_ms=1_800_000_000_000 + seq,
            wrap_public_key_pem=self._wrap_pem,
            kid_wrap=self._kid_wrap,
            kid_sig=self._kid_sig,
            sign_digest=self._sign,
        )


def simulate_day(
    windows: Path,
    audio_s: float,
    cfg: SelectionConfig,
    *,
    max_span_s: float = DAY_S,
    seed: int = 0,
) -> UplinkResult:
    data = np.load(windows)
    index, label, score = data["index"], data["label"], data["score"]
    feats = data["features"]
    span_s = min(DAY_S, max_span_s)
    rng = np.random.default_rng(seed)
    selector = Selector(cfg, rng)
    store = MemoryReplayStore(cfg.max_buffer_bytes)
    sealer = _Sealer()
    uploaded = n_samples = 0

    def flush(force: bool) -> int:
        sent = 0
        while True:
            pending = store.unbatched(BATCH_SAMPLES)
            if not pending or (len(pending) < BATCH_SAMPLES and not force):
                return sent
            metas = tuple(m for m, _ in pending)
            plain = batch.encode(
                batch.Batch("bench-device", metas, np.stack([f for _, f in pending]))
            )
            seq, batch_id = store.next_seq(), os.urandom(16).hex()
            sealed = sealer.seal(plain, seq, batch_id)
            store.commit_batch(batch_id, seq, seq, sealed, [m.sample_id for m in metas])
            store.mark_acked(batch_id)
            sent += len(sealed)

    for rep in range(math.ceil(span_s / audio_s)):
        offset = rep * audio_s
        for j in range(len(index)):
            stream_s = offset + float(index[j])
            if stream_s >= span_s:
                break
            s = float(score[j])
            reason = selector.decide(s, stream_s=stream_s, pending_bytes=store.pending_bytes)
            if reason is None:
                continue
            meta = SampleMeta(
                sample_id=os.urandom(16).hex(),
                captured_at_ms=int(stream_s * 1000),
                stream_offset_s=stream_s,
                predicted=str(label[j]),
                score=min(1.0, max(0.0, s)),
                model_sha256="ab" * 32,
                reason=reason,
            )
            n_samples += store.add(meta, feats[j])
            uploaded += flush(force=False)
    uploaded += flush(force=True)
    return UplinkResult(
        span_s=span_s,
        uploaded_bytes=uploaded,
        raw_bytes=int(span_s * RAW_BYTES_PER_S),
        samples=n_samples,
        batches=store.next_seq(),
    )
