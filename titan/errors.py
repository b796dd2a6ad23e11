"""titan's error types. Each stops a run with a one-line message that names the problem and the
fix; the entry points catch them and print that line instead of a traceback. They live here, on
the lowest floor, so that any module can raise them without importing the module that checks."""


class ConfigError(ValueError):
    """A config file or override that cannot be used, with a message saying how to fix it."""


class DataError(ValueError):
    """Data that cannot be read as configured; the message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint folder exists but cannot be read, or does not fit the model."""


class AnomalyError(RuntimeError):
    """A step's loss or gradient norm spiked, and resilience.on_anomaly says stop."""


class NonFiniteLossError(AnomalyError):
    """Loss or gradient norm became NaN/inf; the step was not applied."""
