"""Query wrapping: every query shape runs as a subquery, filtered and ordered, on SQLite and PostgreSQL."""

import sqlite3

import pytest

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.sql import clean_query, wrap_query

SHAPES = {
    "plain": "SELECT id, v FROM t",
    "order_by": "SELECT id, v FROM t ORDER BY v DESC",
    "group_by": "SELECT id, max(v) AS v FROM t GROUP BY id",
    "cte": "WITH x AS (SELECT id, v FROM t) SELECT id, v FROM x",
    "subquery": "SELECT id, v FROM (SELECT id, v FROM t WHERE id > 0) AS s",
    "line_comment_end": "SELECT id, v FROM t -- trailing comment",
    "block_comment": "/* head */ SELECT id, /* mid */ v FROM t /* tail; */",
    "semicolon": "SELECT id, v FROM t;",
    "semicolon_comment": "SELECT id, v FROM t; -- done\n",
    "semicolons": "SELECT id, v FROM t ;; \n",
    "string_with_semicolon": "SELECT id, v FROM t WHERE v <> 'a;b -- c'",
    "like_percent": "SELECT id, v FROM t WHERE v LIKE '%x%' OR v NOT LIKE 'q%'",
    "where_then_order": "SELECT id, v FROM t WHERE v IS NOT NULL ORDER BY id",
}


@pytest.fixture
def lite():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER, v TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i % 7}") for i in range(1, 51)])
    yield conn
    conn.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_wrap_query_shapes_run_on_sqlite(lite, shape):
    sql = wrap_query(SHAPES[shape], "id", resume=True, param=":v")
    got = [r[0] for r in lite.execute(sql, {"v": 20})]
    expected = sorted(r[0] for r in lite.execute(clean_query(SHAPES[shape])) if r[0] > 20)
    assert got == expected and got, sql


@pytest.mark.parametrize("shape", SHAPES)
def test_wrap_query_shapes_run_on_postgres(pg, pg_schema, shape):
    with pg.cursor() as cur:
        cur.execute(f"SET search_path = {pg_schema}")
        cur.execute("CREATE TABLE t (id int, v text)")
        cur.execute("INSERT INTO t SELECT g, 'v' || (g % 7) FROM generate_series(1, 50) g")
        sql = wrap_query(SHAPES[shape].replace("%", "%%"), "id", resume=True, param="%(v)s", bound="CAST(%(v)s AS integer)")
        cur.execute(sql, {"v": 20})
        got = [r[0] for r in cur.fetchall()]
        cur.execute(clean_query(SHAPES[shape]))
        expected = sorted(r[0] for r in cur.fetchall() if r[0] > 20)
    assert got == expected and got, sql


def test_wrap_query_text_column_collates_like_python(pg, pg_schema):
    values = ["b", "B", "a", "A", "é", "e", "Z", "_", "10", "9"]
    with pg.cursor() as cur:
        cur.execute(f"SET search_path = {pg_schema}")
        cur.execute('CREATE TABLE t (v text COLLATE "en-US-x-icu")')
        cur.executemany("INSERT INTO t VALUES (%s)", [(v,) for v in values])
        cur.execute(
            wrap_query("SELECT v FROM t", "v", resume=True, param="%(v)s", collate="C", bound="CAST(%(v)s AS text)"), {"v": "A"}
        )
        got = [r[0] for r in cur.fetchall()]
    assert got == sorted(v for v in values if v > "A")


def test_wrap_query_binds_never_pastes(lite):
    hostile = "x' OR '1'='1"
    sql = wrap_query("SELECT id, v FROM t", "v", resume=True, param=":v")
    assert hostile not in sql
    assert list(lite.execute(sql, {"v": hostile})) == []


def test_wrap_query_without_resume_orders_only():
    sql = wrap_query("SELECT 1 AS id;", "id", resume=False, param=":v")
    assert "WHERE" not in sql and sql.endswith('ORDER BY conduit_src."id"')


def test_wrap_query_quotes_column():
    assert 'conduit_src."we""ird"' in wrap_query("SELECT 1", 'we"ird', resume=True, param=":v")


def test_wrap_query_dollar_quotes():
    q = "SELECT $$a;b$$ AS id, $tag$ -- not a comment $tag$ AS v"
    assert clean_query(q + " ;") == q


@pytest.mark.parametrize(
    "query,fragment",
    [
        ("SELECT 1; DROP TABLE t", "more than one statement"),
        ("-- nothing\n;", "empty"),
        ("SELECT 'open", "unterminated"),
        ("SELECT 1 /* open", "unterminated"),
    ],
)
def test_clean_query_refuses(query, fragment):
    with pytest.raises(SpecError, match=fragment):
        clean_query(query)


def test_last_value_placeholder_only_outside_strings_and_comments():
    from conduit_dagster.engine.sql import replace_last_value, uses_last_value

    q = "SELECT ':last_value' AS x, a::text FROM t WHERE a >= :last_value -- not :last_value here\n/* nor :last_value */"
    assert uses_last_value(q) and not uses_last_value("SELECT ':last_value' -- :last_value")
    out = replace_last_value(q, "%(last_value)s")
    assert out.count("%(last_value)s") == 1 and "':last_value'" in out and "-- not :last_value here" in out
    assert "a::text" in out
