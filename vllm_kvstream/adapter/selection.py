"""Worker side of policies that select blocks by score (``topk-importance``).

The path, argued:

* **Who decides.** The scores exist where attention runs: in every worker, per layer, for the
  heads that worker holds. Shipping them to the scheduler would need a new channel from every
  worker process to EngineCore and an agreement between tensor-parallel ranks. Instead the
  scheduler holds a *fixed-budget block set* per request, the same set ``streaming-sink``
  would hold (sink blocks + a window of ``budget - sink blocks`` tokens, see
  ``TopKImportancePolicy.freeable_block_range``), and frees the window's oldest block as the
  stream grows. It never needs to know what the blocks contain.
* **What survives.** The worker keeps, per request and layer, a :class:`BlockSelection`: which
  logical blocks' *content* to keep. When the scheduler is about to free a block whose
  content the selection keeps, the worker first copies that content into one of the
  request's held blocks whose content the selection evicted (:meth:`SelectionStore.run`,
  end of a step). The copy happens after the layer's attention in the step that makes the
  block freeable, so it is done before the scheduler can hand the block to anyone else. A
  block copy is ``block_size`` tokens of one layer, once per evicted block.
* **Why it holds under continuous batching and several processes.** Everything the worker
  needs arrives with the step: the block table row, the sequence length, the query count.
  The scheduler's frees follow from token counts alone, so the worker recomputes them. Each
  tensor-parallel rank keeps the best blocks *for its own heads*, with no exchange.
* **Identity.** A request is recognised by the physical id of its first block, which the
  sink rule never frees and prefix caching (off for these policies, see ``engine_args``)
  cannot share. A step starting at position 0 (a new request, or one preempted and
  recomputed) starts a fresh selection. A finished request's selection stays until its first
  block starts another request, so the store never holds more selections than the pool has
  blocks (a few KB each: block indices and scores per layer).
* **Decisions at block boundaries.** Prefill chunks run in tiles that end at block
  boundaries; the selection is brought back to budget before each tile, so a long prompt is
  compressed as it streams in, and chunk size does not change which blocks are kept.

Nothing here imports vLLM: it works on tensors and lists the attention backend passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvstream.kernels import Rope, block_key_norms, selected_attention, split_cpu_kv_cache
from vllm_kvstream.policies import BlockSelection, TopKImportancePolicy
from vllm_kvstream.policies.base import cdiv


@dataclass(frozen=True)
class SelectRequest:
    """One request's part of a step: queries ``[q_start, q_end)`` of the packed batch, at
    positions ``[seq_len - (q_end - q_start), seq_len)``; ``row`` its block table up to
    ``seq_len`` (logical block -> physical block, as the scheduler allocated them)."""

    q_start: int
    q_end: int
    seq_len: int
    row: tuple[int, ...]

    @property
    def first_pos(self) -> int:
        return self.seq_len - (self.q_end - self.q_start)


@dataclass
class LayerSelection:
    selection: BlockSelection
    #: Contents living outside their own block: logical block -> physical block.
    moved: dict[int, int] = field(default_factory=dict)

    def location(self, logical: int, row: tuple[int, ...]) -> int:
        return self.moved.get(logical, row[logical])


@dataclass
class RequestSelection:
    layers: dict[str, LayerSelection] = field(default_factory=dict)


class SelectionStore:
    """The selections of every live request in this worker, for one KV-cache group."""

    def __init__(self, policy: TopKImportancePolicy, block_size: int) -> None:
        self.policy = policy
        self.block_size = block_size
        self.requests: dict[int, RequestSelection] = {}
        self.block_copies = 0

    def begin_step(self, requests: list[SelectRequest]) -> list[tuple[SelectRequest, RequestSelection]]:
        """Bind this step's requests to their selections (a request at position 0 starts anew)."""
        bound = []
        for req in requests:
            key = req.row[0]
            if req.first_pos == 0 or key not in self.requests:
                if req.first_pos != 0:
                    raise RuntimeError(
                        f"vllm-kvstream: a {self.policy.name} request (first block {key}) resumed at "
                        f"position {req.first_pos} without a selection; this worker never saw its start"
                    )
                self.requests[key] = RequestSelection()
            bound.append((req, self.requests[key]))
        return bound

    def run(
        self,
        layer_name: str,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        step: list[tuple[SelectRequest, RequestSelection]],
        *,
        scale: float,
        rope: Rope | None,
        out: torch.Tensor,
    ) -> None:
        """Attention for every request of the step in one layer, then that layer's block copies."""
        key_cache, _ = split_cpu_kv_cache(kv_cache)
        for req, state in step:
            layer = state.layers.get(layer_name)
            if layer is None:
                layer = state.layers[layer_name] = LayerSelection(BlockSelection(self.policy, self.block_size))
            if layer.selection.num_tokens != req.first_pos:
                raise RuntimeError(
                    f"vllm-kvstream: {self.policy.name} selection of layer {layer_name} holds "
                    f"{layer.selection.num_tokens} tokens but the step starts at {req.first_pos}"
                )
            self._attend(layer, req, query, kv_cache, key_cache, scale=scale, rope=rope, out=out)
            self._score_complete(layer, req, key_cache, req.seq_len)
            layer.selection.evict(req.seq_len)
            self._relocate(layer, req, kv_cache)

    def _attend(self, layer, req, query, kv_cache, key_cache, *, scale, rope, out) -> None:
        sel, bs = layer.selection, self.block_size
        decay = self.policy.config.decay
        a = req.first_pos
        while a < req.seq_len:
            b = min(req.seq_len, (a // bs + 1) * bs)
            self._score_complete(layer, req, key_cache, a)
            sel.evict(a)
            sel.extend(b)
            kept = sel.kept
            phys = torch.tensor([layer.location(lb, req.row) for lb in kept])
            lo = req.q_start + (a - req.first_pos)
            hi = lo + (b - a)
            mass = selected_attention(
                query[lo:hi], kv_cache, phys, torch.tensor(kept),
                num_tokens=b, first_pos=a, scale=scale, rope=rope, decay=decay, out=out[lo:hi],
            )
            if self.policy.config.score == "attention":
                sel.add_mass(dict(zip(kept, mass.tolist())), queries=b - a)
            a = b

    def _score_complete(self, layer, req, key_cache, num_tokens: int) -> None:
        """``key-norm``: score every kept block that is full and not scored yet."""
        if self.policy.config.score != "key-norm":
            return
        sel = layer.selection
        todo = [lb for lb in sel.kept if (lb + 1) * self.block_size <= num_tokens and lb not in sel.scores]
        if todo:
            norms = block_key_norms(key_cache, torch.tensor([layer.location(lb, req.row) for lb in todo]))
            sel.set_scores({lb: -float(x) for lb, x in zip(todo, norms)})

    def _relocate(self, layer: LayerSelection, req: SelectRequest, kv_cache: torch.Tensor) -> None:
        """Copy kept contents out of the blocks the scheduler frees next, into held blocks whose
        content was evicted."""
        bs = self.block_size
        first, last = self.policy.freeable_block_range(req.seq_len, bs)
        held = [*req.row[:first], *req.row[last : cdiv(req.seq_len, bs)]]
        held_set = set(held)
        loc = {lb: layer.location(lb, req.row) for lb in layer.selection.kept}
        used = set(loc.values())
        free = [p for p in held if p not in used]
        need = [lb for lb, p in loc.items() if p not in held_set]
        if len(need) > len(free):
            raise RuntimeError(
                f"vllm-kvstream: {len(need)} kept blocks must move but only {len(free)} held blocks are free"
            )
        for lb, dst in zip(need, free):
            kv_cache[dst].copy_(kv_cache[loc[lb]])
            loc[lb] = dst
        self.block_copies += len(need)
        layer.moved = {lb: p for lb, p in loc.items() if p != req.row[lb]}
