"""Adapters that vLLM is given as `s3://` URLs: fetched into this host's cache, held there
while loaded.

The gateway publishes compiled artifacts to object storage and passes their URL as the
`lora_path`; no directory is shared with it. Each worker fetches an artifact once into the
host's content-addressed cache (`adapters.tree_cache`, shared by every worker and process on
the host, verified by hash) and holds it while the adapter is in its LoRA manager, so the
cache evicts only what no worker has loaded.
"""

from __future__ import annotations

from functools import cache

from adapters.tree_cache import CachedTree, TreeCache, cache_from_env

SCHEME = "s3://"


def is_remote(lora_path: str) -> bool:
    return lora_path.startswith(SCHEME)


@cache
def _tree_cache() -> TreeCache:
    """From `DORA_GATEWAY_CACHE_DIR` / `DORA_GATEWAY_CACHE_MAX_BYTES`, once per process."""
    return cache_from_env()


class HeldTrees:
    """The cached trees one worker's LoRA manager holds, by LoRA id."""

    def __init__(self) -> None:
        self._held: dict[int, CachedTree] = {}

    def fetch(self, lora_id: int, url: str) -> str:
        """The local directory of `url`, held for `lora_id` (replacing what it held)."""
        tree = _tree_cache().open(url)
        self._release(lora_id)
        self._held[lora_id] = tree
        return str(tree.path)

    def release_all_but(self, loaded: set[int]) -> None:
        """Let the cache evict the trees of adapters the manager no longer has."""
        for lora_id in set(self._held) - loaded:
            self._release(lora_id)

    def _release(self, lora_id: int) -> None:
        tree = self._held.pop(lora_id, None)
        if tree is not None:
            tree.release()
