"""Data layer: labelled text -> ArrayRecord corpus (Beam) -> grain training batches.

Modules, in the order the data flows:
    inputs, labelers, wordnet       read and label documents (JSONL, Parquet atlas, seqio)
    tokenizer, concepts, chunking   tokenize, resolve concept names, chunk
    records, shards                 the document record and shard writer
    corpus_build, corpus_finalize   the Beam pipeline and manifest (tools/build_corpus.py)
    corpus, source                  reading a built corpus
    pieces, pipeline                the grain pipeline (``pipeline.make_pipeline``)
    planted_facts, demo_sources, demo_corpus   the embedded default corpus (CORPUS.md)
"""
