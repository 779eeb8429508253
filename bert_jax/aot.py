r"""Pod planner: compile the pretraining step for a TPU topology on a CPU host.

    python -m bert_jax.aot --config configs/bert_large.py --topology v5e:16x16 \
        [--num_slices 2] [--mfu 0.5] [--search_batch] [--packed] \
        [--config.mesh.fsdp=-1 --config.mesh.data=1 --config.train.global_batch_size=4096 ...]

Needs libtpu (``pip install -r requirements-tpu.txt``), no TPU. Prints the plan of
``bert_jax.planner`` (the real pretraining step compiled for the topology: per-chip memory
against HBM, FLOPs, step time at --mfu); ``--search_batch`` finds the largest global batch
that fits; ``--packed`` plans the step on packed rows (with
``--config.model.attention_probs_dropout_prob=0`` its attention is Pallas splash attention with
segment ids). Exit status: 0 fits, 1 does not fit, 2 bad input (named on stderr).

Topologies: ``v4:2x2x2``, ``v5e:16x16`` (also ``v5litepod``), ``v5p:4x4x4``,
``v6e:4x4``, or accelerator types as gcloud names them: ``v5litepod-256``,
``v5e-16``, ``v5p-128``, ``v4-32`` (v4/v5p count TensorCores, two per chip),
``v6e-64``. ``--num_slices N`` plans N such slices joined over DCN (set
``--config.mesh.slices`` to match, or leave it at 1 and the planner sets it).

The library (``plan``, ``search_batch``, ``parse_topology``) is ``bert_jax.planner``.
"""
from __future__ import annotations

import json
import os
import sys

import jax
from absl import flags

from bert_jax import cli, planner

PROG = "python -m bert_jax.aot"


def _define_flags(fv) -> None:
    flags.DEFINE_string("topology", None, "TPU topology: v5e:16x16, v5p:4x4x4, v4:2x2x2, v6e:4x4, "
                        "or an accelerator type like v5litepod-256 / v5p-128", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice)", flag_values=fv)
    flags.DEFINE_float("mfu", 0.5, "model FLOPs utilisation assumed for the step time", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 30522, "vocabulary size when config.model.vocab_size is unset", flag_values=fv)
    flags.DEFINE_boolean("search_batch", False, "find the largest global batch that fits", flag_values=fv)
    flags.DEFINE_integer("search_max_compiles", 10, "compile budget of --search_batch", flag_values=fv)
    flags.DEFINE_boolean("packed", False, "plan the step on packed rows (position and packed segment ids)",
                         flag_values=fv)
    flags.DEFINE_string("json", None, "also write the result(s) as JSON to this file", flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    fv = cli.parse_config(argv, _define_flags, __doc__, prog=PROG, config_help="pretraining config file (configs/*.py)")
    if not fv.topology:
        cli.usage_error(PROG, "--topology is required")
    # Compile-only: the host's own backend is the CPU even where libtpu is installed.
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    try:
        topology = planner.parse_topology(fv.topology, fv.num_slices)
        kwargs = dict(mfu=fv.mfu, vocab_size=fv.vocab_size, packed=fv.packed)
        if fv.search_batch:
            print(f"searching the largest global batch that fits on {topology}:", flush=True)
            best, results = planner.search_batch(fv.config, topology, max_compiles=fv.search_max_compiles, **kwargs)
            if best is None:
                print(f"no batch fits (smallest tried: {min(p.global_batch_size for p in results)})")
            else:
                print(f"\nlargest batch that fits: {best.global_batch_size}\n{best.report()}")
        else:
            results = [planner.plan(fv.config, topology, **kwargs)]
            print(results[0].report())
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=2)
    return 0 if fv.search_batch or results[-1].fits else 1


if __name__ == "__main__":
    sys.exit(main())
