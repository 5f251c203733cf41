"""The training benchmarks' shared runner (course_lib.bench.run_tasks, resumable): runs skipped when their records
are already there, a partial file after each run, and the refusals that keep a user's records."""
import json

import pytest

from course_lib.bench import resumable, run_tasks


def _square(kind, seed):
    return {"kind": kind, "seed": seed, "value": seed * seed}


def _key(r):
    return (r["kind"], r["seed"])


def test_runs_only_what_is_missing_and_reports_each_run():
    tasks = [{"kind": "a", "seed": s} for s in range(4)]
    seen = []
    done = [{"kind": "a", "seed": 2, "value": -1}]  # already measured: kept as it is, not run again
    out = run_tasks(tasks, _square, _key, done=done, on_record=lambda recs: seen.append(len(recs)), progress=False)
    assert [r["seed"] for r in out] == [0, 1, 2, 3]  # the tasks' order
    assert out[2]["value"] == -1 and [r["value"] for r in out if r["seed"] != 2] == [0, 1, 9]
    assert seen == [2, 3, 4]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs"):
            run_tasks(tasks, _square, _key, jobs=bad, progress=False)


def test_resumable_keeps_a_partial_run_and_refuses_to_lose_it(tmp_path):
    path = tmp_path / "bench.json"
    done, on_record = resumable(str(path), force=False, resume=False)
    assert done == []
    on_record([{"kind": "a", "seed": 0}])
    partial = tmp_path / "bench.json.partial"
    assert json.loads(partial.read_text()) == [{"kind": "a", "seed": 0}]
    with pytest.raises(ValueError, match="--resume"):
        resumable(str(path), force=False, resume=False)  # an unfinished run is not silently started over
    done, _ = resumable(str(path), force=False, resume=True)
    assert done == [{"kind": "a", "seed": 0}]
    assert resumable(str(path), force=True, resume=False)[0] == []
    with pytest.raises(ValueError, match="--json"):
        resumable(None, force=False, resume=True)
    path.write_text("[]")
    with pytest.raises(Exception, match="exists"):
        resumable(str(path), force=False, resume=False)  # finished records are replaced only with --force
    assert resumable(None, force=False, resume=False) == ([], None)
