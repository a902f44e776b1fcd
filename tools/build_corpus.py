"""Builds a labelled ArrayRecord corpus with Apache Beam (DESIGN.md section 4).

    python tools/build_corpus.py --out runs/corpus --jsonl 'data/*.jsonl' \
        --vocab_size 4096 --labelers imported,lexicon:lexicon.tsv [beam options...]

Inputs: ``--jsonl`` files/globs/directories (local or gs://), ``--atlas`` a
concept-atlas Parquet directory, ``--seqio_task`` a registered seqio Task or
Mixture (needs the optional ``seqio`` extra). Any argument not listed here is
a Beam pipeline option (``--runner``, ``--direct_num_workers``, ...);
DirectRunner is the default. Exit status 1 with a one-line error naming the
file and line on bad input, unless ``--skip_bad_records``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cbm_lm.data.corpus_build import (BuildConfig, build_corpus,  # noqa: E402
                                     check_config, check_out_dir, unknown_pipeline_args)
from cbm_lm.data.errors import DataError  # noqa: E402


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (local or gs://)")
    ap.add_argument("--jsonl", action="append", default=[], help="JSONL file/glob/dir; repeatable")
    ap.add_argument("--atlas", help="concept-atlas Parquet directory")
    ap.add_argument("--seqio_task", help="registered seqio Task/Mixture name (optional extra)")
    ap.add_argument("--seqio_split", default="train")
    ap.add_argument("--seqio_max_examples", type=int, default=0)
    ap.add_argument("--tokenizer", help="tokenizer.json, tiktoken ranks file, or directory")
    ap.add_argument("--vocab_size", type=int, default=0, help="train a byte-level BPE of this size")
    ap.add_argument("--concepts", help="fixed concept vocabulary (concepts.json or list)")
    ap.add_argument("--max_concepts", type=int, default=0, help="fail if more concepts (n_known)")
    ap.add_argument("--labelers", type=_csv, default=["imported"],
                    help="comma list: imported, metadata:F=P;..., lexicon:PATH")
    ap.add_argument("--max_chunk_tokens", type=int, default=128)
    ap.add_argument("--max_chunk_concepts", type=int, default=8)
    ap.add_argument("--num_shards", type=int, default=8)
    ap.add_argument("--heldout_shards", type=int, default=1)
    ap.add_argument("--heldout_fraction", type=float, default=0.02)
    ap.add_argument("--skip_bad_records", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args, beam_args = ap.parse_known_args(argv)
    unknown = unknown_pipeline_args(beam_args)
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)} (neither this tool's flags nor "
                 f"Beam pipeline options)")
    return args, beam_args


def main(argv=None) -> int:
    args, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    # metadata specs use ';' between fields on the command line (',' splits labelers)
    labelers = [s.replace(";", ",") for s in args.labelers]
    cfg = BuildConfig(
        out=args.out, jsonl=list(args.jsonl), atlas=args.atlas, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, concepts=args.concepts, max_concepts=args.max_concepts,
        labelers=labelers, max_chunk_tokens=args.max_chunk_tokens,
        max_chunk_concepts=args.max_chunk_concepts, num_shards=args.num_shards,
        heldout_shards=args.heldout_shards, heldout_fraction=args.heldout_fraction,
        skip_bad_records=args.skip_bad_records, overwrite=args.overwrite)
    try:
        check_config(cfg)          # before the seqio dump writes anything
        check_out_dir(cfg.out, cfg.overwrite)   # and before it reads a whole task
    except (ValueError, FileExistsError) as e:
        print(f"build_corpus: {e}", file=sys.stderr)
        return 2
    try:
        if args.seqio_task:
            from cbm_lm.data.seqio_input import seqio_to_jsonl
            cfg.jsonl.append(seqio_to_jsonl(args.seqio_task, args.seqio_split, args.out,
                                            args.seqio_max_examples))
        m = build_corpus(cfg, beam_args)
    except DataError as e:
        print(f"build_corpus: bad input: {e}", file=sys.stderr)
        return 1
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as e:
        print(f"build_corpus: error: {e}", file=sys.stderr)
        return 1
    summary = {k: m[k] for k in ("num_concepts", "num_sources", "content_hash")}
    summary["splits"] = {s: {k: v[k] for k in ("records", "tokens", "chunks")}
                         for s, v in m["splits"].items()}
    print(json.dumps(summary, indent=1))
    if m["bad_records"]["count"]:
        print(f"skipped {m['bad_records']['count']} bad records; first:", file=sys.stderr)
        for msg in m["bad_records"]["examples"][:10]:
            print("  " + msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
