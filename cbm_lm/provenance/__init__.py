"""Chunk provenance (DESIGN.md section 7): key store, concept x source mass, index, queries,
and the reference methods (BM25, projected gradients) they are measured against."""
