"""Static KV slots: the whole KV cache allocated once, one row (slot) per running request, written in place.

Per layer, ``keys`` and ``values`` are ``[slots, kv_heads, max_len + 1, head_dim]``. A request owns one slot
from its join to its leave; its token at position ``p`` has its keys and values in column ``p`` of its
row. Nothing is copied when a request joins or leaves (a prefix reused from :class:`~.reuse.PrefixStore`
copies into the joiner's row only). Column ``max_len`` is scratch: rows that take part in a forward without a
token of their own (padding) write there.

The model writes through :class:`SlotView`, the object passed as its cache: transformers' attention layers
call ``cache.update(keys [R, H, q, D], values, layer_idx, ...)`` and attend over what it returns. The view
knows which slot rows the forward's ``R`` rows are (a slice: the returned tensors are views, no copy; or an
index tensor for a gather) and, for each query, the column it writes (``write_index [R, q]``).
"""

from __future__ import annotations

import torch

__all__ = ["KVSlots", "SlotView"]


class KVSlots:
    """The preallocated cache: ``[layers] x [slots, kv_heads, max_len + 1, head_dim]`` keys and values."""

    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len, self.scratch = slots, max_len, max_len
        #: Bytes one token's keys and values take in all layers (one column of a slot).
        self.bytes_per_token = self.nbytes // (slots * (max_len + 1))
        self._free = list(range(slots))
        #: Slots never handed out again: their columns could not be cleared after a failed request (a device error)
        self.retired: set[int] = set()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def bytes_needed(*, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, dtype) -> int:
        return 2 * layers * slots * kv_heads * (max_len + 1) * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot (so the running rows stay packed at the front and decode over few rows)."""
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def retire(self, slot: int) -> None:
        """Take *slot* out of use for good (it is neither free nor released again)."""
        self.retired.add(slot)

    @property
    def usable(self) -> int:
        """Slots not retired: free or held by a request."""
        return self.slots - len(self.retired)

    def view(self, rows: slice | torch.Tensor, write_index: torch.Tensor, kv_len: int) -> SlotView:
        return SlotView(self, rows, write_index, kv_len)

    def clear(self, slot: int, n: int) -> None:
        """Zero *slot*'s first *n* columns (and its scratch column) in every layer."""
        n = min(n, self.max_len)
        with torch.inference_mode():  # slots allocated under inference mode can only be written under it
            for tensor in self.keys + self.values:
                tensor[slot, :, :n].zero_()
                tensor[slot, :, self.scratch].zero_()

    def copy_in(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write a cached prefix (per layer ``[kv_heads, n, head_dim]``) into *slot*'s first ``n`` columns."""
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            n = k.shape[1]
            self.keys[layer][slot, :, :n].copy_(k)
            self.values[layer][slot, :, :n].copy_(v)

    def copy_out(self, slot: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first *n* columns of *slot*, per layer (copies, for :class:`PrefixStore`)."""
        return ([k[slot, :, :n].clone() for k in self.keys], [v[slot, :, :n].clone() for v in self.values])


class SlotView:
    """The cache object one forward sees (transformers' ``Cache`` protocol, the part attention uses)."""

    is_compileable = False

    def __init__(self, slots: KVSlots, rows: slice | torch.Tensor, write_index: torch.Tensor, kv_len: int) -> None:
        self.slots, self.rows, self.write_index, self.kv_len = slots, rows, write_index, kv_len
        if isinstance(rows, slice):
            self._row_index = torch.arange(rows.start, rows.stop, device=write_index.device)[:, None]
        else:
            self._row_index = rows[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``[R, H, q, D]`` keys/values at ``write_index`` of their rows; the rows' first ``kv_len`` columns."""
        keys, values = self.slots.keys[layer_idx], self.slots.values[layer_idx]
        index = (self._row_index, slice(None), self.write_index)  # -> [R, q, H, D]
        keys[index] = key_states.transpose(1, 2).to(keys.dtype)
        values[index] = value_states.transpose(1, 2).to(values.dtype)
        return keys[self.rows, :, : self.kv_len], values[self.rows, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def __len__(self) -> int:
        return len(self.slots.keys)
