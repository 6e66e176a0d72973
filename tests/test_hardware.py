import pytest
import torch

from rnnops.autotune import hardware


@pytest.mark.parametrize("name", ["V100", "A100", "L4", "RTX 4090", "H100", "H200"])
def test_offline_gpus_are_complete(name):
    gpu = hardware.named(name)
    assert gpu.sm_count > 0 and gpu.memory_bandwidth > 1e11 and gpu.l2_bytes > 0
    assert gpu.shared_memory_per_block <= gpu.shared_memory_per_sm
    assert gpu.registers_per_block <= gpu.registers_per_sm
    assert gpu.peak("float32") > 0 and gpu.peak("float16") > gpu.peak("float32")
    assert gpu.arch.startswith("sm_")


@pytest.mark.parametrize("device_name,expected", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("Tesla V100-SXM2-32GB", "V100"),
    ("NVIDIA L4", "L4"),
])
def test_device_names_match_offline_entries(device_name, expected):
    assert hardware.match_name(device_name).name == expected


def test_unknown_names():
    assert hardware.match_name("NVIDIA T4") is None
    with pytest.raises(ValueError, match="unknown GPU 'T4'"):
        hardware.named("T4")


def test_roofline_floor_uses_the_slower_of_memory_and_compute():
    from rnnops.bench import roofline

    h100 = hardware.named("H100")
    work = roofline.linear_attn(8, 4096, 16, 128, 128, "none", torch.bfloat16)
    flops, moved = work.phase("fwd")
    assert work.floor_seconds(h100, "fwd") == max(moved / 3350e9, flops / 989e12)
    assert work.floor_seconds(h100, "fwd_bwd") == pytest.approx(3 * work.floor_seconds(h100, "fwd"))


def test_programs_per_sm_follow_cuda_occupancy_rules():
    h100 = hardware.named("H100")
    # the delta rule's states_bwd at the H100's tiles (compile_check): two stages, one stage
    assert h100.programs_per_sm(128, 106, 118784) == (1, "shared memory")
    assert h100.programs_per_sm(128, 191, 32768) == (2, "registers")  # 192 per thread: 24576 per program
    assert h100.programs_per_sm(1024, 32, 0) == (2, "threads")
    assert h100.programs_per_sm(32, 16, 0) == (32, "blocks")
    # 1 KB reserved per block: 113 KB fits twice in 228 KB, 113.5 KB does not
    assert h100.programs_per_sm(128, 32, 113 * 1024)[0] == 2 and h100.programs_per_sm(128, 32, 113 * 1024 + 512)[0] == 1


@pytest.mark.gpu
def test_live_device_model():
    gpu = hardware.from_device()
    assert gpu.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    assert gpu.shared_memory_per_block >= 48 * 1024
