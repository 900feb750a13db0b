"""How ``cloud_sidecar.keys.hsm`` classifies python-pkcs11's exceptions.

UNAVAILABLE: the token is not there or not usable now, as opposed to a bad request or a
bad key; PIN_REFUSED: the PIN itself was refused (``Hsm`` never presents it again);
HANDLE_GONE: a cached key handle died; BAD_CIPHERTEXT: the input, not the token, is bad.
"""

from __future__ import annotations

from pkcs11 import exceptions as p11

# Failures that mean "the token is not there / not usable now", as opposed to a
# bad request or a bad key.
UNAVAILABLE: tuple[type[Exception], ...] = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.SessionCount,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.NoSuchToken,
    p11.SlotIDInvalid,
    p11.UserNotLoggedIn,
    p11.PinIncorrect,
    p11.PinLocked,
    p11.PinExpired,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.UserPinNotInitialized,
    p11.FunctionFailed,
)
PIN_REFUSED: tuple[type[Exception], ...] = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
)
# A key object that vanished while the token answers (a replica that does not hold it
# yet, a key store briefly away): the cached handle is dead, a new lookup may find it.
HANDLE_GONE: tuple[type[Exception], ...] = (p11.ObjectHandleInvalid, p11.KeyHandleInvalid)
BAD_CIPHERTEXT: tuple[type[Exception], ...] = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
)
