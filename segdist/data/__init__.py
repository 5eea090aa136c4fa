"""Data: dataset sources, shard writing and streaming, paired transforms."""
