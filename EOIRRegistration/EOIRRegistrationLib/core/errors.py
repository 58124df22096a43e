"""Exceptions the engine raises for conditions a user can act on (all carry a readable reason)."""


class EOIRError(Exception):
    """Base class of the engine's user-facing errors."""


class InputError(EOIRError, ValueError):
    """An input image, label map or option is unusable (wrong dimension, NaN, constant, ...)."""


class OutputError(EOIRError):
    """An output could not be written whole (disk full, no permission, another run's folder)."""


class ModelFileError(EOIRError):
    """A model file is missing, corrupt, or not an EOIRRegistration model of a known kind."""


class RegistrationCancelled(EOIRError):
    """The caller asked the registration to stop (cooperative cancel)."""


class DeviceError(EOIRError):
    """The requested compute device is unavailable or ran out of memory."""
