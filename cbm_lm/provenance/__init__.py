"""Chunk provenance (DESIGN.md section 7): key store, concept x source mass, index, queries,
and the BM25 baseline they are measured against."""
