"""The grades as a table: one row per submission and exercise, written as CSV that no spreadsheet runs as a formula,
and the totals over a batch (shared by the batch grader and the merge of shards)."""
from __future__ import annotations

import csv
import io

from .session import clean

STATUSES = ("passed", "failed", "not_attempted", "error", "timeout")
COLUMNS = ("submission", "exercise", "points", "max_points", "status", "message", "flag")
FLAGS = ("library_reference", "tampered", "review")  # the first two score 0; review keeps the points
MAX_MESSAGE_TEXT = 400  # characters of a row's message


def make_row(submission, ex_name, status, message, points=0, max_points=0, flag=""):
    return {"submission": submission, "exercise": ex_name, "points": points, "max_points": max_points,
            "status": status, "message": clean(message), "flag": flag}


def spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe (OWASP)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def csv_text(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(clean(v, 2000) if isinstance(v, str) else v) for k, v in row.items()}
                     for row in rows)
    return buf.getvalue()


def summarize(records) -> dict:
    """Totals over submissions: points, and how many rows have each status."""
    rows = [r for rec in records for r in rec["rows"]]
    return {"submissions": len(records), "points": sum(r["points"] for r in rows),
            "max_points": sum(r["max_points"] for r in rows),
            "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "flagged": sum(bool(r["flag"]) for r in rows),
            "ungradable": sorted({rec["submission"] for rec in records if any(r["status"] == "error" for r in rec["rows"])})}
