"""Trains a byte-level BPE tokenizer (specials pad, bos, endofchunk, mask at V-4..V-1).

    python tools/train_tokenizer.py --input 'data/*.jsonl' --vocab_size 4096 --out runs/tok

Inputs are JSONL files (their "text" field) or plain .txt files (whole file).
Only JSONL documents that build_corpus puts in the training split are read:
pass it the same --heldout_fraction.
Writes <out>/tokenizer.json. To use a tiktoken ranks file instead (e.g. the
cl100k_base file Steerling uses), pass it directly to build_corpus --tokenizer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cbm_lm.data import inputs  # noqa: E402
from cbm_lm.data import tokenizer as tokenizer_lib  # noqa: E402
from cbm_lm.data.corpus_build import BuildConfig, check_bpe_flags, expand  # noqa: E402
from cbm_lm.data.errors import DataError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="file/glob; repeatable")
    ap.add_argument("--vocab_size", type=int, required=True)
    ap.add_argument("--min_frequency", type=int, default=2)
    ap.add_argument("--max_bytes", type=int, default=0, help="stop reading after this many UTF-8 bytes of text (0 = no limit)")
    ap.add_argument("--heldout_fraction", type=float, default=BuildConfig.heldout_fraction,
                    help="build_corpus's --heldout_fraction: those documents are not read")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        check_bpe_flags(args.vocab_size, args.heldout_fraction)   # before reading any input
        texts = inputs.training_texts(expand(args.input), args.heldout_fraction, args.max_bytes)
        tok = tokenizer_lib.train_bpe(texts, args.vocab_size, args.min_frequency)
        path = tok.save(args.out)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"file": str(path), "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                      "bos_id": tok.bos_id, "endofchunk_id": tok.endofchunk_id,
                      "mask_id": tok.mask_id}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
