"""The demo: build a realistic SQLite shop database, and summarise the demo's Parquet output.

python -m conduit_dagster.demo build [--rows 300000] [--path demo/shop.db]
python -m conduit_dagster.demo summary [--file ingest.yml]
"""

import argparse
import datetime as dt
import random
import sqlite3
import sys
from pathlib import Path

STATUSES = ["placed", "paid", "shipped", "delivered", "returned", "cancelled"]
COUNTRIES = ["DE", "FR", "NL", "US", "GB", "ES", "IT", "PL", "SE", "JP"]
PRODUCTS = ["keyboard", "mouse", "monitor", "laptop stand", "usb-c hub", "webcam", "headset", "desk lamp", "chair", "cable"]
FIRST = ["Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Guido", "Radia", "Edsger", "Hedy"]
LAST = ["Lovelace", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen", "van Rossum", "Perlman"]


def build(path: Path, orders: int, seed: int = 7) -> None:
    """Create the demo database (customers, orders with repeated timestamps). Replaces the file."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    conn.executescript(
        """
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
                                country TEXT NOT NULL, signed_up_at TEXT NOT NULL);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                             product TEXT NOT NULL, quantity INTEGER NOT NULL, amount REAL NOT NULL,
                             currency TEXT NOT NULL, status TEXT NOT NULL, note TEXT, created_at TEXT NOT NULL);
        CREATE INDEX orders_created_at ON orders (created_at);
        """
    )
    n_customers = max(10, orders // 15)
    start = dt.datetime(2025, 1, 1)
    customers = []
    for i in range(1, n_customers + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        signed = start + dt.timedelta(seconds=rng.randrange(0, 300 * 86400))
        customers.append(
            (
                i,
                f"{first} {last}",
                f"{first.lower()}.{last.lower().replace(' ', '')}{i}@example.com",
                rng.choice(COUNTRIES),
                signed.isoformat(sep=" "),
            )
        )
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", customers)
    # Orders arrive a few per second: created_at repeats, as real event timestamps do.
    t = start
    rows = []
    for i in range(1, orders + 1):
        if rng.random() < 0.35:
            t += dt.timedelta(seconds=rng.randrange(1, 4))
        qty = rng.randint(1, 5)
        note = rng.choice([None, None, None, "gift wrap", 'leave at door, "back" entrance', "call first\nthen ring"])
        rows.append(
            (
                i,
                rng.randint(1, n_customers),
                rng.choice(PRODUCTS),
                qty,
                round(qty * rng.uniform(5, 400), 2),
                "EUR",
                rng.choice(STATUSES),
                note,
                t.isoformat(sep=" "),
            )
        )
        if len(rows) == 50_000:
            conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            rows.clear()
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    tmp.replace(path)
    print(f"built {path}: {n_customers:,} customers, {orders:,} orders")


def summary(ingest_file: Path) -> None:
    import pyarrow.dataset as ds

    from conduit_dagster.engine.backends import destination_backend
    from conduit_dagster.engine.spec import load_spec

    spec = load_spec(ingest_file)
    for r in spec.resources:
        local = destination_backend(r.destination).local_output(r.destination, r.name)
        if local is None:
            print(f"{r.name}: written to {r.destination.type} destination {r.destination.name!r}")
            continue
        out, written = local
        if not out.is_dir():
            print(f"{r.name}: no output yet at {out}")
            continue
        fmt = {"jsonl": "json"}.get(written, written)
        n = ds.dataset(out, format=fmt).count_rows()
        parts = sorted(p.name for p in out.iterdir() if not p.name.startswith(("_", ".")))
        print(f"{r.name}: {n:,} rows in {len(parts)} {written} part files at {out}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conduit_dagster.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="create the demo SQLite database")
    b.add_argument("--rows", type=int, default=300_000)
    b.add_argument("--path", type=Path, default=Path("demo/shop.db"))
    s = sub.add_parser("summary", help="count the rows of the demo's output")
    s.add_argument("--file", type=Path, default=Path("ingest.yml"))
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.path, args.rows)
    else:
        summary(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
