"""The latent cache of multi-head latent attention: `c_kv` and `k_pe` rows side by side in one growing buffer.

transformers' `DynamicCache` concatenates the whole cache with the new rows at every step, so a decode step copies
everything it has cached (most of a long-context step). `LatentCacheLayer` keeps the rows of a layer in one
preallocated buffer `[batch, 1, capacity, kv_lora_rank + qk_rope_head_dim]` and writes new rows in place; when full it
grows by half (rounded up to whole chunks), so each row is copied a bounded number of times over a whole generation,
and not at all when `generate` sizes it for the final length up front. `keys` and `values` are views of the buffer
(`c_kv` and `k_pe`, the same tensors a `DynamicCache` holds), and `latent` is the joint view the absorbed decode
step reads with one matrix product.

For the weighted sum over `c_kv`, oneDNN's CPU matmul needs `c_kv` feature-major, which the row buffer is not: on
first use (`sealed_columns`, asked for only by fp32 and bf16 CPU inference) the layer keeps a transposed copy of
every whole block of `BLOCK` rows, transposing each block once when it fills. The rows after the last whole block
stay in the row buffer only. This mirror costs up to 89% more cache memory (512 of every 576 values again) where it
is used.

After `prepack_cpu_weights`, both products read their whole blocks from copies in oneDNN's packed weight layout
instead (`packed_blocks`), packed once per block like the mirror: the rows for the scores and their `c_kv` transposed
for the weighted sum, up to 189% more cache memory. They are kept beside the layer in `PACKED_BLOCKS`, since those
opaque tensors cannot be deep-copied (a copied cache packs its own).

Model-code sibling: imported by the modeling file, depends only on torch and transformers.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

CHUNK = 256  # rows: the buffer's capacity is always a whole number of chunks
BLOCK = 2048  # rows per transposed or packed block of the mirrors (larger blocks: fewer, more efficient products)


class LatentCacheLayer(DynamicLayer):
    """One layer's `c_kv` (key slot) and `k_pe` (value slot), stored contiguously per row in a buffer that grows
    geometrically; cropping, beam reordering and batch selection act on the buffer without losing its spare room."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.buffer: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None  # [batch, blocks, r, BLOCK]: c_kv of whole blocks, transposed
        self.sealed = 0  # leading blocks of `columns` that hold the current rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_dim = key_states.shape[-1]
        batch_size, num_heads = key_states.shape[:2]
        width = self.key_dim + value_states.shape[-1]
        self.buffer = key_states.new_empty(batch_size, num_heads, _chunks(self.capacity), width)
        self.length = 0
        PACKED_BLOCKS.pop(self, None)
        self._refresh_views()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows after the cached ones (growing the buffer if full); returns all `c_kv`, `k_pe` rows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.buffer.shape[-2]:
            self._grow(end)
        self.buffer[..., self.length : end, : self.key_dim] = key_states
        self.buffer[..., self.length : end, self.key_dim :] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    @property
    def latent(self) -> torch.Tensor:
        """The cached rows `[c_kv | k_pe]`, [batch, cached tokens, kv_lora_rank + qk_rope_head_dim] (a view)."""
        return self.buffer[:, 0, : self.length]

    @property
    def chunked_latent(self) -> torch.Tensor:
        """`latent` and the buffer's rows after it up to the next whole chunk (stale or unset values), for products
        that keep only the first `length` result rows: their shape changes once a chunk rather than every step."""
        return self.buffer[:, 0, : _chunks(self.length)]

    def sealed_columns(self) -> torch.Tensor:
        """`c_kv` of the first `length // BLOCK` whole blocks of rows, each transposed: [batch, blocks, r, BLOCK].

        Blocks completed since the last call are transposed now (each block once, unless cropped into)."""
        whole = self.length // BLOCK
        if self.columns is None or self.columns.shape[1] < whole:
            room = max(whole, self.buffer.shape[-2] // BLOCK)
            columns = self.buffer.new_empty(self.buffer.shape[0], room, self.key_dim, BLOCK)
            if self.columns is not None:
                columns[:, : self.sealed] = self.columns[:, : self.sealed]
            self.columns = columns
        for block in range(self.sealed, whole):
            rows = self.buffer[:, 0, block * BLOCK : (block + 1) * BLOCK, : self.key_dim]
            self.columns[:, block] = rows.transpose(1, 2)
        self.sealed = whole
        return self.columns[:, :whole]

    def packed_blocks(self, kind: str, rows_per_call: int) -> list[list[torch.Tensor]]:
        """Per sequence, the first `length // BLOCK` whole blocks of rows, each packed as the weight of a oneDNN linear
        for `rows_per_call` input rows (what oneDNN picks its layout for): `"rows"`, the rows `[c_kv | k_pe]` (for the
        scores), or `"columns"`, their `c_kv` transposed (for the weighted sum). Blocks completed since the last call
        are packed now (each block once, unless cropped into)."""
        whole = self.length // BLOCK
        kinds = PACKED_BLOCKS.get(self)
        if kinds is None:
            kinds = PACKED_BLOCKS[self] = {}
        if kind not in kinds:
            kinds[kind] = [[] for _ in range(self.buffer.shape[0])]
        packed = kinds[kind]
        for sequence, blocks in enumerate(packed):
            for block in range(len(blocks), whole):
                rows = self.buffer[sequence, 0, block * BLOCK : (block + 1) * BLOCK]
                weight = rows if kind == "rows" else rows[:, : self.key_dim].t()
                blocks.append(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_per_call))
        return packed

    def _grow(self, needed: int) -> None:
        """Move into a buffer half as large again (at least `needed` rows): amortised O(1) copies per row."""
        old = self.buffer
        self.buffer = old.new_empty(*old.shape[:2], _chunks(max(needed, old.shape[-2] * 3 // 2)), old.shape[-1])
        self.buffer[..., : self.length, :] = old[..., : self.length, :]

    def _refresh_views(self) -> None:
        self.keys = self.buffer[..., : self.length, : self.key_dim]
        self.values = self.buffer[..., : self.length, self.key_dim :]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.buffer, self.length, self.columns, self.sealed = None, 0, None, 0
        PACKED_BLOCKS.pop(self, None)
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` rows (a negative count, as for `DynamicLayer`); the room stays."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self.sealed = min(self.sealed, self.length // BLOCK)
            for packed in PACKED_BLOCKS.get(self, {}).values():
                for blocks in packed:
                    del blocks[self.length // BLOCK :]
            self._refresh_views()

    def _select(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffer = self.buffer[rows.to(self.buffer.device)]
            if self.columns is not None:  # only the sealed blocks: the rest is room
                self.columns = self.columns[rows.to(self.columns.device), : self.sealed]
            if (kinds := PACKED_BLOCKS.get(self)) is not None:
                order = rows.tolist()
                PACKED_BLOCKS[self] = {kind: [list(packed[row]) for row in order] for kind, packed in kinds.items()}
            self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.buffer.shape[0]).repeat_interleave(repeats))

    def offload(self) -> None:
        PACKED_BLOCKS.pop(self, None)
        if self.is_initialized:
            self.buffer = self.buffer.to("cpu", non_blocking=True)
            self.columns = None if self.columns is None else self.columns.to("cpu", non_blocking=True)
            self._refresh_views()

    def prefetch(self) -> None:
        if self.is_initialized and self.buffer.device != self.device:
            self.buffer = self.buffer.to(self.device, non_blocking=True)
            self.columns = None if self.columns is None else self.columns.to(self.device, non_blocking=True)
            self._refresh_views()


# Each layer's `packed_blocks`, by kind, per sequence. Kept beside the layers, not in them, like the packed weights of
# `prepack_cpu_weights`: deep copies of a cache (a prompt cache reused) copy everything else and pack their own.
PACKED_BLOCKS: weakref.WeakKeyDictionary[LatentCacheLayer, dict[str, list[list[torch.Tensor]]]] = (
    weakref.WeakKeyDictionary()
)


def _chunks(rows: int) -> int:
    return max(1, -(-rows // CHUNK)) * CHUNK


class LatentCache(DynamicCache):
    """A `DynamicCache` of `LatentCacheLayer`s (one per layer index used, MTP depths included), each sized for
    `capacity` tokens up front (`generate` passes its final length) and growing past it when needed."""

    def __init__(self, capacity: int = 0) -> None:
        super(DynamicCache, self).__init__(layer_class_to_replicate=partial(LatentCacheLayer, capacity=capacity))
