"""Wrapping a user's query for ordered, resumable reads, without ever editing it as text.

    SELECT * FROM (
    <the user's query, trailing ';' and comments removed>
    ) AS conduit_src WHERE "col" > <bound parameter> ORDER BY "col"

The user's query may have ORDER BY, GROUP BY, CTEs, subqueries, comments and a trailing ';'.
The closing parenthesis sits on its own line so a trailing ``--`` comment cannot swallow it.
"""

import re

from conduit_dagster.engine.errors import SpecError


def _identifier_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


def _escape_string(sql: str, i: int) -> bool:
    """Whether the quote at ``i`` opens a PostgreSQL escape string: ``E'`` or ``e'`` where the E is a token of its own
    (not the end of an identifier such as ``name'`` or ``typE'``). U&'...' and standard strings have no backslash escapes
    (standard_conforming_strings is on in conduit's sessions)."""
    return i >= 1 and sql[i - 1] in "eE" and (i < 2 or not _identifier_char(sql[i - 2]))


def _scan(sql: str) -> list[tuple[int, int, str]]:
    """Split ``sql`` into spans of kind 'code', 'comment', 'string' or 'semicolon'."""
    spans: list[tuple[int, int, str]] = []
    i, n = 0, len(sql)
    start = 0

    def flush(upto: int) -> None:
        if upto > start:
            spans.append((start, upto, "code"))

    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":
            flush(i)
            end = sql.find("\n", i)
            end = n if end < 0 else end
            spans.append((i, end, "comment"))
            i = start = end
        elif c == "/" and nxt == "*":
            flush(i)
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise SpecError("the query has an unterminated /* comment")
            spans.append((i, j, "comment"))
            i = start = j
        elif c == "'" and _escape_string(sql, i):
            # E'...': a backslash escapes the next character, so E'it\'s' is one string
            flush(i)
            j = i + 1
            while True:
                k = j
                while k < n and sql[k] not in "'\\":
                    k += 1
                if k >= n:
                    raise SpecError("the query has an unterminated E' quote")
                if sql[k] == "\\":
                    j = k + 2
                elif sql.startswith("''", k):
                    j = k + 2
                else:
                    break
            spans.append((i, k + 1, "string"))
            i = start = k + 1
        elif c in ("'", '"', "`"):
            flush(i)
            j = i + 1
            while True:
                k = sql.find(c, j)
                if k < 0:
                    raise SpecError(f"the query has an unterminated {c} quote")
                if sql.startswith(c * 2, k):
                    j = k + 2
                    continue
                break
            spans.append((i, k + 1, "string"))
            i = start = k + 1
        elif c == "$" and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            # PostgreSQL dollar quoting: $$...$$ or $tag$...$tag$
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            if j < n and sql[j] == "$" and not sql[i + 1 : j].isdigit():
                tag = sql[i : j + 1]
                k = sql.find(tag, j + 1)
                if k < 0:
                    raise SpecError(f"the query has an unterminated {tag} quote")
                flush(i)
                spans.append((i, k + len(tag), "string"))
                i = start = k + len(tag)
            else:
                i += 1
        elif c == ";":
            flush(i)
            spans.append((i, i + 1, "semicolon"))
            i = start = i + 1
        else:
            i += 1
    flush(n)
    return spans


def clean_query(query: str) -> str:
    """The query without trailing semicolons and comments; refuses several statements."""
    spans = _scan(query)
    last_code = -1
    for idx, (s, e, kind) in enumerate(spans):
        if kind in ("code", "string") and query[s:e].strip():
            last_code = idx
    if last_code < 0:
        raise SpecError("the query is empty (only comments or ';'); write the SELECT to run")
    for _s, _e, kind in spans[:last_code]:
        if kind == "semicolon":
            raise SpecError("the query holds more than one statement (a ';' before the end); keep one SELECT")
    end = spans[last_code][1]
    return query[:end].rstrip()


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def wrap_query(
    query: str,
    column: str | None,
    *,
    resume: bool,
    param: str,
    collate: str | None = None,
    expression: str | None = None,
    bound: str | None = None,
) -> str:
    """The SELECT to run: the user's query as a subquery, filtered past ``param`` and ordered.

    ``param`` is the driver's placeholder (``:v``, ``%(v)s``); the value is never pasted in.
    ``collate`` forces an ordering that matches Python's (``"C"`` for PostgreSQL text).
    ``expression`` (with ``{col}`` for the column) orders and compares something other than the bare column,
    e.g. ``({col})::text COLLATE "C"``; it replaces ``collate``. ``bound`` is the parameter's own expression
    (holding ``param``), e.g. ``CAST(%(v)s AS pg_catalog.numeric)``, so that ``>`` compares like with like.
    """
    inner = clean_query(query)
    if column is None:
        return inner
    col = f"conduit_src.{quote_ident(column)}"
    if expression:
        col = expression.replace("{col}", col)
    elif collate:
        col = f"{col} COLLATE {quote_ident(collate)}"
    sql = f"SELECT * FROM (\n{inner}\n) AS conduit_src"
    if resume:
        value = bound or param
        sql += f"\nWHERE {col} > {value}"
    return sql + f"\nORDER BY {col}"


LAST_VALUE = "last_value"
_NAMED = re.compile(r"(?<![:\w]):last_value\b")


def uses_last_value(query: str) -> bool:
    """Whether the query has a ``:last_value`` placeholder (outside strings and comments)."""
    return any(kind == "code" and _NAMED.search(query[s:e]) for s, e, kind in _scan(query))


def replace_last_value(query: str, placeholder: str) -> str:
    """The query with each ``:last_value`` (outside strings and comments) replaced by the driver's placeholder."""
    out = []
    for start, end, kind in _scan(query):
        text = query[start:end]
        out.append(_NAMED.sub(placeholder, text) if kind == "code" else text)
    return "".join(out)
