"""The default tracking store (``results/mlflow.db``, artefacts in ``results/mlartifacts``)
moves with its results folder.

MLflow stores an experiment's artefact location, and each run's, as absolute URIs: a
results folder copied or moved elsewhere and tracked again would write its artefacts
into the original folder. The store's folder is recorded beside it (``mlflow.db.home``);
when the database is found elsewhere, :func:`follow_moved_folder` points the URIs under
the former folder's ``mlartifacts`` at the new one. Plain SQLite: only the project's own
default store is touched.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

HOME = "mlflow.db.home"  # the folder the store was last tracked in, beside the database
#: (table, column) of every absolute artefact URI in an MLflow 3 SQLite store.
COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
)


def _rewrite(database: Path, old: str, new: str) -> int:
    """Replace the prefix ``old`` by ``new`` in every artefact URI; the rows changed."""
    changed = 0
    with sqlite3.connect(database) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        for table, column in COLUMNS:
            if table in tables:
                cursor = db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old),
                )
                changed += cursor.rowcount
    db.close()
    return changed


def follow_moved_folder(tracking_uri: str, artifact_location: str) -> int:
    """Point the default store at ``tracking_uri`` at ``artifact_location`` where it was
    made in (or last tracked from) another folder; record its folder. Returns the rows
    rewritten."""
    if not tracking_uri.startswith("sqlite:///"):
        return 0
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    if artifact_location != (database.parent / "mlartifacts").resolve().as_uri():
        return 0  # not the default layout: the caller chose where artefacts go
    home = database.parent / HOME
    changed = 0
    if database.is_file() and home.is_file():
        former = home.read_text(encoding="utf-8").strip()
        if former and former != artifact_location:
            changed = _rewrite(database, former, artifact_location)
            log.info(
                "the results folder moved: %d artefact locations under %s now under %s",
                changed, former, artifact_location,
            )  # fmt: skip
    database.parent.mkdir(parents=True, exist_ok=True)
    home.write_text(artifact_location + "\n", encoding="utf-8")
    return changed
