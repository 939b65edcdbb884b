"""clipforge.eval: retrieval Recall@K, zero-shot classification, index quality, reports."""
