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


def test_on_cuda_each_kernel_is_counted_once_under_its_operator():
    # the profiler's CUDA rows name a kernel both under the aten operator that launched it and under its own name;
    # Triton kernels have no operator and are kept under theirs
    events = [("aten::cudnn_convolution", 40.0, 3), ("sm80_xmma_fprop_implicit_gemm_tf32", 40.0, 3),
              ("void at::native::elementwise_kernel<128, 2>(int)", 10.0, 5), ("aten::add_", 10.0, 5),
              ("group_norm_silu_kernel", 20.0, 2), ("cudaLaunchKernel", 0.0, 10)]
    kept = profiling._operator_rows(events, "cuda")
    assert [k for k, _, _ in kept] == ["aten::cudnn_convolution", "aten::add_", "group_norm_silu_kernel"]
    assert sum(t for _, t, _ in kept) == 70.0  # 40 + 10 + 20: each microsecond once
    assert profiling._operator_rows(events, "cpu") == events
    # the list names every Triton kernel the course launches, read from the module's source
    import re
    from pathlib import Path

    source = (Path(profiling.__file__).parent / "triton_kernels.py").read_text()
    assert sorted(profiling.TRITON_KERNELS) == sorted(re.findall(r"@triton\.jit\s*\ndef (\w+)", source))
    long = profiling.OpProfile([("x" * 60, 1.0, 1)]).table()
    assert max(len(line) for line in long.splitlines()) <= 40 + 15
