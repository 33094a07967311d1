"""What every job's spec shares: plain fields, a fingerprint, the fields that differ, and the
'auto' fields resolved once on the first run and then fixed by the store.

A job's spec is a frozen dataclass deriving from `Spec`. It names two things the core needs:
`IDENTITY` (the fields that change the data: two stores merge, and a run continues a store, only
when these agree) and `AUTO` (field -> its 'auto' value: left open by the user, chosen for the
device on the first run, then taken from the store by every later run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar, TypeVar

from calibjob.errors import ConfigError

S = TypeVar("S", bound="Spec")


@dataclasses.dataclass(frozen=True)
class Spec:
    IDENTITY: ClassVar[tuple[str, ...]] = ()
    AUTO: ClassVar[dict[str, Any]] = {}
    # identity fields added after stores existed -> the value older stores had; such a field
    # is left out of the identity at that value, so older stores keep their fingerprints
    LATER: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict:
        """Plain JSON types (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[S], d: dict) -> S:
        """Fields from JSON or TOML: unknown ones refused, numbers coerced, lists as tuples."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown job field(s): {', '.join(unknown)}")
        out = {}
        for k, v in d.items():
            kind = fields[k].type
            if v is not None and kind in ("int", "float"):
                try:
                    v = int(v) if kind == "int" else float(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"{k} must be a number, got {v!r}") from None
            elif isinstance(v, list):
                v = tuple(v)
            out[k] = v
        return cls(**out)

    @classmethod
    def from_record(cls: type[S], d: dict) -> S:
        """A spec as a store recorded it: a field added after the store was made takes the
        value every store had before it (`LATER`)."""
        return cls.from_dict({**cls.LATER, **d})

    def replace(self: S, **changes) -> S:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict:
        d = self.to_dict()
        return {
            k: d[k] for k in self.IDENTITY if not (k in self.LATER and d[k] == self.LATER[k])
        }

    def fingerprint(self) -> str:
        """A short hash of the identity fields: equal fingerprints, interchangeable data."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[
            :16
        ]

    def differing(self, other: Spec) -> list[str]:
        """Identity fields where the two disagree."""
        a, b = self.identity(), other.identity()
        return [k for k in self.IDENTITY if a.get(k) != b.get(k)]

    def with_choices_of(self: S, other: Spec) -> S:
        """Fields left 'auto' here take `other`'s (an existing store's resolved) values."""
        return self.replace(
            **{k: getattr(other, k) for k, auto in self.AUTO.items() if getattr(self, k) == auto}
        )


def describe_differences(fields: list[str], have: dict, asked: dict) -> str:
    """'seed: store has 7, asked 8, ...' for a refusal that names what differs (values as JSON,
    long ones shortened)."""

    def short(v) -> str:
        s = json.dumps(v)
        return s if len(s) <= 40 else s[:37] + "..."

    return ", ".join(f"{k}: store has {short(have[k])}, asked {short(asked[k])}" for k in fields)
