"""The broker ACL (fleet_protocol.acl): one source of truth with the topics the code uses.

Every topic an ACL line names is produced by a ``fleet_protocol.topics`` function that
edge_daemon/ or cloud_sidecar/ calls (``topics.<name>(`` in their source), so the ACL
cannot grant a topic no code uses, nor spell a topic differently from the code. The
real broker enforcing these rules is tested in tests/integration/test_broker_mtls.py
and test_label_sources_acl.py.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from cloud_sidecar.__main__ import main as cloud_main
from devstack.pki import DevCA
from fleet_protocol import acl, topics
from fleet_protocol.errors import MalformedError

ROOT = Path(__file__).parents[2]
ADMIN = "cloud-sidecar"
SOURCES = ("city-labels", "reviewer-1")


def _lines(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _rules(text: str) -> list[tuple[str, str, str]]:
    """``(keyword, access, topic)`` of every topic/pattern line."""
    return [(w[0], w[1], w[2]) for w in _lines(text) if w[0] in ("topic", "pattern")]


def _users(text: str) -> dict[str, list[tuple[str, str]]]:
    """``user`` -> its ``(access, topic)`` lines."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for w in _lines(text):
        if w[0] == "user":
            current = w[1]
            out[current] = []
        elif w[0] == "topic":
            assert current is not None, "a topic line outside a user block applies to anonymous"
            out[current].append((w[1], w[2]))
    return out


def _normal(topic: str, names: tuple[str, ...] = ()) -> str:
    """Placeholders and identity names become ``<id>``: a topic's shape."""
    levels = topic.split("/")
    return "/".join("<id>" if lv in ("+", "%u", "%c", *names) else lv for lv in levels)


def _topic_builders() -> dict[str, str]:
    """Shape -> name of the topics.py function producing it (called with placeholders)."""
    shapes: dict[str, str] = {}
    for name, fn in vars(topics).items():
        if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != topics.__name__:
            continue
        n = len(inspect.signature(fn).parameters)
        try:
            topic = fn(*[topics.ANY] * n)
        except (MalformedError, TypeError):
            continue  # a parser or a check, not a builder
        if isinstance(topic, str) and topic.startswith(f"{topics.PREFIX}/"):
            shapes.setdefault(_normal(topic), name)
    return shapes


def _service_source() -> str:
    files = [*(ROOT / "edge_daemon").rglob("*.py"), *(ROOT / "cloud_sidecar").rglob("*.py")]
    return "\n".join(p.read_text() for p in files)


# Topics only outside clients publish on (a downstream label source) are used by the
# services through the subscription and the parser that read them.
CONSUMED_VIA = {"labels": ("labels_subscription", "source_of_labels")}


def _called(name: str, source: str) -> bool:
    names = (name, *CONSUMED_VIA.get(name, ()))
    return any(re.search(rf"\btopics\.{n}\(", source) for n in names)


FULL = acl.broker_acl([ADMIN], SOURCES, enrollment=True) + acl.enroll_acl()


def test_every_acl_topic_is_built_by_a_topics_function_the_services_call() -> None:
    shapes, source = _topic_builders(), _service_source()
    rules = _rules(FULL)
    assert len(rules) > 20
    for keyword, access, topic in rules:
        assert access in ("read", "write"), f"{topic}: {access}"
        name = shapes.get(_normal(topic, SOURCES))
        assert name is not None, f"no topics.py function builds {topic}"
        assert _called(name, source), f"{keyword} {topic}: topics.{name}() is called nowhere"


def test_no_rule_uses_a_multi_level_wildcard_or_the_whole_tree() -> None:
    for _, _, topic in _rules(FULL):
        assert "#" not in topic
        assert topic.startswith(f"{topics.PREFIX}/")


def test_a_device_writes_only_its_own_subtree_and_reads_its_acks_and_the_ota_tree() -> None:
    patterns = [(a, t) for k, a, t in _rules(acl.broker_acl([ADMIN])) if k == "pattern"]
    assert patterns == [
        ("write", "fleet/v1/%u/upload"),
        ("write", "fleet/v1/%u/events"),
        ("write", "fleet/v1/%u/telemetry"),
        ("write", "fleet/v1/%u/ota/status"),
        ("write", "fleet/v1/%u/cert/request"),
        ("read", "fleet/v1/%u/ack"),
        ("read", "fleet/v1/%u/cert/response"),
        ("read", "fleet/v1/ota/+/+"),
        ("read", "fleet/v1/ota/+/artifacts/+"),
        ("read", "fleet/v1/ota/+/metadata/+"),
        ("write", "fleet/v1/%u/ota/request"),
        ("read", "fleet/v1/%u/ota/response"),
    ]


def test_the_admin_gets_only_the_topics_the_sidecar_uses() -> None:
    rules = dict.fromkeys(_users(acl.broker_acl([ADMIN]))[ADMIN])
    reads = {t for a, t in rules if a == "read"}
    writes = {t for a, t in rules if a == "write"}
    assert reads == {
        "fleet/v1/+/upload",
        "fleet/v1/+/events",
        "fleet/v1/+/telemetry",
        "fleet/v1/+/ota/status",
        "fleet/v1/+/cert/request",
        "fleet/v1/+/ota/request",
        "fleet/v1/enroll/+/request",
        "fleet/v1/labels/+",
    }
    assert writes == {
        "fleet/v1/+/ack",
        "fleet/v1/+/cert/response",
        "fleet/v1/enroll/+/response",
        "fleet/v1/+/ota/response",
        "fleet/v1/labels/+/result",
    }  # never the OTA tree: that is the OTA publisher's alone


def test_only_the_ota_publisher_writes_the_ota_tree_and_it_writes_nothing_else() -> None:
    text = acl.service_acl([ADMIN], ["cloud-sidecar-ota"])
    users = _users(text)
    assert set(users["cloud-sidecar-ota"]) == {
        ("write", "fleet/v1/ota/+/+"),
        ("write", "fleet/v1/ota/+/artifacts/+"),
        ("write", "fleet/v1/ota/+/metadata/+"),
    }
    assert not any(t.startswith("fleet/v1/ota/") and a == "write" for a, t in users[ADMIN])
    with pytest.raises(MalformedError):
        acl.service_acl([ADMIN], [ADMIN])  # one identity cannot be both


def test_each_label_source_writes_its_labels_and_reads_its_result_only() -> None:
    users = _users(acl.broker_acl([ADMIN], SOURCES))
    for source in SOURCES:
        assert users[source] == [
            ("write", f"fleet/v1/labels/{source}"),
            ("read", f"fleet/v1/labels/{source}/result"),
        ]
    assert set(users) == {ADMIN, *SOURCES}


def test_the_label_topic_helpers_round_trip() -> None:
    assert topics.labels("city-labels") == "fleet/v1/labels/city-labels"
    assert topics.labels_result("city-labels") == "fleet/v1/labels/city-labels/result"
    assert topics.labels_subscription() == "$share/ingest/fleet/v1/labels/+"
    assert topics.source_of_labels(topics.labels("city-labels")) == "city-labels"
    for bad in ("fleet/v1/labels/a/result", "fleet/v1/labels/", "fleet/v1/labels/Bad", "x"):
        with pytest.raises(MalformedError):
            topics.source_of_labels(bad)
    with pytest.raises(MalformedError):
        topics.labels("+")  # a plain string is never a placeholder


def test_enrollment_rules_on_their_listener_and_on_a_single_listener() -> None:
    assert _rules(acl.enroll_acl()) == [
        ("pattern", "write", "fleet/v1/enroll/%c/request"),
        ("pattern", "read", "fleet/v1/enroll/%c/response"),
    ]
    single = _rules(acl.broker_acl([ADMIN], enrollment=True))
    assert single[-2:] == _rules(acl.enroll_acl())
    assert not [r for r in _rules(acl.broker_acl([ADMIN])) if "enroll/%c" in r[2]]


@pytest.mark.parametrize(
    ("admins", "sources"),
    [
        ([ADMIN], ["ota"]),
        ([ADMIN], ["labels"]),
        (["enroll"], []),
        ([ADMIN], [ADMIN]),
        ([ADMIN], ["Bad Name"]),
        ([ADMIN], ["a/b"]),
        ([ADMIN], ["+"]),
        ([ADMIN], ["src", "src"]),
    ],
)
def test_invalid_reserved_or_overlapping_identities_are_refused(
    admins: list[str], sources: list[str]
) -> None:
    with pytest.raises(MalformedError) as e:
        acl.broker_acl(admins, sources)
    assert e.value.reason == "bad_identity"


def _cloud_config(tmp_path: Path) -> Path:
    ca = DevCA.create(tmp_path / "ca")
    pair = ca.issue_client("sidecar-eu-1")
    doc = {
        "data_dir": str(tmp_path / "data"),
        "region": "eu-central-1",
        "base_model_dir": str(tmp_path / "base"),
        "broker": {
            "ca_cert": str(ca.cert_path),
            "client_cert": str(pair.cert),
            "client_key": str(pair.key),
            "region": "eu-west-1",
        },
        "hsm": {"module": "/p11.so", "token_label": "t", "region": "on-prem-de"},
    }
    path = tmp_path / "cloud.json"
    path.write_text(json.dumps(doc))
    return path


def test_cli_writes_the_production_acl_for_the_configured_identity(tmp_path: Path) -> None:
    cfg = _cloud_config(tmp_path)
    out, enroll_out = tmp_path / "acl", tmp_path / "acl-enroll"
    argv = ["broker-acl", "--config", str(cfg), "--out", str(out), "--enroll-out", str(enroll_out)]
    assert cloud_main([*argv, "--label-source", "city-labels", "--label-source", "reviewer-1"]) == 0
    assert out.read_text() == acl.broker_acl(["sidecar-eu-1"], ["city-labels", "reviewer-1"])
    assert enroll_out.read_text() == acl.enroll_acl()


def test_cli_refuses_a_reserved_label_source_and_writes_nothing(tmp_path: Path) -> None:
    cfg = _cloud_config(tmp_path)
    out = tmp_path / "acl"
    argv = ["broker-acl", "--config", str(cfg), "--out", str(out), "--label-source", "ota"]
    assert cloud_main(argv) == 2
    assert not out.exists()


def test_the_service_listener_acl_holds_only_the_admin_block(tmp_path: Path) -> None:
    """Issue 9: the sidecar connects on its own listener (its own CA, free client ids);
    no device pattern applies there, so it gets exactly the topics the sidecar uses."""
    text = acl.service_acl(["sidecar-eu-1"])
    assert "pattern" not in text
    assert text.count("user ") == 1 and "user sidecar-eu-1" in text
    assert [ln for ln in text.splitlines() if ln.startswith("topic ")] == [
        r.line("topic") for r in acl.admin_rules()
    ]
    cfg = _cloud_config(tmp_path)
    out, service_out = tmp_path / "acl", tmp_path / "acl-service"
    argv = [
        "broker-acl",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--service-out",
        str(service_out),
    ]
    assert cloud_main(argv) == 0
    assert service_out.read_text() == text


def test_cli_gives_the_ota_publisher_its_own_block_and_refuses_serves_own_cn(
    tmp_path: Path,
) -> None:
    cfg = _cloud_config(tmp_path)
    doc = json.loads(cfg.read_text())
    ca = DevCA.load(tmp_path / "ca")
    publisher = ca.issue_client("sidecar-eu-1-ota")
    doc["broker"] |= {"ota_client_cert": str(publisher.cert), "ota_client_key": str(publisher.key)}
    cfg.write_text(json.dumps(doc))
    out, service_out = tmp_path / "acl", tmp_path / "acl-service"
    argv = [
        "broker-acl",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--service-out",
        str(service_out),
    ]
    assert cloud_main(argv) == 0
    assert service_out.read_text() == acl.service_acl(["sidecar-eu-1"], ["sidecar-eu-1-ota"])
    doc["broker"]["ota_client_cert"] = doc["broker"]["client_cert"]  # serve's own CN
    cfg.write_text(json.dumps(doc))
    out.unlink()
    assert cloud_main(argv) == 2
    assert not out.exists()
