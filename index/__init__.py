"""clipforge.index: embedding export, FAISS index build/load, the searcher, the HTTP service."""
