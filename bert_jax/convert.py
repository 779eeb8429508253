r"""Convert BERT weights between formats.

    python -m bert_jax.convert --src PATH [--src_format {auto,hf,tf,npz,orbax}] \
        --dst PATH --dst_format {npz,hf,orbax} [--tokenizer PATH]

Sources: a Hugging Face directory (hf), Google's TF release (tf), an .npz (npz), a bert_jax
workdir or step directory (orbax); local paths or URIs. Destinations: npz, hf, or a params-only
Orbax checkpoint that fine-tuning reads. The formats: bert_jax/weights/, one module each. The
tokenizer beside the source (or --tokenizer) must match the checkpoint's vocabulary and ships
with the export. A destination file that exists already is an error unless --overwrite
(which replaces only the files this export writes). Exit codes: 0 written, 2 bad input
(one line on stderr).
"""
from __future__ import annotations

import logging
import sys

from absl import flags

from bert_jax import cli, weights
from bert_jax import params as params_lib


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("src", None, "checkpoint to read (path or URI)", flag_values=fv)
    flags.DEFINE_enum("src_format", "auto", ("auto", *weights.FORMATS_IN), "format of --src", flag_values=fv)
    flags.DEFINE_string("dst", None, "where to write (a directory; for npz also a .npz file)", flag_values=fv)
    flags.DEFINE_enum("dst_format", None, weights.FORMATS_OUT, "format to write", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir/file to ship with the export "
                        "(default: the one beside the source)", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "replace the files of an earlier export at --dst (only those: other "
                         "files there are kept)", flag_values=fv)
    flags.mark_flags_as_required(["src", "dst", "dst_format"], flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    fv = cli.parse(argv, define_flags, __doc__, prog="python -m bert_jax.convert")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every read at INFO
    cfg, params, report = weights.load_pretrained(fv.src, fv.src_format)
    found = weights.tokenizer_for(fv.src, cfg, fv.tokenizer)
    out = weights.save(cfg, params, fv.dst, fv.dst_format, tokenizer_dir=found and found[1],
                       overwrite=fv.overwrite, labels=report["labels"])
    print(f"wrote {fv.dst_format} to {out}: {params_lib.count(params):,} parameters"
          + (f"; initialised fresh: {report['initialised']}" if report["initialised"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
