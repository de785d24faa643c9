"""Experiment step records: each write is one short transaction, each read a read-only connection."""

from __future__ import annotations

import json
from pathlib import Path

from warehouse.db import connect, connect_after_work, transaction


def completed(db: Path, keys: list[str]) -> dict[str, dict]:
    """key -> outputs of the steps recorded complete (an absent warehouse has none)."""
    if not Path(db).exists() or not keys:
        return {}
    con = connect(db, read_only=True)
    try:
        rows = con.execute("SELECT key, outputs FROM experiment_steps WHERE status = 'complete' "
                           "AND key IN (SELECT unnest(?::VARCHAR[]))", [keys]).fetchall()
    finally:
        con.close()
    return {k: json.loads(v) for k, v in rows}


def start_step(db: Path, key: str, kind: str, label: str, experiment: str, profile: str, inputs: dict) -> None:
    con = connect_after_work(db, f"step {label}")
    try:
        with transaction(con):
            con.execute("DELETE FROM experiment_steps WHERE key = ?", [key])
            con.execute("INSERT INTO experiment_steps (key, kind, label, experiment, profile, inputs, status) "
                        "VALUES (?, ?, ?, ?, ?, ?, 'running')",
                        [key, kind, label, experiment, profile, json.dumps(inputs, sort_keys=True, default=str)])
    finally:
        con.close()


def finish_step(db: Path, key: str, outputs: dict | None, seconds: float, error: str | None = None) -> None:
    con = connect_after_work(db, f"step {key}")
    try:
        with transaction(con):
            con.execute("UPDATE experiment_steps SET status = ?, outputs = ?, error = ?, seconds = ?, "
                        "finished_at = current_timestamp WHERE key = ?",
                        ["failed" if error else "complete",
                         json.dumps(outputs, sort_keys=True, default=str) if outputs is not None else None,
                         error, seconds, key])
    finally:
        con.close()


def record_run(db: Path, run_id: str, experiment: str, profile: str, source: str, keys: list[str], status: str,
               steps_run: int | None = None, steps_cached: int | None = None, seconds: float | None = None) -> None:
    con = connect_after_work(db, f"experiment run {run_id}")
    try:
        with transaction(con):
            con.execute("DELETE FROM experiment_runs WHERE id = ?", [run_id])
            con.execute("INSERT INTO experiment_runs (id, experiment, profile, source, steps, status, steps_run, "
                        "steps_cached, seconds, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                        "CASE WHEN ? = 'running' THEN NULL ELSE current_timestamp END)",
                        [run_id, experiment, profile, source, json.dumps(keys), status, steps_run, steps_cached,
                         seconds, status])
    finally:
        con.close()


def existing_ids(db: Path, wanted: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Which of the ids still have their row ({"table.column": [id, ...]} -> {(table.column, id)}),
    in one read-only connection: a wiped warehouse means the steps that made them run again."""
    if not Path(db).exists() or not any(wanted.values()):
        return set()
    con = connect(db, read_only=True)
    try:
        found = set()
        for where, ids in wanted.items():
            table, column = where.split(".")
            rows = con.execute(f"SELECT {column} FROM {table} WHERE {column} IN (SELECT unnest(?::VARCHAR[]))",
                               [ids]).fetchall()
            found |= {(where, r[0]) for r in rows}
        return found
    finally:
        con.close()
