"""Upload features in torch: the training-side twin of ``fleet_protocol.features``.

Owns: computing the contract's upload features on torch tensors (CPU or GPU, batched,
differentiable), so training can augment raw audio on the fly and featurise on the
accelerator instead of going through numpy.

Invariants:
- every constant (frame grid, Hann window, FFT size, band filterbank, pooling, log offset and
  normalisation) is taken from ``fleet_protocol.features``; nothing is redefined here,
  so a ``FEATURE_VERSION`` change there changes this module too;
- the numbers match ``fleet_protocol.features.features_batch`` to 1e-4 (max absolute
  difference, float32), checked by ``tests/unit/test_feature_parity.py``;
- input ``(B, WINDOW_SAMPLES)`` float audio, output ``(B, N_BANDS, N_FRAMES)`` float32 on
  the input's device.

Precision: the edge path runs its FFT in float32. A second float32 FFT (torch's, or
cuFFT's) rounds differently, and in spectral valleys 60+ dB under a window's peak the
two disagree by ~1e-4 after the log — right at the parity bound. So the STFT, power
and band sums run in float64 here (``compute_dtype``) and the result is cast to float32:
the difference is then the edge's own float32 rounding (measured <= 5e-5).
"""

from __future__ import annotations

import logging

import torch

from fleet_protocol import features as F

log = logging.getLogger(__name__)

FEATURE_VERSION = F.FEATURE_VERSION


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.from_numpy(F.hann_window().copy()).to(device)
    fb = torch.from_numpy(F.band_filterbank().copy()).to(device)
    return window, fb


class UploadFeatures(torch.nn.Module):
    """``(B, WINDOW_SAMPLES)`` audio -> ``(B, N_BANDS, N_FRAMES)`` normalised band energies."""

    window: torch.Tensor
    filterbank: torch.Tensor

    def __init__(self, compute_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        window, fb = _constants(torch.device("cpu"))
        self.compute_dtype = compute_dtype
        self.register_buffer("window", window.to(compute_dtype), persistent=False)
        self.register_buffer("filterbank", fb.to(compute_dtype), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        # the edge rounds its input to float32 first; do the same, then widen
        x = audio.to(torch.float32).to(self.compute_dtype)
        if x.ndim != 2 or x.shape[1] != F.WINDOW_SAMPLES:
            raise ValueError(
                f"expected (batch, {F.WINDOW_SAMPLES}) audio, got shape {tuple(x.shape)}"
            )
        # the same frame grid as the numpy path: N_STFT_FRAMES frames of WIN_LENGTH, hop
        # HOP, no centring or padding; zero-padded to N_FFT by the FFT
        frames = x.unfold(-1, F.WIN_LENGTH, F.HOP)[:, : F.N_STFT_FRAMES] * self.window
        spec = torch.fft.rfft(frames, n=F.N_FFT, dim=-1)
        power = spec.real.square() + spec.imag.square()  # (B, T, F)
        bands = power @ self.filterbank.T  # (B, T, N_BANDS)
        b = bands.shape[0]
        pooled = (
            bands[:, : F.N_FRAMES * F.POOL].reshape(b, F.N_FRAMES, F.POOL, F.N_BANDS).mean(dim=2)
        )
        out = (torch.log(pooled + F.LOG_OFFSET) - F.NORM_MEAN) / F.NORM_STD
        return out.transpose(1, 2).to(torch.float32).contiguous()


_MODULES: dict[torch.device, UploadFeatures] = {}


def features_batch(audio: torch.Tensor) -> torch.Tensor:
    """Functional form of ``UploadFeatures`` (one cached module per device)."""
    dev = audio.device
    mod = _MODULES.get(dev)
    if mod is None:
        mod = UploadFeatures().to(dev)
        _MODULES[dev] = mod
    out: torch.Tensor = mod(audio)
    return out
