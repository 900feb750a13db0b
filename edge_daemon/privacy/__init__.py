"""The on-device privacy gate: speech never leaves the capture path.

``vad`` runs Silero VAD through onnxruntime (no torch); ``gate`` cuts the stream
into 1 s windows and releases only those with no speech within the guard margins.
Design, defaults and measured leakage/yield: docs/adr/0005-privacy-gate.md.
Submodules are imported explicitly (``edge_daemon.privacy.gate``); importing this
package loads nothing heavy.
"""
