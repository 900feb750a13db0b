"""A small MQTT-over-mTLS client both services share (paho-mqtt 2.x, MQTT 5).

It owns: TLS 1.3 with a client certificate, automatic reconnect, re-subscribing after
every reconnect, and turning paho's callbacks into one ``on_message(topic, payload)``
call (or, for a message that carries MQTT 5 request/response properties, one
``on_request(topic, payload, response_topic, correlation_data)`` call when given). It
owns no protocol decisions. A handler's exception is caught, counted (``faults``, loop
``mqtt``) and logged: no message stops the network thread. ``publish`` waits for the
broker's PUBACK (QoS 1)
up to a timeout and reports success; callers that must not lose data keep it until
an application-level ack (the device's replay buffer does).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet_protocol.io.guard import LoopFaults

log = logging.getLogger(__name__)


class TransportError(Exception):
    """The broker could not be reached, refused us, or did not acknowledge in time."""


@dataclass(frozen=True)
class MqttEndpoint:
    host: str
    port: int
    ca_cert: Path
    client_cert: Path
    client_key: Path
    keepalive_s: int = 30
    key_password: bytes | None = None  # an encrypted PKCS#8 client key (edge_daemon/enroll.py)


class MqttLink:
    def __init__(
        self,
        endpoint: MqttEndpoint,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        subscriptions: Sequence[tuple[str, int]] = (),
        max_inflight: int = 20,
        faults: LoopFaults | None = None,
        on_request: Callable[[str, bytes, str | None, bytes | None], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.faults = faults if faults is not None else LoopFaults()
        self._on_message = on_message
        self._on_request = on_request
        self._subs = list(subscriptions)
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.max_inflight_messages_set(max_inflight)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(endpoint.ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(
            str(endpoint.client_cert), str(endpoint.client_key), endpoint.key_password
        )
        self._ctx = ctx
        self._client.tls_set_context(ctx)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    def _handle_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.warning("broker refused connection: %s", rc)
            return
        for topic, qos in self._subs:
            client.subscribe(topic, qos)
        self._connected.set()
        log.info("connected to %s:%s", self.endpoint.host, self.endpoint.port)

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self._connected.clear()
        log.info("disconnected from broker: %s", rc)

    def _handle_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.faults.guard("mqtt"):  # one bad message must not stop the network loop
            props = getattr(msg, "properties", None)
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
            if self._on_request is not None and (response_topic or correlation):
                self._on_request(
                    msg.topic,
                    bytes(msg.payload),
                    str(response_topic) if response_topic else None,
                    bytes(correlation) if correlation else None,
                )
            else:
                self._on_message(msg.topic, bytes(msg.payload))

    def start(self, wait_s: float = 10.0) -> None:
        try:
            self._client.connect_async(
                self.endpoint.host, self.endpoint.port, self.endpoint.keepalive_s
            )
        except (OSError, ValueError) as e:
            raise TransportError(
                f"cannot connect to {self.endpoint.host}:{self.endpoint.port}: {e}"
            ) from e
        self._client.loop_start()
        if wait_s > 0 and not self._connected.wait(wait_s):
            raise TransportError(
                f"no MQTT session with {self.endpoint.host}:{self.endpoint.port} after {wait_s:.0f} s"
            )

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subs.append((topic, qos))
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float = 10.0,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> bool:
        """Publish; with ``timeout_s > 0`` wait for the broker's acknowledgement.

        Callers on the network thread (inside ``on_message``) must pass ``timeout_s=0``:
        the acknowledgement is processed by that very thread, so waiting there stalls.
        """
        if not self._connected.is_set():
            return False
        props = None
        if response_topic is not None or correlation is not None:  # MQTT 5 request/response
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if timeout_s <= 0:
            return True
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def reload_client_cert(self, cert: Path, key: Path, password: bytes | None = None) -> None:
        """Use a new client certificate and key from the next handshake on, and reconnect now.

        Loads them first (a file that does not load raises before the session is
        touched); check that key and certificate match before calling. Not from the
        network thread (inside ``on_message``): it stops and restarts that thread.
        """
        try:
            self._ctx.load_cert_chain(str(cert), str(key), password)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot load client certificate {cert}: {e}") from e
        self.stop()
        self.start(wait_s=0)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
