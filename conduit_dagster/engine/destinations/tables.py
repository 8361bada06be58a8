"""What the database-table destinations (PostgreSQL, MySQL) share: the ingest.yml keys ``table``, ``mode`` and
``primary_key``, and their rules for the resources that write them."""

from typing import Any

from conduit_dagster.engine.backends import ResourceUse
from conduit_dagster.engine.spec import NAME_RE, WRITE_MODES, _Entry, column_list


def parse_table_keys(e: _Entry, database: str, max_name: int) -> tuple[str | None, str, tuple[str, ...]]:
    """``(table, mode, primary_key)`` of a destination entry: a plain name the database holds whole (at most
    ``max_name`` characters, none of conduit's own ``_conduit_`` names), a write mode, the merge key."""
    mode = e.choice("mode", WRITE_MODES, default="replace")
    keys = column_list(e, "primary_key")
    if mode == "merge" and not keys:
        raise e.fail(None, "mode merge needs `primary_key: [column, ...]` to upsert on")
    table = e.text("table", env=False)
    if table is not None:
        if not NAME_RE.match(table):
            raise e.fail("table", f"{table!r} is not a valid table name; use letters, digits and _")
        if len(table) > max_name:
            raise e.fail("table", f"{table!r} is longer than {database}'s {max_name} characters; choose a shorter name")
        if table.lower().startswith("_conduit_"):
            raise e.fail("table", f"{table!r} starts with _conduit_, which conduit's own tables use; choose another name")
    return table, mode, keys


def check_table_resource(e: _Entry, d: Any, use: ResourceUse, database: str, max_name: int) -> None:
    """One table per resource (a name the database holds whole); an incremental load never replaces; append is exact
    only when resuming. ``d``: the destination's spec (with ``table`` and ``mode``)."""
    if d.table:
        for other_name, other in use.others:
            if other is d:
                raise e.fail(
                    "destination",
                    f"resources {other_name!r} and {use.name!r} would both write table {d.table!r} of destination "
                    f"{use.destination_name!r}; give each its own destination, or leave `table` out (it defaults to the "
                    "resource name)",
                )
    elif len(use.name) > max_name:
        raise e.fail(
            "destination",
            f"destination {use.destination_name!r} would write table {use.name!r} (the resource name), longer than "
            f"{database}'s {max_name} characters; set `table:` on the destination",
        )
    if use.incremental and d.mode == "replace":
        raise e.fail(
            "destination",
            f"destination {use.destination_name!r} replaces its table on every run, which would keep "
            "only the newest rows of an incremental load; use mode append or merge",
        )
    if d.mode == "append" and not use.resume:
        raise e.fail(
            "destination",
            f"destination {use.destination_name!r} appends, which is exact after a crash only with resume: true and a "
            "checkpoint_column (the rerun would append the rows again); turn resume on, or use mode replace or merge",
        )


def partition_bound(partition: Any, value: Any, kind: str) -> Any:
    """A bound (``lo`` or ``hi``) of ``partition`` (a ``partitions.Partition``) as a table's column of ``kind`` compares
    it, the way the sources select a partition's rows: a time window's bound (an aware datetime in
    ``partition.timezone``) against a ``date`` column as its date, a ``timestamp`` column (no time zone) as the wall-clock
    time in that zone, a ``timestamptz`` column as the instant. Key-range bounds (values of the column's own type) and
    ``None`` (unbounded) stay as they are."""
    if value is None or partition.timezone is None:
        return value
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(partition.timezone)
    # already in the zone: kept as written (a wall-clock time a DST change skips is not moved), as the sources do
    local = value if getattr(value.tzinfo, "key", None) == zone.key else value.astimezone(zone)
    if kind == "date":
        return local.date()
    if kind == "timestamp":  # the repeated hour's second 01:00 is the wall-clock 01:00 (as the sources bind it)
        return local.replace(tzinfo=None, fold=0)
    if kind == "timestamptz":
        return local
    raise ValueError(f"no time-window comparison for a column of kind {kind!r}")
