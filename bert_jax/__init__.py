"""bert_jax: pretrain and fine-tune BERT on JAX device meshes."""
