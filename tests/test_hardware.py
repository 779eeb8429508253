"""The hardware table (MFU logging and the planner read the same chips) and the CPU probe."""
import pytest

from bert_jax import hardware, planner


@pytest.mark.parametrize("kind, name", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
    ("TPU v6 lite", "v6e"), ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA L4", "l4"),
])
def test_device_kinds_find_their_chip(kind, name):
    assert hardware.chip_for_device_kind(kind).name == name


def test_unknown_device_kind_is_none():
    assert hardware.chip_for_device_kind("cpu") is None
    assert hardware.chip_for_device_kind("") is None


def test_peaks_by_dtype_and_one_table_for_planner_and_mfu():
    h100 = hardware.CHIPS["h100"]
    assert h100.peak_flops("bfloat16") == 989e12 and h100.peak_flops("float32") == 495e12  # TF32
    v5e = hardware.CHIPS["v5e"]
    assert v5e.peak_flops("float32") == v5e.peak_flops("bfloat16") == 197e12  # one bf16 MXU pass
    assert planner.parse_topology("v5e:2x2").chip is v5e
    assert set(planner.TPU_CHIPS) == {"v4", "v5e", "v5p", "v6e"}


def test_cpu_peak_is_measured_here():
    peak, source = hardware.device_peak_flops("float32", measure_seconds=0.05)
    assert peak > 1e8 and source.startswith("measured 1024x1024 float32 matmul")


def test_cpu_features_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 "
                       "amx_tile amx_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_features(str(cpuinfo)) == {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert hardware.cpu_features(str(cpuinfo)) == {"avx2"}


def test_cpu_features_elsewhere_assume_nothing(tmp_path):
    assert hardware.cpu_features(str(tmp_path / "missing")) == frozenset()  # macOS, Windows
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n")  # Linux on ARM: no x86 flags line
    assert hardware.cpu_features(str(arm)) == frozenset()
    assert hardware.cpu_features() <= set(hardware.CPU_FEATURES)  # this host, whatever it is
