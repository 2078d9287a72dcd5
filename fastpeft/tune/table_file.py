"""The tuned table written into its directory atomically: a reader (``auto`` in another
process) sees the whole old table or the whole new one, never a partial file; a writer killed
mid-write leaves at most a temp file, removed by the next write (``fastpeft.formats.safe_write``)."""

from __future__ import annotations

import json
from pathlib import Path

from fastpeft.formats import safe_write
from fastpeft.kernels.tuned_table import table_path, validate_table


def write_table(table: dict, directory: Path) -> Path:
    """Validate ``table`` (``tuned_table.SCHEMA``) and replace its device's file in
    ``directory`` (created if missing) with it; the file's path."""
    validate_table(table)
    path = table_path(table["device"], directory)
    data = (json.dumps(table, indent=1) + "\n").encode()
    with safe_write.open_directory(directory) as d:
        safe_write.remove_stale_temps(d, [path.name])
        safe_write.commit(d, safe_write.stage(d, path.name, data), path.name)
        safe_write.sync(d)
    return path
