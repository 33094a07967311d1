"""The Zarr arrays of a job's layout: created where missing, and the metadata Zarr writes for
them (what `repair` puts back when a zarr.json no longer parses).

Takes a Zarr group and a Layout; gives its per-row arrays (one chunk per row, crc32c), the done
markers (one per row) and the progress group.
"""

from __future__ import annotations

import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from calibjob.core.job import Layout


def ensure_arrays(root: zarr.Group, layout: Layout) -> None:
    """Create the row arrays, done markers and the progress group where they are missing
    (by their zarr.json's presence: a damaged one is mended by `repair`)."""
    from zarr.core.sync import sync

    def present(name: str) -> bool:
        return bool(sync(root.store.exists(f"{name}/zarr.json")))

    for name, spec in layout.arrays.items():
        if not present(name):
            root.create_array(
                name, shape=(layout.rows, *spec.shape), chunks=(1, *spec.shape),
                dtype=spec.dtype, serializer=BytesCodec(), compressors=[Crc32cCodec()],
                fill_value=0,
            )  # fmt: skip
    if not present("done"):
        root.create_array(
            "done", shape=(layout.rows,), chunks=(1,), dtype="uint8",
            compressors=[Crc32cCodec()], fill_value=0,
        )  # fmt: skip
    if not present("progress"):
        root.create_group("progress")


def canonical_docs(layout: Layout) -> dict[str, bytes]:
    """The zarr.json bytes Zarr writes for the row arrays, done and progress of this layout
    (built in memory with the same calls as `_ensure_arrays`)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    mem = zarr.storage.MemoryStore()
    ensure_arrays(zarr.open_group(mem, mode="w"), layout)
    names = [*layout.arrays, "done", "progress"]
    proto = default_buffer_prototype()
    return {n: sync(mem.get(f"{n}/zarr.json", prototype=proto)).to_bytes() for n in names}
