"""bert_jax: pretrain and fine-tune BERT on JAX device meshes."""
from bert_jax import _hugepages

_hugepages.reexec_entry_point()  # `python -m bert_jax.ENTRY`: once, with huge pages for malloc
