"""Sysfs sensor plugins on a fake tree, telemetry messages, the sampler, the store, and
the resend of telemetry held back by a broker outage (against a fake link)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.config import DeviceConfig, HwmonSensorConfig, IioSensorConfig, SensorsConfig
from edge_daemon.sensors.resend import TelemetryResender, regroup
from edge_daemon.sensors.runtime import DeviceSensors
from edge_daemon.sensors.sampler import SensorSampler, TelemetrySink
from edge_daemon.sensors.store import TelemetryStore
from edge_daemon.sensors.sysfs import MAX_ATTR_BYTES, HwmonSensor, IioSensor, make_sensor
from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, TooLargeError
from fleet_protocol.telemetry import MAX_TELEMETRY_BYTES, Reading, Telemetry


def _r(sensor: str, quantity: str, unit: str, value: float) -> Reading:
    return Reading(sensor=sensor, quantity=quantity, unit=unit, value=value)


def _t(device: str, time_ms: int, period_ms: int, readings: tuple[Reading, ...]) -> Telemetry:
    return Telemetry(device=device, time_ms=time_ms, period_ms=period_ms, readings=readings)


def _attrs(d: Path, **files: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name).write_text(value + "\n")
    return d


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    iio = tmp_path / "bus/iio/devices"
    _attrs(
        iio / "iio:device0",
        name="bme280",
        in_temp_input="23450",
        in_humidityrelative_input="45123",
        in_pressure_input="101.325",
    )
    _attrs(
        iio / "iio:device1",
        name="adxl345",
        in_accel_x_raw="-10",
        in_accel_y_raw="0",
        in_accel_z_raw="256",
        in_accel_scale="0.038300",
        in_accel_z_offset="2",
        in_temp_raw="100",  # raw + shared scale: milli-degC after scaling
        in_temp_scale="250",
    )
    _attrs(tmp_path / "class/hwmon/hwmon0", name="cpu_thermal", temp1_input="48312")
    _attrs(tmp_path / "class/hwmon/hwmon1", name="rpi_volt", in0_input="850", fan1_input="1200")
    return tmp_path


def _values(readings: list[Reading]) -> dict[str, tuple[float, str]]:
    return {r.quantity: (r.value, r.unit) for r in readings}


def test_iio_processed_inputs_are_converted_to_si_units(sysfs: Path) -> None:
    s = IioSensor(IioSensorConfig(name="env", device="bme280"), sysfs)
    assert _values(s.read()) == {
        "temperature": (23.45, "degC"),
        "relative_humidity": (45.123, "%"),
        "pressure": (1013.25, "hPa"),
    }
    assert s.errors == 0


def test_iio_raw_channels_apply_offset_and_channel_or_shared_scale(sysfs: Path) -> None:
    s = IioSensor(IioSensorConfig(name="vib", device="iio:device1"), sysfs)
    v = _values(s.read())
    assert v["acceleration_x"][0] == pytest.approx(-0.383)
    assert v["acceleration_y"] == (0.0, "m/s2")
    assert v["acceleration_z"][0] == pytest.approx(258 * 0.0383)
    assert v["acceleration_z"][1] == "m/s2"
    assert v["temperature"][0] == pytest.approx(25.0)


def test_iio_channel_selection_reads_only_those(sysfs: Path) -> None:
    s = IioSensor(IioSensorConfig(name="env", device="bme280", channels=("temp",)), sysfs)
    assert [r.quantity for r in s.read()] == ["temperature"]


def test_hwmon_channels_by_chip_name_or_directory(sysfs: Path) -> None:
    cpu = HwmonSensor(HwmonSensorConfig(name="cpu", chip="cpu_thermal"), sysfs)
    assert _values(cpu.read()) == {"temperature1": (48.312, "degC")}
    volt = make_sensor(HwmonSensorConfig(type="hwmon", name="pmic", chip="hwmon1"), sysfs)
    assert _values(volt.read()) == {"voltage0": (0.85, "V"), "fan_speed1": (1200.0, "rpm")}


def test_missing_device_gives_no_readings_and_is_counted_not_raised(sysfs: Path) -> None:
    s = IioSensor(IioSensorConfig(name="env", device="sht31"), sysfs)
    assert s.read() == [] and s.errors == 1


def test_unreadable_or_oversized_attribute_skips_only_that_reading(sysfs: Path) -> None:
    d = sysfs / "bus/iio/devices/iio:device0"
    (d / "in_pressure_input").write_text("9" * (MAX_ATTR_BYTES + 5))
    (d / "in_humidityrelative_input").write_text("not-a-number")
    s = IioSensor(IioSensorConfig(name="env", device="bme280"), sysfs)
    assert _values(s.read()) == {"temperature": (23.45, "degC")}
    assert s.errors == 2


def test_missing_channel_is_counted(sysfs: Path) -> None:
    s = HwmonSensor(HwmonSensorConfig(name="cpu", chip="cpu_thermal", channels=("temp2",)), sysfs)
    assert s.read() == [] and s.errors == 1


def test_telemetry_round_trips_and_is_documented_json() -> None:
    t = Telemetry(
        device="pi-007",
        time_ms=1_764_000_000_000,
        period_ms=1000,
        readings=(_r("mic", "laeq", "dB(A)", 57.31),),
    )
    data = t.to_bytes()
    assert data == (
        b'{"device":"pi-007","period_ms":1000,"readings":[{"quantity":"laeq","sensor":"mic",'
        b'"unit":"dB(A)","value":57.31}],"time_ms":1764000000000}'
    )
    assert Telemetry.from_bytes(data) == t
    assert topics.telemetry("pi-007") == "fleet/v1/pi-007/telemetry"


@pytest.mark.parametrize(
    "bad",
    [
        b"[]",
        b'{"device":"pi","time_ms":1,"period_ms":1,"readings":[]}',
        b'{"device":"PI!","time_ms":1,"period_ms":1,"readings":[{"sensor":"a","quantity":"b","unit":"c","value":1}]}',
        b'{"device":"pi","time_ms":-1,"period_ms":1,"readings":[{"sensor":"a","quantity":"b","unit":"c","value":1}]}',
        b'{"device":"pi","time_ms":1,"period_ms":1,"readings":[{"sensor":"a","quantity":"b","unit":"c","value":"1"}]}',
        b'{"device":"pi","time_ms":1,"period_ms":1,"readings":[{"sensor":"a","quantity":"b","unit":"c","value":NaN}]}',
        b'{"device":"pi","time_ms":1,"period_ms":1,"readings":[{"sensor":"a","quantity":"b","unit":"c"}]}',
        b"\xff",
    ],
)
def test_malformed_telemetry_is_rejected(bad: bytes) -> None:
    with pytest.raises(MalformedError):
        Telemetry.from_bytes(bad)


def test_oversized_telemetry_is_rejected_before_parsing() -> None:
    with pytest.raises(TooLargeError):
        Telemetry.from_bytes(b" " * (MAX_TELEMETRY_BYTES + 1))


def test_sampler_publishes_and_stores_every_sample_marking_what_went_out(
    sysfs: Path, tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "buffer.sqlite3", max_rows=1000)
    sent: list[Telemetry] = []
    online = [True]

    def publish(t: Telemetry) -> bool:
        sent.append(t)
        return online[0]

    cfg = SensorsConfig(
        period_s=0.05,
        sysfs_root=sysfs,
        sources=(
            IioSensorConfig(name="env", device="bme280"),
            HwmonSensorConfig(name="cpu", chip="cpu_thermal"),
        ),
    )
    sampler = SensorSampler(
        [make_sensor(c, cfg.sysfs_root) for c in cfg.sources],
        TelemetrySink("pi-007", publish, store),
        cfg.period_s,
    )
    t = sampler.sample_once()
    assert t is not None and len(t.readings) == 4 and t.period_ms == 50
    online[0] = False  # broker outage: kept, marked unpublished
    sampler.sample_once()
    assert store.count() == 8
    pending = store.unpublished(100)
    assert len(pending) == 4 and {r.sensor for *_, r in pending} == {"env", "cpu"}
    store.mark_published([i for i, *_ in pending])
    assert store.unpublished(100) == []
    stop = threading.Event()
    sampler.start(stop)
    stop.wait(0.3)
    stop.set()
    sampler.join()
    assert sampler.samples >= 3 and len(sent) == sampler.samples
    store.close()


def test_store_keeps_at_most_max_rows_dropping_the_oldest(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=100)
    for i in range(130):
        store.add(_t("pi", i, 1000, (_r("mic", "laeq", "dB(A)", float(i)),)), True)
    assert store.count() == 100
    assert store.recent(1)[0][1].value == 129.0
    store.close()


def test_store_shares_the_buffer_file_without_touching_its_schema_version(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "buffer.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY)")
    db.commit()
    store = TelemetryStore(path, max_rows=100)
    store.add(_t("pi", 1, 1000, (_r("mic", "laeq", "dB(A)", 50.0),)), False)
    store.close()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 7
    assert db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 1
    db.close()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
_KEYS = ("device", "time_ms", "period_ms", "readings", "sensor", "quantity", "unit", "value")


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=512)
    | st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8).map(
        lambda d: json.dumps(d).encode()
    )
)
def test_telemetry_parser_raises_only_protocol_errors_on_any_input(data: bytes) -> None:
    with contextlib.suppress(MalformedError, TooLargeError):
        Telemetry.from_bytes(data)


def test_a_huge_integer_value_is_malformed_not_a_crash() -> None:
    r = '{"sensor":"a","quantity":"b","unit":"c","value":' + "9" * 400 + "}"
    with pytest.raises(MalformedError, match="finite"):
        Telemetry.from_bytes(
            ('{"device":"pi","time_ms":1,"period_ms":1,"readings":[' + r + "]}").encode()
        )


# ------------------------------------------------------- resending after an outage


class FakeLink:
    """A publisher standing in for the MQTT link: up or down, failing after N sends."""

    def __init__(self, up: bool = True, fail_after: int | None = None) -> None:
        self.up, self.fail_after = up, fail_after
        self.sent: list[Telemetry] = []

    def publish(self, t: Telemetry) -> bool:
        if not self.up or (self.fail_after is not None and len(self.sent) >= self.fail_after):
            return False
        self.sent.append(Telemetry.from_bytes(t.to_bytes()))  # what a subscriber would get
        return True


def _message(i: int, n: int = 3) -> Telemetry:
    readings = tuple(_r(f"s{k}", "temperature", "degC", float(i * 10 + k)) for k in range(n))
    return _t("pi-007", 1_000 * i, 60_000, readings)


def _outage(store: TelemetryStore, count: int, readings: int = 3) -> list[Telemetry]:
    """``count`` messages stored while the broker was away (not published)."""
    messages = [_message(i, readings) for i in range(count)]
    for t in messages:
        store.add(t, published=False)
    return messages


def test_regroup_rebuilds_the_stored_messages(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=1000)
    messages = [_message(0, 2), _message(1, 1), _message(1, 2), _message(2, 3)]
    for t in messages:
        store.add(t, published=False)
    groups = regroup("pi-007", store.unpublished(100))
    # two messages with the same time and period stored back to back read as one: harmless
    assert [t for _, t in groups] == [
        messages[0],
        _t("pi-007", 1000, 60_000, messages[1].readings + messages[2].readings),
        messages[3],
    ]
    assert [ids for ids, _ in groups] == [[1, 2], [3, 4, 5], [6, 7, 8]]
    store.close()


def test_held_back_telemetry_is_resent_oldest_first_in_bounded_batches(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=1000)
    held = _outage(store, 5)
    store.add(_message(99), published=True)  # went out live once the link was back
    link = FakeLink()
    resender = TelemetryResender("pi-007", store, link.publish, lambda: link.up, batch_rows=7)
    assert resender.resend_once() == 6  # 2 whole messages; the third would be cut: next batch
    assert link.sent == held[:2]
    assert resender.drain(threading.Event()) == 9
    assert link.sent == held and resender.resent == 5
    assert store.unpublished(100) == [] and store.count() == 18
    assert resender.resend_once() == 0
    store.close()


def test_resend_waits_for_the_link_and_resumes_after_a_failure_without_skipping(
    tmp_path: Path,
) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=1000)
    held = _outage(store, 4)
    link = FakeLink(up=False)
    resender = TelemetryResender("pi-007", store, link.publish, lambda: link.up)
    assert resender.drain(threading.Event()) == 0 and link.sent == []
    link.up, link.fail_after = True, 2  # the link drops again after two messages
    assert resender.drain(threading.Event()) == 6
    assert link.sent == held[:2] and len(store.unpublished(100)) == 6
    link.fail_after = None
    assert resender.drain(threading.Event()) == 6
    assert link.sent == held
    store.close()


def test_a_publish_that_raises_counts_as_a_failure(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=1000)
    _outage(store, 2)

    def boom(t: Telemetry) -> bool:
        raise OSError("socket closed")

    resender = TelemetryResender("pi-007", store, boom, lambda: True)
    assert resender.drain(threading.Event()) == 0 and len(store.unpublished(100)) == 6
    store.close()


def test_rows_beyond_max_rows_are_evicted_oldest_first_before_they_are_resent(
    tmp_path: Path,
) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=100)
    held = _outage(store, 130, readings=1)
    link = FakeLink()
    resender = TelemetryResender("pi-007", store, link.publish, lambda: True, batch_rows=32)
    assert resender.drain(threading.Event()) == 100
    assert link.sent == held[30:]  # the 30 oldest were evicted during the outage
    store.mark_published([1, 2, 3])  # evicted ids: a no-op
    assert store.count() == 100 and store.unpublished(1) == []
    store.close()


def test_resend_thread_sends_the_backlog_once_the_link_is_up(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "b.sqlite3", max_rows=1000)
    held = _outage(store, 3)
    link = FakeLink(up=False)
    resender = TelemetryResender("pi-007", store, link.publish, lambda: link.up, period_s=0.02)
    stop = threading.Event()
    resender.start(stop)
    stop.wait(0.1)
    assert link.sent == []
    link.up = True
    for _ in range(250):
        if len(link.sent) == 3:
            break
        stop.wait(0.02)
    stop.set()
    resender.join()
    assert link.sent == held and store.unpublished(10) == []
    store.close()


def test_device_sensors_resend_what_the_live_publish_could_not_send(tmp_path: Path) -> None:
    cfg = DeviceConfig.model_validate(
        {
            "device_id": "pi-007",
            "state_dir": str(tmp_path),
            "broker": {"ca_cert": "ca.pem", "client_cert": "c.pem", "client_key": "k.pem"},
            "tpm": {},
            "cloud": {"unwrap_public_key": "u.pem", "ota_public_key": "o.pem"},
            "model": {"base_fp32": "a.onnx", "base_int8": "b.onnx"},
            "source": {"type": "live"},
        }
    )
    link = FakeLink(up=False)
    sensors = DeviceSensors(cfg, link.publish, link_up=lambda: link.up)
    for level in (50.0, 51.0, 52.0):  # LAeq each second while the broker is away
        sensors.sink.emit([_r("mic", "laeq", "dB(A)", level)], 1000)
    assert sensors.report()["telemetry_unpublished_rows"] == 3
    link.up = True
    assert sensors.resender is not None
    sensors.resender.drain(threading.Event())
    # readings in one millisecond may come back as one message (regroup): compare readings
    assert [r.value for t in link.sent for r in t.readings] == [50.0, 51.0, 52.0]
    report = sensors.report()
    assert report["telemetry_resent"] == len(link.sent)
    assert report["telemetry_unpublished_rows"] == 0
    sensors.close()
