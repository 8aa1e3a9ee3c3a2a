"""Evaluation: STS, BEIR retrieval with FAISS, image-text recall, speed, hub data sets, model specs,
the suite behind eval.py, and the end-of-run report."""
