"""Data-parallel training (course_lib.distributed) under torchrun with 2 CPU processes (gloo): the same numbers as
one process with the same global batch, and checkpoints that resume on either number of processes."""
import os
import subprocess
import sys

import pytest
import torch

from course_lib.checkpoints import load_checkpoint
from course_lib.train import Trainer, preset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    """Equal numbers on 1 and 2 processes hold in fp32; under bf16 autocast (a CPU with native bf16) the rounding of
    a half batch's matmuls differs from the whole batch's."""
    monkeypatch.setenv("COURSE_PRECISION", "fp32")


def _torchrun(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "course_lib", "train", "--preset", "ring8", "--no-eval", "--force", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(state):
    return {k: v.double() for k, v in state["ema"].items()}


def _same(state, trainer):
    assert state["step"] == trainer.step
    for k, v in trainer.ema.state_dict().items():
        torch.testing.assert_close(_weights(state)[k], v.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["losses"], torch.tensor(trainer.losses, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_two_processes_train_like_one_and_resume_on_any_number(tmp_path):
    one = Trainer(preset("ring8", steps=40))
    one.train(steps=20, progress=False)
    one.save(tmp_path / "half.pt")
    one.train(steps=20, progress=False)
    _torchrun(tmp_path, "--steps", "40", "--out", "dp.pt", "--state", "dp_state.pt")
    _same(load_checkpoint(tmp_path / "dp_state.pt"), one)  # 2 processes, global batch 512 = 1 process
    assert (tmp_path / "dp.pt").exists()  # written once, by rank 0
    _torchrun(tmp_path, "--steps", "40", "--out", "dp_resumed.pt", "--state", "half.pt")
    _same(load_checkpoint(tmp_path / "half.pt"), one)  # one process's state, finished by two
    _torchrun(tmp_path, "--steps", "20", "--out", "dp20.pt", "--state", "dp20_state.pt")
    resumed = Trainer.resume(tmp_path / "dp20_state.pt")  # two processes' state, continued by one
    resumed.train(steps=20, progress=False)
    alone = Trainer(preset("ring8", steps=20))
    alone.train(progress=False)
    alone.train(steps=20, progress=False)
    alone.save(tmp_path / "alone.pt")
    _same(load_checkpoint(tmp_path / "alone.pt"), resumed)


def test_what_data_parallel_refuses():
    from course_lib import distributed

    assert distributed.part(8, 1, 2) == slice(4, 8)
    with pytest.raises(ValueError, match="divisible"):
        distributed.part(10, 0, 3)


def test_a_rank_leaves_with_its_output_flushed_and_its_exit_code():
    """`leave` skips the interpreter's teardown (where gloo's threads can abort a finished rank) but loses no output."""
    code = ("import sys; from course_lib.distributed import leave\n"
            "print('written to a pipe, so block-buffered', end=''); print('and stderr', file=sys.stderr); leave(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "written to a pipe, so block-buffered" and "and stderr" in done.stderr
