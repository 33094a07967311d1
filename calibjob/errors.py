"""The errors a user can cause or fix; the CLI prints each as one line and exits non-zero."""


class CalibjobError(Exception):
    """Base: an expected failure with a message that says what to do."""


class ConfigError(CalibjobError, ValueError):
    """A bad job parameter, prompt file, shard spec or merge request."""


class StoreError(CalibjobError):
    """A store that cannot be used as asked (wrong job, not a store, disk full...)."""


class ModelUnavailable(CalibjobError):
    """Model weights that cannot be had here; the message says how to get them."""


class StoreDamaged(StoreError):
    """A store file that fails its checksum or does not parse. Names the file; `resume`
    repairs what can be recomputed (markers, metadata, the conditioning, chunks)."""

    def __init__(self, location: str, key: str, why: str = "unreadable"):
        self.location, self.key, self.why = location, key, why
        super().__init__(
            f"{location.rstrip('/')}/{key} is damaged ({why}); "
            f"`calibjob resume {location}` repairs it"
        )
