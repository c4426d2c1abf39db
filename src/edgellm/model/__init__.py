"""Model math: architectures, stages, KV caches, masks and sampling. No files, sockets or printing here."""
