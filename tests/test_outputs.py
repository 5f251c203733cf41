"""Nothing a user owns is lost, and a mistake is refused before the work starts: output planning, locks, exclusive
final writes, argument checks, damaged and crafted checkpoints, and fault injection (kills, a full disk, two writers)."""
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from course_lib import checkpoints as C
from course_lib import outputs as O
from course_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "course_lib", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---- the plan: every output checked against the others and the inputs, before any work ---------------------------

@pytest.mark.parametrize("args, message", [
    (["--out", "m.json"], "would both be written to m.json"),                 # the card is the checkpoint's .json
    (["--out", "a.pt", "--state", "a.pt"], "would both be written to a.pt"),
    (["--out", "a.pt", "--state", "a.json"], "would both be written to a.json"),
    (["--out", "folder/"], "names a folder"),
    (["--out", "existing_dir"], "is a folder"),
    (["--out", "notes.txt/x.pt"], "is a file, not a folder"),
    (["--out", "x.pt", "--eval-samples", "-5"], "--eval-samples must be between 1 and 100,000"),
    (["--out", "x.pt", "--eval-samples", str(10**12)], "--eval-samples must be between 1 and 100,000"),
    (["--out", "x.pt", "--save-every", "0"], "--save-every must be between 1"),
    (["--out", "x.pt", "--steps", "0"], "--steps must be between 1"),
])
def test_train_refuses_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing_dir").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    started = []
    monkeypatch.setattr("course_lib.cli._train_run", lambda *a: started.append(a))
    assert main(["train", "--preset", "ring8", "--steps", "5", "--no-eval", *args]) == 2
    assert message in capsys.readouterr().err and not started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_dir", "notes.txt"]


def test_train_never_replaces_a_card_or_checkpoint_without_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.json").write_text("my notes")
    monkeypatch.setattr("course_lib.cli._train_run", lambda *a: pytest.fail("training started"))
    assert main(["train", "--preset", "ring8", "--out", "notes.pt"]) == 2
    assert "notes.json exists" in capsys.readouterr().err and (tmp_path / "notes.json").read_text() == "my notes"


def test_a_run_resumes_only_the_state_it_started_and_its_card_reproduces_it(tmp_path):
    state, out = tmp_path / "st ate.pt", tmp_path / "my model.pt"
    done = run_cli("train", "--preset", "ring8", "--steps", "4", "--no-eval", "--out", str(out), "--state", str(state))
    assert done.returncode == 0, done.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    words = shlex.split(card["command"])  # quoted paths: the command splits back into exactly these arguments
    assert words[words.index("--out") + 1] == str(out) and words[words.index("--state") + 1] == str(state)
    assert "--no-eval" in words and words[words.index("--steps") + 1] == "4"
    before = state.read_bytes()
    for other in (["--steps", "8"], ["--preset", "grid25"]):
        args = ["train", "--preset", "ring8", "--steps", "4", "--no-eval", "--out", str(tmp_path / "b.pt"),
                "--state", str(state)]
        args[args.index(other[0]) + 1] = other[1]
        done = run_cli(*args)
        assert done.returncode == 2 and "was started with other settings" in done.stderr
        assert state.read_bytes() == before and not (tmp_path / "b.pt").exists()


def test_grade_never_writes_over_a_submission_or_its_own_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = tmp_path / "a.ipynb"
    nb.write_bytes((ROOT / "notebooks" / "student" / "00_welcome.ipynb").read_bytes())
    for args, message in ((["--out", "a.ipynb", "--force"], "would be written over the submission"),
                          (["--out", "s.csv", "--json", "s.csv"], "would both be written to s.csv"),
                          (["--out", "s.csv", "--timeout", "inf"], "positive finite")):
        assert main(["grade", "a.ipynb", *args]) == 2
        assert message in capsys.readouterr().err
    assert nb.read_bytes() == (ROOT / "notebooks" / "student" / "00_welcome.ipynb").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ipynb"]


@pytest.mark.parametrize("args, message", [
    (["generate", "a red circle", "--out", "x.png", "--scale", "1e30"], "--scale must be"),
    (["generate", "a red circle", "--out", "x.png", "--seed", str(2**70)], "--seed must be"),
    (["generate", "a red circle", "--out", "x.png", "--nfe", "0"], "--nfe must be"),
    (["generate", "a red circle", "--out", "pictures.png/"], "must name a .png file"),
    (["bench", "samplers", "--seeds", "1", "1"], "--seeds must be distinct"),
    (["bench", "samplers", "--seeds", "-1"], "--seeds must be distinct non-negative"),
    (["bench", "samplers", "--samples", str(10**9)], "--samples must be between"),
    (["tune", "--preset", "ring8", "--samples", "-5"], "--samples must be between 10"),
    (["tune", "--preset", "ring8", "--samples", "0"], "--samples must be between 10"),
    (["tune", "--preset", "ring8", "--nfe", "10", "10"], "--nfe must be distinct"),
])
def test_other_commands_refuse_bad_arguments_at_once(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("course_lib.bench.samplers.tune_checkpoint", lambda *a, **k: pytest.fail("tuning started"))
    monkeypatch.setattr("course_lib.bench.samplers.main_samplers", lambda *a, **k: pytest.fail("benchmark started"))
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_tune_refuses_a_read_only_data_folder_before_tuning(monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    monkeypatch.setattr("course_lib.bench.samplers.tune_checkpoint", lambda *a, **k: pytest.fail("tuning started"))
    from course_lib.bench.samplers import main_tune

    with pytest.raises(ValueError, match="is not writable .Read-only file system"):
        main_tune("ring8", samples=100)


# ---- locks and exclusive final writes: two writers, a file that appears, a killed writer -------------------------

def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    target = tmp_path / "model.pt"
    first = O.Plan()
    first.output(target, "checkpoint")
    with first:
        second = O.Plan()
        second.output(target, "checkpoint")
        with pytest.raises(ValueError, match=f"another command is writing {target}"):
            second.claim()
    assert not list(tmp_path.iterdir())  # the lock went with the command
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".model.pt.lock"
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")  # a writer that was killed
    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half a file")      # and its unfinished write
    with _claim(target):
        assert not (tmp_path / ".model.pt.abc123.tmp").exists()
    lock.write_text("another-host 1\n")  # a lock from another machine is never taken over
    with pytest.raises(ValueError, match="process 1 on another-host"):
        _claim(target)


def _claim(target):
    plan = O.Plan()
    plan.output(target, "checkpoint")
    return plan.claim()


def test_two_train_commands_to_one_file_the_second_is_refused_at_its_start(tmp_path):
    out = tmp_path / "m.pt"
    first = subprocess.Popen([sys.executable, "-m", "course_lib", "train", "--preset", "ring8", "--steps", "100000",
                              "--no-eval", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / ".m.pt.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        second = run_cli("train", "--preset", "ring8", "--steps", "5", "--no-eval", "--out", str(out))
        assert second.returncode == 2 and "another command is writing" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert not out.exists()


def test_a_file_that_appears_meanwhile_is_not_replaced_and_the_result_is_kept_beside_it(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"appeared while the command ran")
    with pytest.raises(FileExistsError, match="m.new.pt"):
        O.write_then_publish(lambda tmp: C.save_atomic({"w": torch.ones(2)}, tmp), target, replace=False)
    assert target.read_bytes() == b"appeared while the command ran"
    assert torch.load(tmp_path / "m.new.pt")["w"].sum() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.new.pt", "m.pt"]  # no temporary file left


def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "m.pt"
    C.save_atomic({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    code = ("import sys, torch; from course_lib.checkpoints import save_atomic\n"
            "class Slow:\n"
            "    def __reduce__(self):\n"
            "        import time; print('writing', flush=True); time.sleep(600)\n"
            f"save_atomic({{'w': torch.ones(10**6), 'slow': Slow()}}, {str(target)!r})\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert target.read_bytes() == before and torch.load(target)["w"].sum() == 0
    assert list(tmp_path.glob(".m.pt.*.tmp"))  # the killed write's temporary file ...
    plan = O.Plan(force=True)
    plan.output(target, "checkpoint")
    with plan:
        assert not list(tmp_path.glob(".m.pt.*.tmp"))  # ... is cleaned by the next command writing that file


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on device while writing"):
        _fail_write(tmp_path, full)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    err = O.no_space(tmp_path / "m.pt", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"))
    assert err is not None and "no space left on device" in str(err)
    assert O.no_space(tmp_path / "m.pt", RuntimeError("something else")) is None


def _fail_write(folder, failure):
    return C._write_atomic(failure, folder / "a.bin", replace=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (Linux, root, where the container allows mounts): a real full disk."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_on_a_real_full_disk_train_and_start_fail_clearly_and_leave_no_broken_file(tiny_disk):
    done = run_cli("train", "--preset", "ring8", "--steps", "2", "--no-eval", "--out", str(tiny_disk / "m.pt"))
    assert done.returncode == 2 and "no space left on device" in done.stderr, done.stderr[-500:]
    assert not (tiny_disk / "m.pt").exists() and not list(tiny_disk.glob(".*.tmp"))
    work = tiny_disk / "work"
    done = run_cli("start", str(work), "--repo", str(ROOT))
    assert done.returncode == 2 and "no space left on device" in done.stderr, done.stderr[-500:]
    assert all(json.loads(p.read_bytes()).get("cells") for p in work.glob("*.ipynb"))  # whole lessons or none


def test_start_treats_a_broken_lesson_as_not_yours(tmp_path):
    from course_lib.workspace import update

    work = tmp_path / "work"
    update(work, ROOT)
    (work / "00_welcome.ipynb").write_bytes(b"")              # an interrupted copy
    (work / "01_forward_process.ipynb").write_bytes(b"{\"cel")  # half a notebook: set aside, never deleted
    report = update(work, ROOT)
    assert {p.name for p, _ in report.repaired} == {"00_welcome.ipynb", "01_forward_process.ipynb"}
    for name in ("00_welcome.ipynb", "01_forward_process.ipynb"):
        assert json.loads((work / name).read_bytes())["cells"]
    assert (work / "01_forward_process.ipynb.broken").read_bytes() == b"{\"cel"
    assert not (work / "00_welcome.ipynb.broken").exists()


# ---- checkpoints: damaged, malicious and crafted files get a clear error naming the file -------------------------

def test_a_flipped_bit_is_refused(tmp_path):
    data = bytearray((C.shipped_dir() / "ring8.pt").read_bytes())
    with zipfile.ZipFile(C.shipped_dir() / "ring8.pt") as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    data[member.header_offset + 30 + len(member.filename) + len(member.extra) + member.file_size // 2] ^= 0x08
    (tmp_path / "flip.pt").write_bytes(data)
    with pytest.raises(ValueError, match=r"flip.pt is damaged: the bytes of .* do not match their stored checksum"):
        C.load_checkpoint(tmp_path / "flip.pt")


def test_a_malicious_pickle_is_refused_with_the_courses_own_words(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never",))

    torch.save({"format": C.FORMAT, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        C.load_checkpoint(tmp_path / "evil.pt")
    assert "refuses to unpickle" in str(e.value) and "evil.pt" in str(e.value)
    assert "will likely succeed" not in str(e.value)  # PyTorch's advice to load it unsafely is not repeated


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(card=["not", "a", "dict"]), "its card must be a dict"),
    (lambda c: c.pop("config"), "missing its 'config' entry"),
    (lambda c: c.update(config="ring8"), "'config' entry must be a dict"),
    (lambda c: c.update(weights={k: v[..., :1] for k, v in c["weights"].items()}), "do not fit the model"),
    (lambda c: c.update(weights={"w": "text"}), "dict of tensors"),
])
def test_crafted_checkpoints_get_a_clear_error(tmp_path, change, message):
    ckpt = C.load_checkpoint(C.shipped_dir() / "ring8.pt")
    change(ckpt)
    C.save_atomic(ckpt, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=message) as e:
        C.load_pretrained(tmp_path / "crafted.pt")
    assert "crafted.pt" in str(e.value)


def test_a_checkpoint_folder_that_does_not_exist_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CHECKPOINTS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="COURSE_CHECKPOINTS is set to .*nowhere"):
        C.shipped_dir()


def test_a_malformed_shipped_json_is_named(tmp_path):
    (tmp_path / "bench_guidance.json").write_text("{\"records\": [1, 2")
    with pytest.raises(ValueError, match="bench_guidance.json is not valid JSON"):
        C.read_json(tmp_path / "bench_guidance.json")


def test_a_benchmarks_json_is_checked_before_the_run(tmp_path):
    from course_lib.bench import refuse_to_overwrite

    (tmp_path / "old.json").write_text("[]")
    for path, message in ((tmp_path / "old.json", "old.json exists"), (f"{tmp_path}/", "names a folder"),
                          (tmp_path / "notes.txt" / "b.json", "not a folder")):
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match=message):
            refuse_to_overwrite(path, force=False)
    refuse_to_overwrite(tmp_path / "old.json", force=True)
    assert (tmp_path / "old.json").read_text() == "[]"  # checked, not written
