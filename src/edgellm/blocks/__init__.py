"""Content-addressed parameter blocks: model variants as manifests of blocks, a node's store under a byte budget.

A model variant (a base model, a fine-tune that froze its bottom layers, a LoRA adapter) is a `Manifest`: a list
of blocks, each named by the SHA-256 of its bytes. A block two variants share (a base model's layer under every
LoRA fine-tune of it) is stored, fetched and counted once per store (`BlockStore`); blocks arrive from a peer or
the origin and are refused unless their bytes hash to their name (`fetch_blocks`). docs/CACHING.md.
"""

from edgellm.blocks.manifest import BlockRef, Manifest
from edgellm.blocks.store import BlockStore

__all__ = ["BlockRef", "BlockStore", "Manifest"]
