"""DevStack mints certificates for label sources, and they work against its real broker.

A label source from ``DevStack(label_sources=...)`` connects with its certificate,
publishes on its own labels topic, and the sidecar's identity receives it on the shared
label subscription (``topics.labels_subscription()``); what it publishes on another
source's topic reaches no one (ordered behind its own message, so no timeout decides).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from devstack.stack import DevStack
from fleet_protocol import topics
from fleet_protocol.io.mqtt import MqttLink

pytestmark = pytest.mark.integration

SOURCE, OTHER = "city-labels", "reviewer-1"
WAIT_S = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with pytest.MonkeyPatch.context() as mp:  # DevStack sets SOFTHSM2_CONF
        mp.delenv("SOFTHSM2_CONF", raising=False)
        with DevStack(
            tmp_path_factory.mktemp("labels"), n_devices=0, label_sources=(SOURCE, OTHER)
        ) as s:
            yield s


def test_a_devstack_label_source_sends_its_labels_to_the_sidecar_identity(
    stack: DevStack,
) -> None:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    sidecar = MqttLink(
        stack.endpoint(stack.cloud_cert), "labels-reader", lambda t, p: got.put((t, p))
    )
    sidecar.subscribe(topics.labels_subscription(), 1)
    sidecar.start(wait_s=WAIT_S)
    time.sleep(0.3)  # let the subscription settle
    source = MqttLink(stack.endpoint(stack.label_source_certs[SOURCE]), SOURCE, lambda t, p: None)
    source.start(wait_s=WAIT_S)
    try:
        assert source.publish(topics.labels(OTHER), b"forged", timeout_s=WAIT_S)
        assert source.publish(topics.labels(SOURCE), b"labels-1", timeout_s=WAIT_S)
        assert got.get(timeout=WAIT_S) == (topics.labels(SOURCE), b"labels-1")
        assert got.empty()
    finally:
        source.stop()
        sidecar.stop()
    assert set(stack.label_source_certs) == {SOURCE, OTHER}
