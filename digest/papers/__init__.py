"""Collecting papers: the Hugging Face Daily Papers client, tolerant parsing, storage, embeddings.

Owns the papers, paper_embeddings and topic_embeddings tables; ships the model and sample days.
"""
