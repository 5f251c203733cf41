"""Grading a large class on a cluster: split the submissions into shards, grade each anywhere, merge the results.

`grade SUBMISSIONS --shard K/N --out shard-K.csv` grades only the submissions whose name hashes to shard K of N (a
SHA-256 of the path as given, so every machine that sees the same files computes the same split) and writes, next
to its CSV and journal, a manifest (`shard-K.csv.shard.json`): K, N, a digest of the whole list of submissions it saw,
the submissions that fell to it and whether it graded them all. `merge-grades shard-*.csv --out grades.csv` checks
the manifests against each other and refuses a missing, repeated or unfinished shard, shards that saw different
submissions, or a CSV that disagrees with its manifest; otherwise it writes one CSV (and JSON) for the class.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

from ..checkpoints import write_json_atomic, write_text_atomic
from .results import COLUMNS, csv_text, spreadsheet_safe, summarize
from .session import clean

FORMAT = "course_lib.grade-shard"


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N) with 1 <= K <= N; ValueError otherwise."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N, e.g. 3/8, got {text!r}") from None
    if not 1 <= k <= n or n > 100_000:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def shard_of(label: str, n: int) -> int:
    """The shard (1 .. n) a submission falls to: a hash of its name, the same on every machine."""
    return int(hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16], 16) % n + 1


def batch_digest(labels) -> str:
    """A digest of the whole list of submissions a shard saw (two shards of one class must agree on it)."""
    h = hashlib.sha256()
    for label in sorted(labels):
        h.update(label.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def manifest_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".shard.json")


def write_manifest(out: Path, k: int, n: int, labels: list[str], assigned: list[str], graded: set[str],
                   json_out: Path | None) -> None:
    write_json_atomic({"format": FORMAT, "shard": k, "of": n, "batch": batch_digest(labels), "submissions": len(labels),
                       "assigned": assigned, "complete": set(assigned) <= graded,
                       "json": os.fspath(json_out) if json_out else None}, manifest_path(out))


def _manifest(csv_path: Path) -> dict:
    path = manifest_path(csv_path)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{csv_path} has no shard manifest ({path.name}): was it written by grade --shard?") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__})") from None
    if not (isinstance(m, dict) and m.get("format") == FORMAT and type(m.get("shard")) is int
            and type(m.get("of")) is int and isinstance(m.get("assigned"), list) and isinstance(m.get("batch"), str)):
        raise ValueError(f"{path} is not a shard manifest")
    return m


def merge(shards: list, out, json_out=None, force: bool = False, echo=print) -> dict:
    """Merge the CSVs of every shard of one class into `out` (and `json_out`); returns the totals. Refuses (ValueError)
    a missing, repeated or unfinished shard, shards of different classes, or a CSV that disagrees with its manifest."""
    out = Path(out)
    inputs = {Path(p).resolve() for p in shards}
    for target in filter(None, [out, json_out and Path(json_out)]):
        if target.resolve() in inputs or manifest_path(target).resolve() in inputs:
            raise ValueError(f"{target} is one of the shards to merge: choose another --out")
        if target.exists() and not force:
            raise ValueError(f"{target} exists: pass --force to replace it")
    manifests = [(Path(p), _manifest(Path(p))) for p in shards]
    if not manifests:
        raise ValueError("no shards given")
    n = manifests[0][1]["of"]
    seen: dict[int, Path] = {}
    for path, m in manifests:
        if m["of"] != n or m["batch"] != manifests[0][1]["batch"]:
            raise ValueError(f"{path} is a shard of another batch (shard {m['shard']}/{m['of']}) than "
                             f"{manifests[0][0]} (of {n}): they saw different submissions or a different N")
        if m["shard"] in seen:
            raise ValueError(f"shard {m['shard']}/{n} is given twice: {seen[m['shard']]} and {path}")
        if not m.get("complete"):
            raise ValueError(f"{path} (shard {m['shard']}/{n}) did not grade all its submissions: run its grade "
                             "command again (it resumes) before merging")
        seen[m["shard"]] = path
    missing = sorted(set(range(1, n + 1)) - set(seen))
    if missing:
        raise ValueError(f"shard(s) {', '.join(f'{k}/{n}' for k in missing[:20])} missing: every shard of the batch "
                         "must be merged at once")
    rows, records, owner = [], [], {}
    for path, m in sorted(manifests, key=lambda pm: pm[1]["shard"]):
        for label in m["assigned"]:
            if label in owner:
                raise ValueError(f"{label} is in both {owner[label]} and {path}")
            owner[label] = path
        try:
            with open(path, newline="", encoding="utf-8") as f:
                got = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path} cannot be read ({type(e).__name__})") from None
        if got and set(got[0]) != set(COLUMNS):
            raise ValueError(f"{path} is not a grades CSV (its columns are not {', '.join(COLUMNS)})")
        labels = {r["submission"] for r in got}
        if labels != {_csv_safe(x) for x in m["assigned"]}:
            raise ValueError(f"{path} does not hold the submissions its manifest lists: was it edited, or written by "
                             "another run?")
        for r in got:
            r["points"], r["max_points"] = int(r["points"]), int(r["max_points"])
        rows += got
        if json_out:
            records += _shard_records(path, m)
    total = sum(m["submissions"] for _, m in manifests) // len(manifests)
    if len(owner) != total:
        raise ValueError(f"the shards hold {len(owner)} submissions, the batch has {total}")
    write_text_atomic(csv_text(rows), out)
    by_label: dict = {}
    for r in rows:
        by_label.setdefault(r["submission"], []).append(r)
    totals = summarize(records) if records else summarize(
        [{"submission": s, "rows": by_label.get(_csv_safe(s), [])} for s in owner])
    if json_out:
        write_json_atomic({"totals": totals, "submissions": records}, json_out)
    echo(f"Merged {len(manifests)} shard(s), {len(owner)} submission(s): {totals['points']}/{totals['max_points']} "
         f"points; wrote {out}" + (f" and {json_out}" if json_out else ""))
    return totals


def _csv_safe(label: str) -> str:
    """A submission's name as its CSV rows hold it."""
    return spreadsheet_safe(clean(label, 2000))


def _shard_records(path: Path, m: dict) -> list:
    if not m.get("json"):
        raise ValueError(f"{path} was graded without --json: merge without --json, or grade the shard again with it")
    try:
        data = json.loads(Path(m["json"]).read_text(encoding="utf-8"))
        return list(data["submissions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the JSON of {path} ({m['json']}) cannot be read ({type(e).__name__})") from None


def main_merge(args) -> int:
    merge(args.shards, args.out, args.json, args.force)
    return 0
