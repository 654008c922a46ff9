"""Data: readers for text and labeled files, corpus -> token shards, batching."""
