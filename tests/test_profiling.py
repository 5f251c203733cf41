import torch

from course_lib.kernels import profiling


def test_profile_counts_the_operators_of_a_known_chain_and_groups_their_time():
    x = torch.randn(256, 256)
    w = torch.randn(256, 256)

    def fn():
        y = x @ w
        for _ in range(3):
            y = y * 2.0
        return y + 1.0

    prof = profiling.profile_ops(fn)
    assert prof.count(["aten::mul"]) == 3 and prof.count(["aten::add"]) == 1
    assert prof.calls >= 5
    shares = prof.shares
    assert abs(sum(shares.values()) - 1.0) < 1e-6 and shares["convolution / matmul"] > 0
    assert "aten::mul" in prof.table() and prof.table().count("\n") <= 12
    assert profiling.kind("aten::mkldnn_convolution") == "convolution / matmul"
    assert profiling.kind("aten::silu") == "everything else"


def test_silenced_hides_output_written_to_the_file_descriptors(capfd):
    import os

    with profiling.silenced():
        os.write(1, b"from C++\n")
        os.write(2, b"from C++ too\n")
    os.write(1, b"visible\n")
    out, err = capfd.readouterr()
    assert "from C++" not in out + err and "visible" in out
