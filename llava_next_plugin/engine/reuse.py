"""What one request leaves for the next: images' vision features and prompt prefixes' KV, both LRU and bounded in
bytes, and the keys they are found by.

An image is known by a hash of its preprocessed pixels and size (:func:`image_key`), so the same picture sent
twice, by the same user or another, runs the vision tower once. A prompt is known by its token ids with each
image's placeholder tokens standing for that image's key (:func:`prefix_key`): a follow-up turn about the same
image starts with the first turn's key, and reuses its KV up to where they part. Reuse never changes results:
the features and KV are the ones the first request computed, with the same weights (when the weights change as
torch records it, :func:`weights_version`, the engine empties both before its next join; ``Engine.clear_reuse``
after changes it cannot see).
"""

from __future__ import annotations

import collections
import hashlib
import threading

import torch

__all__ = ["FeatureCache", "PrefixStore", "image_key", "prefix_key", "weights_version"]


def image_key(pixel_values: torch.Tensor, image_size) -> bytes:
    """A content hash of one preprocessed image (its pixels and original size): the vision-feature cache key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(int(v) for v in image_size)).encode())
    digest.update(pixel_values.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.digest()


def weights_version(model: torch.nn.Module) -> int:
    """A number that changes whenever *model*'s weights do in a way torch records: a parameter written in place
    (an optimizer step, ``load_state_dict``, ``copy_``), replaced (a new tensor, an adapter loaded) or moved, and
    a peft adapter switched, disabled or merged. Not seen: writes through ``parameter.data`` (torch keeps no count
    of them): call :meth:`~llava_next_plugin.engine.Engine.clear_reuse` after those. Parameters offloaded to the
    ``meta`` device (accelerate brings a fresh copy in for each forward) are left out.

    Asked once per join, not per step: ~0.2 ms for the ~700 parameters of a 7B LLaVA-NeXT (the modules are walked
    directly: ``parameters()`` builds every name, 2.5x slower)."""
    parts: list[tuple] = []
    stack = [model]
    while stack:
        module = stack.pop()
        state = module.__dict__
        if "merged_adapters" in state:  # a peft tuner layer: which adapters it runs, and which it merged in
            adapters = (
                state.get("_disable_adapters"),
                repr(state.get("_active_adapter")),
                repr(state["merged_adapters"]),
            )
            parts.append((id(module), *adapters))
        for parameter in module._parameters.values():
            if parameter is None or parameter.device.type == "meta":
                continue
            try:
                version = parameter._version
            except RuntimeError:  # made under inference_mode: no version counter (and nothing writes it in place)
                version = -1
            parts.append((id(parameter), version, parameter.data_ptr()))
        stack.extend(child for child in module._modules.values() if child is not None)
    return hash(tuple(parts))


def prefix_key(input_ids: torch.Tensor, images: list[tuple[bytes, int]], image_token_id: int) -> tuple:
    """The prompt's ids with each image's ``<image>`` tokens replaced by a number standing for its content (the
    first 8 bytes of its :func:`image_key`, as a negative number: never a token id).

    *images*: each image's key and token count, in prompt order. The images' tokens are assigned by count, not by
    runs: two images whose placeholders touch (``<image><image>``) make one run of tokens.
    """
    ids = input_ids.reshape(-1).tolist()
    where = [i for i, token in enumerate(ids) if token == image_token_id]
    if sum(count for _, count in images) != len(where):
        raise ValueError(f"the prompt has {len(where)} <image> tokens but its images count {[c for _, c in images]}")
    positions = iter(where)
    for key, count in images:
        mark = -1 - int.from_bytes(key[:8], "little")
        for _ in range(count):
            ids[next(positions)] = mark
    return tuple(ids)


class FeatureCache:
    """Vision features of images already seen, by content hash (:func:`image_key`); LRU, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        if features.untyped_storage().nbytes() > size:  # a view into a batch's features: keep (and count) its own
            features = features.clone()
        self._entries[key] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


class PrefixStore:
    """Cached prompt prefixes' KV (per layer ``[kv_heads, n, head_dim]``), keyed by their token ids; LRU, bounded
    in bytes. A joiner whose prompt starts with a stored prefix copies it into its slot and prefills the rest."""

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def longest(self, key: tuple) -> tuple[int, list[torch.Tensor], list[torch.Tensor]] | None:
        """The longest stored prefix of *key* (``(length, keys, values)``), or ``None``.

        A stored prompt that *key* is itself a prefix of counts too, cut to ``len(key)``: the same prompt sent
        again (a retry, the same question from another user) asks for its own key less the last token, which
        is a prefix of the stored one.
        """
        best: tuple[int, tuple] | None = None
        with self._lock:
            for stored in self._entries:
                n = min(len(stored), len(key))
                if (best is None or n > best[0]) and key[:n] == stored[:n]:
                    best = (n, stored)
            if best is None or best[0] < self.min_tokens:
                return None
            n, stored = best
            self._entries.move_to_end(stored)
            keys, values, _ = self._entries[stored]
            if n < len(stored):
                keys, values = [k[:, :n] for k in keys], [v[:, :n] for v in values]
            return n, keys, values

    def would_keep(self, tokens: int, size: int) -> bool:
        """Whether a prompt of *tokens* tokens whose KV takes *size* bytes is worth copying out (:meth:`put`
        keeps it): long enough to be reused, and no larger than the whole store."""
        return tokens >= self.min_tokens and size <= self.max_bytes

    def put(self, key: tuple, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in keys + values)
        if not self.would_keep(len(key), size):
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = (keys, values, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
