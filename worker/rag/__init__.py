"""Retrieval: chunking, embeddings, the vector index, groundedness, and the search server."""
