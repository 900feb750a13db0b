"""Prometheus metrics for both services: declared families, values, exposition, an endpoint.

Owns ``Spec`` (one documented metric family: name, kind, unit in the name, help, label
names), ``Metrics`` (the values of a set of families, thread-safe, with ``inc``/``set``/
``observe`` and ``get`` for tests) and ``MetricsServer`` (``GET /metrics`` on a local
address). Each service keeps its table of specs in its own ``metrics`` module; the names
and units are documented in ``docs/metrics.md`` (a test keeps the two in step).

Exposition goes through ``prometheus-client`` (a collector that yields the families, and
its WSGI app and text writer). Until that package is in ``requirements/lock.txt`` a
small built-in writer renders the same text format, so the services run either way.

Invariants: a name or label set that was not declared raises ``KeyError`` (a typo never
creates a silent new series); counters only go up (``inc`` refuses negative amounts;
``set_total`` refuses a value below the current one); every family is exported with the
service's prefix (``edge_``, ``sidecar_``), ``get`` takes the short name.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

# prometheus-client (pinned in requirements/lock.txt); imported by name so that the
# services still run, with the built-in writer, where it is not installed yet.
_pc: Any = None
_pc_core: Any = None
try:
    _pc = importlib.import_module("prometheus_client")
    _pc_core = importlib.import_module("prometheus_client.core")
except ImportError:  # pragma: no cover - depends on the environment
    pass

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

HAVE_CLIENT = _pc is not None


@dataclass(frozen=True)
class Spec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS


@dataclass
class _Hist:
    counts: list[int]  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0


Key = tuple[str, ...]


class Metrics:
    """The values of the declared families; safe to update from any thread."""

    def __init__(self, prefix: str, specs: Iterable[Spec]) -> None:
        self.prefix = prefix
        self.specs = {s.name: s for s in specs}
        self._lock = threading.Lock()
        self._values: dict[str, dict[Key, float]] = {n: {} for n in self.specs}
        self._hists: dict[str, dict[Key, _Hist]] = {n: {} for n in self.specs}

    def _key(self, name: str, labels: dict[str, str]) -> tuple[Spec, Key]:
        spec = self.specs[name]
        if set(labels) != set(spec.labels):
            raise KeyError(f"{name}: labels {sorted(labels)} != declared {list(spec.labels)}")
        return spec, tuple(str(labels[k]) for k in spec.labels)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        spec, key = self._key(name, labels)
        if spec.kind == "counter" and amount < 0:
            raise ValueError(f"{name}: a counter cannot go down")
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        spec, key = self._key(name, labels)
        if spec.kind != "gauge":
            raise TypeError(f"{name} is a {spec.kind}, not a gauge")
        with self._lock:
            self._values[name][key] = value

    def set_total(self, name: str, value: float, **labels: str) -> None:
        """A counter kept elsewhere (a component's own stats): copy its running total."""
        _, key = self._key(name, labels)
        with self._lock:
            if value < self._values[name].get(key, 0):
                raise ValueError(f"{name}{key}: a counter cannot go down")
            self._values[name][key] = value

    def clear(self, name: str) -> None:
        """Forget every series of a gauge family (e.g. a state that changed)."""
        with self._lock:
            self._values[name].clear()

    def observe(self, name: str, value: float, **labels: str) -> None:
        spec, key = self._key(name, labels)
        with self._lock:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = _Hist([0] * (len(spec.buckets) + 1))
            h.counts[bisect.bisect_left(spec.buckets, value)] += 1
            h.total += value

    def get(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value, or a histogram's count; 0 for an unseen series."""
        spec, key = self._key(name, labels)
        with self._lock:
            if spec.kind == "histogram":
                h = self._hists[name].get(key)
                return sum(h.counts) if h is not None else 0
            return self._values[name].get(key, 0)

    # -- exposition ----------------------------------------------------------

    def _snapshot(self) -> list[tuple[Spec, dict[Key, float], dict[Key, _Hist]]]:
        with self._lock:
            return [
                (
                    s,
                    dict(self._values[s.name]),
                    {k: _Hist(list(h.counts), h.total) for k, h in self._hists[s.name].items()},
                )
                for s in self.specs.values()
            ]

    def collect(self) -> Iterator[Any]:
        """prometheus-client's collector interface: one metric family per spec."""
        assert _pc_core is not None
        for spec, values, hists in self._snapshot():
            full = f"{self.prefix}_{spec.name}"
            labels = list(spec.labels)
            fam: Any
            if spec.kind == "counter":
                fam = _pc_core.CounterMetricFamily(full, spec.help, labels=labels)
                for key, v in sorted(values.items()):
                    fam.add_metric(list(key), v)
            elif spec.kind == "gauge":
                fam = _pc_core.GaugeMetricFamily(full, spec.help, labels=labels)
                for key, v in sorted(values.items()):
                    fam.add_metric(list(key), v)
            else:
                fam = _pc_core.HistogramMetricFamily(full, spec.help, labels=labels)
                for key, h in sorted(hists.items()):
                    fam.add_metric(list(key), _cumulative(spec, h), h.total)
            yield fam

    def registry(self) -> Any:
        """A prometheus-client registry holding only this service's families."""
        assert _pc is not None
        reg = _pc.CollectorRegistry(auto_describe=False)
        reg.register(self)
        return reg

    def render(self) -> str:
        """The text exposition format (version 0.0.4)."""
        if _pc is not None:
            return str(_pc.generate_latest(self.registry()).decode())
        return self._render_builtin()

    def _render_builtin(self) -> str:
        out: list[str] = []
        for spec, values, hists in self._snapshot():
            full = f"{self.prefix}_{spec.name}"
            base = full.removesuffix("_total") if spec.kind == "counter" else full
            out += [f"# HELP {base} {_escape_help(spec.help)}", f"# TYPE {base} {spec.kind}"]
            if spec.kind == "histogram":
                for key, h in sorted(hists.items()):
                    for le, c in _cumulative(spec, h):
                        out.append(f"{base}_bucket{_labels(spec.labels, key, le=le)} {c}")
                    out.append(f"{base}_count{_labels(spec.labels, key)} {sum(h.counts)}")
                    out.append(f"{base}_sum{_labels(spec.labels, key)} {h.total!r}")
                continue
            name = f"{base}_total" if spec.kind == "counter" else base
            for key, v in sorted(values.items()):
                out.append(f"{name}{_labels(spec.labels, key)} {float(v)!r}")
        return "\n".join(out) + "\n"


def _cumulative(spec: Spec, h: _Hist) -> list[tuple[str, float]]:
    out, run = [], 0
    for le, c in zip([*map(repr, spec.buckets), "+Inf"], h.counts, strict=True):
        run += c
        out.append((le, float(run)))
    return out


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: tuple[str, ...], key: Key, **extra: str) -> str:
    pairs = [*zip(names, key, strict=True), *extra.items()]
    if not pairs:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc, strict=True)) + "}"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s", format % args)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free one) in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._server: WSGIServer = make_server(
            host, port, self._app(), server_class=WSGIServer, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def _app(self) -> Any:
        if _pc is not None:
            return _pc.make_wsgi_app(self._metrics.registry())

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            body = self._metrics.render().encode()
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
            return [body]

        return app

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self._server.server_address[:2])
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
