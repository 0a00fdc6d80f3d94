#!/usr/bin/env python3
"""Generate the small sample dataset shipped in data/sample (deterministic).

Usage: python3 scripts/gen_sample_data.py [OUT_DIR]   (needs `pip install duckdb`)

The files are committed, so running ferrocorn never needs this script; it documents how they
were made and regenerates them identically.
"""
import os
import shutil
import sys

import duckdb

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "data", "sample")
out = os.path.abspath(out)
if os.path.exists(out):
    shutil.rmtree(out)
os.makedirs(out)

con = duckdb.connect()
con.execute("SELECT setseed(0.42)")
con.execute(
    """
    CREATE TABLE customers AS
    SELECT i AS customer_id,
           'customer ' || i AS name,
           (['BR', 'PT', 'US', 'DE', 'JP'])[1 + (i % 5)] AS country,
           DATE '2020-01-01' + CAST(i * 3 AS INTEGER) AS signup_date,
           CASE WHEN i % 7 = 0 THEN NULL ELSE i % 3 = 0 END AS is_premium
    FROM range(1, 501) t(i)
    """
)
con.execute(
    """
    CREATE TABLE orders AS
    SELECT i AS order_id,
           1 + CAST(floor(random() * 500) AS INTEGER) AS customer_id,
           (['open', 'shipped', 'delivered', 'cancelled'])[1 + CAST(floor(random() * 4) AS INTEGER)] AS status,
           CAST(round(random() * 1000, 2) AS DECIMAL(12, 2)) AS amount,
           TIMESTAMP '2024-01-01 00:00:00' + to_seconds(CAST(floor(random() * 31536000) AS BIGINT)) AS ordered_at,
           CAST(1 + floor(random() * 5) AS SMALLINT) AS quantity,
           CASE WHEN random() < 0.1 THEN NULL ELSE random() END AS discount,
           CAST(i AS BIGINT) * 1000003 AS big_id
    FROM range(1, 5001) t(i)
    """
)
con.execute(
    """
    CREATE TABLE events AS
    SELECT i AS event_id,
           DATE '2024-06-01' + CAST(i % 3 AS INTEGER) AS day,
           (['view', 'click', 'purchase'])[1 + (i % 3)] AS kind,
           1 + (i % 500) AS customer_id
    FROM range(1, 3001) t(i)
    """
)
con.execute(f"COPY customers TO '{out}/customers.parquet' (FORMAT parquet)")
con.execute(f"COPY orders TO '{out}/orders.parquet' (FORMAT parquet, ROW_GROUP_SIZE 2048)")
con.execute(f"COPY events TO '{out}/events' (FORMAT parquet, PARTITION_BY (day))")
print(f"wrote {out}")
