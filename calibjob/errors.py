"""The errors a user can cause or fix; the CLI prints each as one line and exits non-zero."""


class CalibjobError(Exception):
    """Base: an expected failure with a message that says what to do."""


class ConfigError(CalibjobError, ValueError):
    """A bad job parameter, prompt file, shard spec or merge request."""


class StoreError(CalibjobError):
    """A store that cannot be used as asked (wrong job, not a store, disk full...)."""


class ModelUnavailable(CalibjobError):
    """Model weights that cannot be had here; the message says how to get them."""
