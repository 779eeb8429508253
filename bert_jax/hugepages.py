"""`python -m bert_jax.hugepages`: whether the bert_jax entry points run with transparent huge
pages for malloc, and why (see bert_jax/_hugepages.py)."""
import sys

from bert_jax import _hugepages

if __name__ == "__main__":
    print(_hugepages.status())
    sys.exit(0)
