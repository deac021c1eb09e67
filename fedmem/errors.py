"""Exceptions that carry one user-facing sentence each.

Every error raised at a boundary (config, data, registry, federation) is a
subclass of :class:`FedmemError`, so the CLI can print its message alone,
without a traceback, and exit non-zero.
"""


class FedmemError(Exception):
    """Base class for errors a user can fix from the message alone."""


class ConfigError(FedmemError):
    """A configuration key, value or type is invalid."""


class DataError(FedmemError):
    """A data set cannot be found, loaded or partitioned as asked."""


class FederationError(FedmemError):
    """A federated run cannot go on (too many clients failed, a NaN update...)."""


class RunFailedError(FedmemError):
    """A run failed on an unexpected error; its directory has the traceback (``traceback.txt``)."""
