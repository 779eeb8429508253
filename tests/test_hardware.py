"""The hardware table (MFU logging and the planner read the same chips) and the CPU probe."""
import os
import subprocess
import sys

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


AVX2 = frozenset({"avx2"})
AVX512 = frozenset({"avx2", "avx512f"})
BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})


@pytest.mark.parametrize("features, dtype, matmul_impl", [
    (AVX2, "float32", "xla"), (AVX512, "float32", "xla"), (frozenset(), "float32", "xla"),
    (BF16, "bfloat16", "f32_out"), (AMX, "bfloat16", "f32_out"),
])
def test_auto_on_cpu_follows_the_bf16_instructions(features, dtype, matmul_impl):
    choice = hardware.compute_choice(platform="cpu", features=features)
    assert (choice.dtype, choice.matmul_impl) == (dtype, matmul_impl)
    assert choice.f32_out == (matmul_impl == "f32_out")
    described = choice.describe()
    assert described.startswith(f"compute {dtype}, ") and "cpu" in described
    assert all(f in described for f in features)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_on_accelerators_is_bf16_with_xla_dots(platform):
    for features in (AVX2, AMX):  # the host CPU does not matter
        choice = hardware.compute_choice(platform=platform, features=features)
        assert (choice.dtype, choice.matmul_impl, choice.f32_out) == ("bfloat16", "xla", False)


def test_explicit_values_are_kept_and_bf16_on_avx2_takes_xla_dots():
    assert hardware.compute_choice("bfloat16", platform="cpu", features=AVX2).matmul_impl == "xla"
    assert hardware.compute_choice("float32", platform="cpu", features=AMX).matmul_impl == "xla"
    forced = hardware.compute_choice("bfloat16", "f32_out", platform="cpu", features=AVX2)
    assert forced.f32_out and "bfloat16 x bfloat16 -> float32" in forced.describe()
    assert not hardware.compute_choice("float32", "f32_out", platform="cpu", features=AMX).f32_out
    assert hardware.compute_choice("bfloat16", "xla", platform="cpu", features=AMX).matmul_impl == "xla"


def test_configs_resolve_auto_through_compute_choice():
    from bert_jax import config_utils
    c = config_utils.pretrain_config("tiny")
    assert c.model.dtype == "auto" and config_utils.finetune_config().dtype == "auto"
    assert config_utils.model_overrides(c, 100)["dtype"] == hardware.compute_choice().dtype


def test_cpu_peak_measures_the_f32_output_form():
    _, source = hardware.device_peak_flops("bfloat16", f32_out=True, measure_seconds=0.01)
    assert "bfloat16->float32 matmul" in source


# ----------------------------------------------------------------------------
# Huge pages for malloc (bert_jax/_hugepages.py)

from bert_jax import _hugepages  # noqa: E402


@pytest.mark.parametrize("environ, glibc, thp, add", [
    ({}, (2, 36), "madvise", True),
    ({}, (2, 35), "always", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", False),  # the user's choice stays
    ({"BERT_JAX_HUGE_PAGES": "0"}, (2, 36), "madvise", False),
    ({}, (2, 31), "madvise", False),
    ({}, None, "madvise", False),
    ({}, (2, 36), "never", False),
    ({}, (2, 36), None, False),
])
def test_huge_pages_decision(environ, glibc, thp, add):
    decided, why = _hugepages.decision(environ, glibc, thp)
    assert decided == add and why


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert _hugepages.thp_mode(str(setting)) == "madvise"
    assert _hugepages.thp_mode(str(tmp_path / "absent")) is None


def test_only_entry_points_reexecute(monkeypatch):
    calls = []
    monkeypatch.setattr(_hugepages, "environment", lambda: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    for argv0, orig, expected in [
        ("-m", ["python", "-u", "-m", "bert_jax.finetune", "--config", "c.py"], True),
        ("-m", ["python", "-m", "bert_jax.tokenizer"], False),  # not a training entry point
        ("-m", ["python", "-m", "pytest"], False),
        ("/x/y.py", ["python", "/x/y.py"], False),  # a program importing bert_jax as a library
    ]:
        monkeypatch.setattr(sys, "argv", [argv0])
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        calls.clear()
        _hugepages.reexec_entry_point(execve=lambda exe, argv, env: calls.append((argv, env)))
        assert bool(calls) == expected, orig
        if expected:
            assert calls[0] == (orig, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


@pytest.mark.parametrize("environ, glibc, accelerator, add", [
    ({}, (2, 36), False, True),
    ({}, (2, 26), False, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), False, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, (2, 36), False, False),  # the user's choice stays
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, (2, 36), False, False),
    ({"BERT_JAX_MALLOC_REUSE": "0"}, (2, 36), False, False),
    ({}, (2, 25), False, False),
    ({}, None, False, False),
    ({}, (2, 36), True, False),  # a GPU or TPU holds the step's buffers
])
def test_malloc_reuse_decision(environ, glibc, accelerator, add):
    decided, why = _hugepages.reuse_decision(environ, glibc, accelerator)
    assert decided == add and why


def test_accelerator_from_jax_platforms_or_device_nodes(tmp_path):
    (tmp_path / "nvidia0").write_text("")
    gpu = (str(tmp_path / "nvidia[0-9]*"),)
    none = (str(tmp_path / "accel[0-9]*"),)
    assert _hugepages.on_accelerator({}, gpu) and not _hugepages.on_accelerator({}, none)
    assert not _hugepages.on_accelerator({"JAX_PLATFORMS": "cpu"}, gpu)  # the user's platform wins
    assert _hugepages.on_accelerator({"JAX_PLATFORMS": "tpu,cpu"}, none)


def test_environment_keeps_the_users_tunables_and_adds_the_rest(monkeypatch):
    monkeypatch.setattr(_hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(_hugepages, "thp_mode", lambda: "madvise")
    env = _hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "JAX_PLATFORMS": "cpu"})
    assert env["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={2**40}"]
    assert "kept for reuse" in _hugepages.status(env)
    assert _hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "JAX_PLATFORMS": "tpu"}) is None


def test_an_entry_point_runs_with_huge_pages_once():
    """`python -m bert_jax.hugepages` goes through the re-execution as every entry point does."""
    drop = ("GLIBC_TUNABLES", "BERT_JAX_HUGE_PAGES", "BERT_JAX_MALLOC_REUSE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["JAX_PLATFORMS"] = "cpu"
    run = lambda extra: subprocess.run([sys.executable, "-m", "bert_jax.hugepages"], capture_output=True,  # noqa: E731
                                       text=True, env={**env, **extra}, check=True).stdout.strip()
    glibc = _hugepages.glibc_version()
    huge, why = _hugepages.decision(env, glibc, _hugepages.thp_mode())
    reuse, _ = _hugepages.reuse_decision(env, glibc, False)
    if huge and reuse:
        assert run({}).startswith("malloc huge pages on, freed memory kept for reuse (GLIBC_TUNABLES=glibc.malloc.hugetlb=1:")
    out = run({"BERT_JAX_HUGE_PAGES": "0"})
    assert out.startswith("malloc huge pages off (BERT_JAX_HUGE_PAGES=0)")
    assert out.endswith(f"; freed memory kept for reuse ({_hugepages.REUSE_COST})") == reuse
    out = run({"BERT_JAX_HUGE_PAGES": "0", "BERT_JAX_MALLOC_REUSE": "0"})
    assert out == ("malloc huge pages off (BERT_JAX_HUGE_PAGES=0); freed memory returned to the system "
                   "(BERT_JAX_MALLOC_REUSE=0)")