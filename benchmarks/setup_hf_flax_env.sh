#!/usr/bin/env bash
# Benchmark-only environment with Hugging Face's FlaxBertForPreTraining
# (transformers 4.57.6, the last release with Flax models). Not a project
# dependency: it lives under .cache/bench-venv and reuses the project's
# jax/flax/optax through a .pth file, so both sides run the same JAX build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
VENV="$ROOT/.cache/bench-venv"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')" 2>/dev/null; then
  echo "$VENV ready"; exit 0
fi
"$MAIN_PY" -m venv "$VENV"
MAIN_SITE="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BENCH_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Appended after the venv's own site-packages: transformers 4.57.6 installed here wins over 5.x.
echo "$MAIN_SITE" > "$BENCH_SITE/zz_bert_jax_main_venv.pth"
PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.cache/pip}" "$VENV/bin/pip" install -q \
  "transformers==4.57.6" "huggingface-hub<1.0"
"$VENV/bin/python" -c "import transformers, jax, flax; from transformers import FlaxBertForPreTraining; print('transformers', transformers.__version__, 'jax', jax.__version__, 'flax', flax.__version__)"
