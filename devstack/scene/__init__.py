"""Procedural city audio with ground-truth labels, for the demo and the tests.

``sounds`` renders one labelled sound event per call (every label of
``fleet_protocol.labels.CLASSES``) and a low-level city background; other modules of
this package mix speech and build labelled streams from them. Everything here is
deterministic given the ``numpy.random.Generator`` passed in, and imports nothing heavy
at package import time.
"""
