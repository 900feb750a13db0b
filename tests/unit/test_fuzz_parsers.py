"""Property/fuzz tests for every parser of untrusted bytes: only the parser's own error.

Each parser gets random bytes, nesting bombs, structurally plausible documents (the
right field names with random values) and mutations of a valid input. The only
exception allowed out of a parser is its documented error root (``ProtocolError``,
``AdapterError``, ``ConfigError``); anything else (``RecursionError``, ``TypeError``,
``UnicodeDecodeError``, ...) fails the test.

Strings range over every code point, lone surrogates included (sent escaped, and raw
as the bytes UTF-8 forbids); numbers include huge integers and floats; documents nest
deep and carry wrong types.

Examples here: ``TOTAL_EXAMPLES`` (6,100); tests/unit/test_envelope.py (4,600) and
tests/unit/test_batch.py (3,000) add 7,600 more for ``envelope.parse`` and
``batch.decode``, and tests/unit/test_wire_messages.py fuzzes every ``WireModel``
message (lone surrogates, huge numbers, deep nesting, wrong types, extra fields). Hypothesis runs each test up to ``max_examples``
(fewer only if the strategy's space is exhausted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import tempfile
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sidecar.config import load_config as load_cloud_config
from cloud_sidecar.errors import ConfigError as CloudConfigError
from edge_daemon.config import load_config as load_device_config
from edge_daemon.errors import ConfigError as DeviceConfigError
from fleet_model.adapter import (
    EdgeAdapter,
    LowRankLayer,
    encode_edge_adapter,
    parse_edge_adapter,
)
from fleet_model.errors import AdapterError
from fleet_protocol import batch, enroll, messages, ota, telemetry, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.features import N_BANDS, N_FRAMES

EXAMPLES = {
    "messages": 1500,
    "enroll": 1200,
    "ota": 1200,
    "adapter": 800,
    "device_config": 500,
    "cloud_config": 300,
    "topics": 300,
    "batch_manifest": 300,
}
TOTAL_EXAMPLES = sum(EXAMPLES.values())


def _fuzz(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def _only(errors: type[Exception], fn: Callable[[], Any]) -> None:
    with contextlib.suppress(errors):
        fn()


# -- shared strategies -------------------------------------------------------------------

# Any code point, lone surrogates (category Cs) included: "\ud800" must not escape as
# UnicodeEncodeError from whoever canonicalises a document (issue 9).
_any_text = st.text(st.characters(codec=None, categories=None), max_size=24)
_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
_huge = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**300, 1e308, -1e308, 5e-324])
_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | _huge
    | st.floats()
    | st.text(max_size=24)
    | _any_text
    | st.tuples(st.text(max_size=8), _surrogate).map("".join)
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=6,
)
# Nesting bombs and other inputs json.loads chokes on in ways other than ValueError.
_bombs = st.one_of(
    st.integers(900, 3000).map(lambda n: b"[" * n),
    st.integers(900, 3000).map(lambda n: b'{"a":' * n),
    st.integers(4290, 4400).map(lambda n: b"9" * n),  # int of more than 4300 digits
    st.binary(max_size=64).map(lambda b: b"\xff\xfe" + b),  # not UTF-8
    st.sampled_from([b"NaN", b"Infinity", b'{"a":-Infinity}', b"\x00", b""]),
    st.sampled_from([b'{"v":1e400}', b'{"v":-1e400}', b'{"v":"\\ud800"}', b'{"\\udfff":1}']),
    st.integers(1, 2000).map(lambda n: b'{"v":' + b"9" * n + b"}"),  # huge, under the cap
    st.integers(1, 4000).map(lambda n: b'{"v":' + b"[" * n + b"]" * n + b"}"),  # deep, closed
)


def _mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, at, arg in ops:
        pos = at % (len(buf) + 1)
        if kind == 0 and pos < len(buf):
            buf[pos] ^= arg[0] if arg else 1
        elif kind == 1:
            del buf[pos : pos + len(arg) * 8]
        else:
            buf[pos:pos] = arg
    return bytes(buf)


_ops = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=4,
)


def _doc_for(names: list[str], pool: list[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts over ``names`` (sometimes one missing or one extra) with plausible values."""
    value = st.one_of(st.sampled_from(pool), _scalar, _json)
    exact = st.fixed_dictionaries({n: value for n in names})
    return st.one_of(
        exact,
        st.tuples(exact, st.sampled_from(names)).map(lambda t: _drop(*t)),
        st.tuples(exact, st.text(max_size=8), value).map(lambda t: {**t[0], t[1]: t[2]}),
    )


def _drop(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _encode(doc: Any, canonical: bool, raw_surrogates: bool = False) -> bytes:
    """JSON bytes of ``doc``; a lone surrogate travels as a ``\\ud800`` escape, or with
    ``raw_surrogates`` as the three bytes UTF-8 forbids (``surrogatepass``)."""
    if canonical:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(doc)
    try:
        return text.encode()
    except UnicodeEncodeError:
        if raw_surrogates:
            return text.encode("utf-8", "surrogatepass")
        return json.dumps(doc, sort_keys=canonical, separators=(",", ":")).encode()


def _json_bytes(docs: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.tuples(docs, st.booleans(), st.booleans()).map(lambda t: _encode(*t))


def _cases(classes: list[Any], pool: list[Any]) -> st.SearchStrategy[tuple[Any, bytes]]:
    """(message class, input bytes): random, bombs, or the class's fields with odd values."""
    return st.one_of(
        *(
            st.tuples(
                st.just(cls),
                st.one_of(
                    st.binary(max_size=300),
                    _bombs,
                    _json_bytes(_doc_for(list(cls.model_fields), pool)),
                ),
            )
            for cls in classes
        )
    )


# -- control messages (fleet_protocol.messages) ------------------------------------------

_MESSAGE_POOL: list[Any] = [
    "pi-00",
    "stored",
    "rejected",
    "applied",
    "failed",
    "siren",
    "ab" * 32,
    "00" * 16,
    0,
    1,
    -1,
    0.5,
    "",
]


@_fuzz(EXAMPLES["messages"])
@given(_cases([messages.Ack, messages.OtaStatus, messages.Event], _MESSAGE_POOL))
def test_control_messages_raise_only_protocol_errors(case: tuple[Any, bytes]) -> None:
    cls, data = case
    _only(ProtocolError, lambda: cls.from_bytes(data))


@_fuzz(EXAMPLES["messages"])
@given(_cases([telemetry.Telemetry], [*_MESSAGE_POOL, [], [{"sensor": "t"}]]))
def test_telemetry_messages_raise_only_protocol_errors(case: tuple[Any, bytes]) -> None:
    cls, data = case
    _only(ProtocolError, lambda: cls.from_bytes(data))


# -- enrollment messages (fleet_protocol.enroll) -----------------------------------------

_PEM = "-----BEGIN CERTIFICATE REQUEST-----\nTUlJQg==\n-----END CERTIFICATE REQUEST-----\n"
_ENROLL_POOL: list[Any] = [
    "pi-00",
    "0123456789abcdef",
    "A" * 43,
    _PEM,
    "ab" * 16,
    "MEUCIQ==",
    "issued",
    "rejected",
    "no_claim",
    1,
    0,
    2**63,
    "",
]


@_fuzz(EXAMPLES["enroll"])
@given(_cases([enroll.EnrollRequest, enroll.RenewRequest, enroll.CertResponse], _ENROLL_POOL))
def test_enrollment_messages_raise_only_protocol_errors(case: tuple[Any, bytes]) -> None:
    cls, data = case
    _only(ProtocolError, lambda: cls.from_bytes(data))


# -- OTA targets metadata (fleet_protocol.ota) -------------------------------------------

_OTA_KEY = ec.derive_private_key(0x5EED, ec.SECP256R1())
_OTA_PEM = _OTA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _sign(digest: bytes) -> bytes:
    return _OTA_KEY.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


_TARGET = ota.TargetInfo("adapter-v1.safetensors", 10, "ab" * 32, "cd" * 32, "lora", "all", 1)
_VALID_TARGETS = ota.build_targets(
    version=2, expires=_NOW + timedelta(days=1), targets=(_TARGET,), keyid="k1", sign_digest=_sign
)
_SIGNED: dict[str, Any] = json.loads(_VALID_TARGETS)["signed"]
_TARGET_DOC: dict[str, Any] = _SIGNED["targets"][_TARGET.name]


def _resigned(signed: dict[str, Any]) -> bytes:
    """A document the trusted key really signed: reaches the checks after the signature."""
    sig = _sign(hashlib.sha256(ota.canonical(signed)).digest())
    return ota.canonical({"signed": signed, "signatures": [{"keyid": "k1", "sig": sig.hex()}]})


_ota_pool: list[Any] = ["targets", 1, 2, 0, True, "2031-01-01T00:00:00Z", "ab" * 32, {}, []]
_signed_edits = st.dictionaries(
    st.sampled_from([*sorted(_SIGNED), "x"]),
    st.one_of(st.sampled_from(_ota_pool), _json),
    max_size=3,
)
_target_edits = st.dictionaries(
    st.sampled_from(["length", "hashes", "custom", "x"]),
    st.one_of(st.sampled_from(_ota_pool), _json),
    max_size=2,
)
_custom_edits = st.dictionaries(
    st.sampled_from([*sorted(_TARGET_DOC["custom"]), "x"]),
    st.one_of(st.sampled_from(_ota_pool), _json),
    max_size=3,
)


def _unsigned_targets(t: tuple[dict[str, Any], str, bool]) -> bytes:
    """A document whose ``signed`` part holds anything (lone surrogates, huge numbers,
    deep nesting, wrong types): ``verify_targets`` canonicalises it before the signature
    check, so it must refuse these with ``ProtocolError`` whoever sent them."""
    edits, sig, raw = t
    return _encode(
        {"signed": {**_SIGNED, **edits}, "signatures": [{"keyid": "k1", "sig": sig}]}, True, raw
    )


def _edited_targets(t: tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]) -> bytes:
    signed_edits, target_edits, custom_edits, name = t
    target = {**_TARGET_DOC, **target_edits}
    if isinstance(target.get("custom"), dict):
        target["custom"] = {**target["custom"], **custom_edits}
    try:
        return _resigned({**_SIGNED, "targets": {name: target}, **signed_edits})
    except ProtocolError:  # unsignable (a lone surrogate): send it unsigned instead
        return _unsigned_targets(({**signed_edits, "targets": {name: target}}, "00", False))


@_fuzz(EXAMPLES["ota"])
@given(
    st.one_of(
        st.binary(max_size=400),
        _bombs,
        _ops.map(lambda ops: _mutate(_VALID_TARGETS, ops)),
        st.tuples(
            _signed_edits,
            _target_edits,
            _custom_edits,
            st.one_of(st.just(_TARGET.name), st.text(max_size=140), _any_text),
        ).map(_edited_targets),
        st.tuples(
            st.dictionaries(
                st.one_of(st.sampled_from([*sorted(_SIGNED), "x"]), _any_text),
                _json,
                max_size=3,
            ),
            st.sampled_from(["00", "", "zz"]),
            st.booleans(),
        ).map(_unsigned_targets),
    )
)
def test_ota_targets_verification_raises_only_protocol_errors(data: bytes) -> None:
    _only(
        ProtocolError,
        lambda: ota.verify_targets(
            data, trusted_key_pem=_OTA_PEM, trusted_keyid="k1", current_version=1, now=_NOW
        ),
    )


# -- edge adapter (fleet_model.adapter) ----------------------------------------

_rng = np.random.default_rng(7)
_VALID_ADAPTER = encode_edge_adapter(
    EdgeAdapter(
        "ef" * 32,
        (
            LowRankLayer(
                "fc.weight",
                _rng.standard_normal((2, 4)).astype(np.float32),
                _rng.standard_normal((3, 2)).astype(np.float32),
                0.5,
            ),
        ),
    )
)


def _safetensors(t: tuple[dict[str, Any], bytes]) -> bytes:
    header, body = t
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


_adapter_headers = st.fixed_dictionaries(
    {
        "__metadata__": st.one_of(
            _json,
            st.fixed_dictionaries(
                {
                    "format": st.sampled_from(["lora-lowrank-v1", "x"]),
                    "base_model_sha256": st.sampled_from(["ef" * 32, "zz"]),
                    "layers": st.one_of(
                        st.text(max_size=20),
                        st.lists(_json, max_size=3).map(json.dumps),
                        st.just(json.dumps([{"initializer": "fc.weight", "scale": 0.5}])),
                    ),
                }
            ),
        ),
        "fc.weight.lora_A": st.one_of(
            _json,
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X"]),
                    "shape": st.lists(st.integers(-2, 2**40), max_size=5),
                    "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3),
                }
            ),
        ),
    }
)


@_fuzz(EXAMPLES["adapter"])
@given(
    st.one_of(
        st.binary(max_size=300),
        _bombs.map(lambda b: struct.pack("<Q", len(b)) + b),
        _ops.map(lambda ops: _mutate(_VALID_ADAPTER, ops)),
        st.tuples(_adapter_headers, st.binary(max_size=64)).map(_safetensors),
    )
)
def test_edge_adapter_parse_raises_only_adapter_errors(data: bytes) -> None:
    _only(AdapterError, lambda: parse_edge_adapter(data))


# -- configuration files (edge and cloud) ------------------------------------------------

_TMP = Path(tempfile.mkdtemp(prefix="fuzz-config-"))

_DEVICE_DOC: dict[str, Any] = {
    "device_id": "pi-00",
    "state_dir": "/var/lib/edge",
    "broker": {
        "host": "127.0.0.1",
        "port": 8883,
        "ca_cert": "/ca.pem",
        "client_cert": "/c.pem",
        "client_key": "/k.pem",
    },
    "tpm": {"tcti": "device:/dev/tpmrm0"},
    "cloud": {"unwrap_public_key": "/u.pem", "ota_public_key": "/o.pem"},
    "model": {"base_fp32": "/a.onnx", "base_int8": "/b.onnx"},
    "source": {"type": "live", "device": "mic"},
}
_CLOUD_DOC: dict[str, Any] = {
    "data_dir": "/srv/data",
    "region": "eu-central-1",
    "base_model_dir": "/srv/base",
    "broker": {
        "ca_cert": "/ca.pem",
        "client_cert": "/c.pem",
        "client_key": "/k.pem",
        "region": "eu-west-1",
    },
    "hsm": {"module": "/p11.so", "token_label": "t", "region": "on-prem-de"},
}
_config_pool: list[Any] = [0, -1, 65536, 1.5, "", "x", None, True, [], {}, "eu-west-2", "../.."]


def _config_docs(base: dict[str, Any]) -> st.SearchStrategy[Any]:
    nested = [k for k, v in base.items() if isinstance(v, dict)]
    leaf = st.one_of(st.sampled_from(_config_pool), _json)

    def edit(t: tuple[dict[str, Any], str, dict[str, Any]]) -> dict[str, Any]:
        top, section, inner = t
        doc = {**base, **top}
        if isinstance(doc.get(section), dict):
            doc[section] = {**doc[section], **inner}
        return doc

    return st.tuples(
        st.dictionaries(st.sampled_from([*sorted(base), "extra"]), leaf, max_size=2),
        st.sampled_from(nested),
        st.dictionaries(
            st.text(min_size=1, max_size=12) | st.sampled_from(["type", "port"]), leaf, max_size=2
        ),
    ).map(edit)


def _config_bytes(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    valid = json.dumps(base).encode()
    return st.one_of(
        st.binary(max_size=200),
        _bombs,
        _ops.map(lambda ops: _mutate(valid, ops)),
        _json_bytes(_config_docs(base)),
    )


@_fuzz(EXAMPLES["device_config"])
@given(_config_bytes(_DEVICE_DOC))
def test_device_config_loading_raises_only_config_errors(data: bytes) -> None:
    path = _TMP / "device.json"
    path.write_bytes(data)
    _only(DeviceConfigError, lambda: load_device_config(path))


@_fuzz(EXAMPLES["cloud_config"])
@given(_config_bytes(_CLOUD_DOC))
def test_cloud_config_loading_raises_only_config_errors(data: bytes) -> None:
    path = _TMP / "cloud.json"
    path.write_bytes(data)
    _only(CloudConfigError, lambda: load_cloud_config(path))


def test_valid_fuzz_seeds_parse() -> None:
    """The seeds the mutations start from are valid, so mutations explore near valid input."""
    path = _TMP / "seed.json"
    path.write_text(json.dumps(_DEVICE_DOC))
    assert load_device_config(path).device_id == "pi-00"
    path.write_text(json.dumps(_CLOUD_DOC))
    assert load_cloud_config(path).hsm.region == "on-prem-de"
    assert parse_edge_adapter(_VALID_ADAPTER).layers[0].initializer == "fc.weight"
    v = ota.verify_targets(
        _VALID_TARGETS, trusted_key_pem=_OTA_PEM, trusted_keyid="k1", current_version=1, now=_NOW
    )
    assert v.targets == (_TARGET,)


# -- topics and the batch manifest -------------------------------------------------------


@_fuzz(EXAMPLES["topics"])
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(max_size=40).map(lambda d: f"{topics.PREFIX}/{d}/upload"),
        st.from_regex(r"fleet/v1/[a-z0-9/+#$-]{0,40}/upload", fullmatch=True),
    )
)
def test_upload_topic_parsing_raises_only_protocol_errors(topic: str) -> None:
    _only(ProtocolError, lambda: topics.device_of_upload(topic))


_manifests = st.one_of(
    _bombs,
    _json_bytes(
        _doc_for(
            ["v", "feature_version", "device", "shape", "dtype", "samples"],
            [1, 2, "pi-00", [N_BANDS, N_FRAMES], "float16", [], [{}], [{"sample_id": 1}]],
        )
    ),
)


@_fuzz(EXAMPLES["batch_manifest"])
@given(_manifests, st.binary(max_size=64))
def test_batch_manifest_documents_raise_only_protocol_errors(manifest: bytes, rest: bytes) -> None:
    plain = struct.pack(">I", len(manifest)) + manifest + rest
    _only(ProtocolError, lambda: batch.decode(zlib.compress(plain)))
