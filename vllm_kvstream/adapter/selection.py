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
  The scheduler's frees follow from token counts alone, so the worker recomputes them.
* **Tensor parallelism: one decision on every rank.** A rank holds some of a layer's heads,
  so its scores are partial; every score is summed over the tensor-parallel ranks before
  the selection uses it (``adapter/tensor_parallel.py``: an all-gather, summed in rank order,
  bit-equal on every rank), so every rank keeps the blocks TP=1 keeps. Scored per rank, the
  ranks kept different blocks and the output moved far from TP=1's (measured, see there).
  The exchange is between workers only; the scheduler still never sees a score.
* **Identity.** A request is recognised by the physical id of its first block, which the
  sink rule never frees and prefix caching (off for these policies, see ``engine_args``)
  cannot share. A step starting at position 0 (a new request, or one preempted and
  recomputed) starts a fresh selection. A finished request's selection stays until its first
  block starts another request, so the store never holds more selections than the pool has
  blocks (a few KB each: block indices and scores per layer).
* **Decisions at block boundaries.** Prefill chunks run in tiles that end at block
  boundaries; the selection is brought back to budget before each tile, so a long prompt is
  compressed as it streams in, and chunk size does not change which blocks are kept.
* **Inside the budget, stock attention and deferred scores.** Until a request's first
  eviction its selection is every block, in place, at its own position: exactly what vLLM's
  stock kernel reads. A step whose requests are all steady decodes inside their budget
  (:meth:`SelectionStore.reads_in_place`) therefore runs the stock C++ kernel for its
  output, and the store only records each layer's query (:meth:`SelectionStore.record`).
  Scores are needed only where the selection can change (block boundaries), so the recorded
  queries are scored together, as one causal chunk, just before: at the request's next
  general step, or when :data:`MASS_BATCH` wait. The mass is the same sum with the same
  decay weights as scoring each query in its own step (H2O counts every query); only the
  float summation order differs. Short streams, and every stream's first ``budget`` tokens,
  then pay one small batched score per :data:`MASS_BATCH` steps instead of a torch attention
  per step.

Nothing here imports vLLM (but ``tensor_parallel.tp_rank_sum``, which looks up vLLM's group
once): it works on tensors and lists the attention backend passes in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from vllm_kvstream.adapter import trace
from vllm_kvstream.adapter.tensor_parallel import RankSum, tp_rank_sum
from vllm_kvstream.kernels import (
    Rope,
    block_key_norms,
    selected_attention,
    plan_selected_decode,
    selected_decode_cpu,
    split_cpu_kv_cache,
)
from vllm_kvstream.kernels.topk_attention import evicted_after
from vllm_kvstream.policies import BlockSelection, TopKImportancePolicy
from vllm_kvstream.policies.base import cdiv

#: Recorded queries (per request and layer) scored together at the latest: bounds what a
#: request waiting inside its budget holds (``MASS_BATCH x heads x head_size`` floats a layer).
MASS_BATCH = 16
_PLAN_IDS = itertools.count()


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


def select_requests(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int
) -> list[SelectRequest]:
    """A step's requests as the store takes them (CPU tensors: ``query_start_loc`` ``[R + 1]``,
    ``seq_lens`` ``[R]``, ``block_table`` rows ``[R, ...]``)."""
    qsl = query_start_loc.tolist()
    return [
        SelectRequest(q_start=qsl[i], q_end=qsl[i + 1], seq_len=L, row=tuple(block_table[i, : cdiv(L, block_size)].tolist()))
        for i, L in enumerate(seq_lens.tolist())
    ]


@dataclass
class LayerSelection:
    selection: BlockSelection
    #: Contents living outside their own block: logical block -> physical block.
    moved: dict[int, int] = field(default_factory=dict)
    #: Steady decode: physical blocks and shifts of ``selection.kept``; dropped whenever the
    #: slow path runs (it may change the kept set or move contents).
    plan: tuple | None = None
    #: Queries run by the stock kernel and not scored yet (``attention`` score): each a
    #: ``(queries of a step, row)`` pair, at consecutive positions ending at
    #: ``selection.num_tokens``.
    pending: list[tuple[torch.Tensor, int]] = field(default_factory=list)

    def location(self, logical: int, row: tuple[int, ...]) -> int:
        return self.moved.get(logical, row[logical])

    #: Serial of ``plan`` (a new one each time it is rebuilt): the batched path's cache of
    #: the stacked plans of a step's requests is keyed by these.
    plan_id: int = -1

    def decode_plan(self, row: tuple[int, ...], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.plan is None:
            kept = self.selection.kept
            phys = torch.tensor([self.location(lb, row) for lb in kept])
            self.plan = (phys, evicted_after(torch.tensor(kept)) * block_size)
            self.plan_id = next(_PLAN_IDS)
        return self.plan


@dataclass
class RequestSelection:
    layers: dict[str, LayerSelection] = field(default_factory=dict)
    #: This step is a steady decode step (set by :meth:`SelectionStore.begin_step`).
    steady: bool = False
    #: ... and every layer still keeps every block in place (nothing evicted yet).
    in_place: bool = False


class SelectionStore:
    """The selections of every live request in this worker, for one KV-cache group."""

    def __init__(self, policy: TopKImportancePolicy, block_size: int, *, batch_decode: bool = True,
                 rank_sum: RankSum | None | str = "tp") -> None:
        self.policy = policy
        self.block_size = block_size
        #: Scores summed over the tensor-parallel ranks before any decision (``tensor_parallel.py``);
        #: ``"tp"``: vLLM's tensor-parallel group where it has several ranks, else None.
        self.rank_sum = tp_rank_sum() if rank_sum == "tp" else rank_sum
        self.requests: dict[int, RequestSelection] = {}
        self.block_copies = 0
        #: Run steady decode steps of all requests as one batch (:meth:`_decode_steady`);
        #: False runs every request through the general path (the tests' oracle).
        self.batch_decode = batch_decode
        #: Request-layers run by the batched steady path (tests check it is taken).
        self.steady_steps = 0
        #: Request-layers whose output the stock kernel computed (:meth:`record`).
        self.recorded_steps = 0
        self._plan_key: tuple | None = None
        self._plan = None
        #: Per layer: the stacked ``(blocks, shift, cos_sin)`` of the last steady batch, keyed
        #: by its requests' plan serials (they change only when a selection does).
        self._stacked: dict[str, tuple] = {}

    def _is_steady(self, req: SelectRequest) -> bool:
        """A decode step at ``a = seq_len - 1`` after which nothing but scores changes: no block
        starts or fills, the scheduler holds and frees the same blocks at ``a`` and ``a + 1``.
        Then the layer's selection, settled at ``a`` by the previous step, needs no eviction,
        scoring or copy, and only attention and the mass remain."""
        if not self.batch_decode or req.q_end - req.q_start != 1:
            return False
        a, bs, policy = req.first_pos, self.block_size, self.policy
        return (
            a % bs != 0
            and (a + 1) % bs != 0
            and policy.held_blocks(a, bs) == policy.held_blocks(a + 1, bs)
            and policy.freeable_block_range(a, bs) == policy.freeable_block_range(a + 1, bs)
        )

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
            state = self.requests[key]
            state.steady = self._is_steady(req)
            bs = self.block_size
            state.in_place = state.steady and all(
                len(layer.selection.kept) == cdiv(layer.selection.num_tokens, bs) for layer in state.layers.values()
            )
            bound.append((req, state))
        if trace.ENABLED:  # VLLM_KVSTREAM_TRACE_DIR (adapter/trace.py)
            trace.selection_step(self.policy.name, bound)
        return bound

    def reads_in_place(self, step: list[tuple[SelectRequest, RequestSelection]]) -> bool:
        """Every request of the step is a steady decode that has evicted nothing: its output is
        plain causal attention over its own block table row (the stock kernel's), and only
        :meth:`record` remains for the store."""
        return self.batch_decode and bool(step) and all(state.in_place and state.layers for _, state in step)

    def record(self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor,
               step: list[tuple[SelectRequest, RequestSelection]], *, scale: float, rope: Rope | None) -> None:
        """A :meth:`reads_in_place` step of one layer, its output already computed: extend each
        selection by the step's token and keep the query for the next scoring (scoring the
        kept ones first once :data:`MASS_BATCH` wait)."""
        attention = self.policy.config.score == "attention"
        queries = query.index_select(0, torch.tensor([req.q_start for req, _ in step])) if attention else None
        self.recorded_steps += len(step)
        for i, (req, state) in enumerate(step):
            layer = state.layers[layer_name]
            sel = layer.selection
            self._check_start(layer_name, layer, req)
            if attention:
                if len(layer.pending) >= MASS_BATCH:
                    self.score_pending(layer, req, kv_cache, scale=scale, rope=rope)
                layer.pending.append((queries, i))
            sel.extend(req.seq_len)

    def _check_start(self, layer_name: str, layer: LayerSelection, req: SelectRequest) -> None:
        """The layer's selection holds exactly the tokens before the step's first query."""
        if layer.selection.num_tokens != req.first_pos:
            raise RuntimeError(
                f"vllm-kvstream: {self.policy.name} selection of layer {layer_name} holds "
                f"{layer.selection.num_tokens} tokens but the step starts at {req.first_pos}"
            )

    def score_pending(self, layer: LayerSelection, req: SelectRequest, kv_cache: torch.Tensor, *, scale: float,
                      rope: Rope | None) -> None:
        """Score the recorded queries of one request and layer, as one causal chunk of queries
        ending at the selection's last token (the order and decay of one query a step)."""
        if not layer.pending:
            return
        sel = layer.selection
        queries = torch.stack([q[i] for q, i in layer.pending])
        k = queries.shape[0]
        layer.pending = []
        kept = sel.kept
        mass = self._selected_attention(
            queries, kv_cache, self._read_ids([layer.location(lb, req.row) for lb in kept]), torch.tensor(kept),
            num_tokens=sel.num_tokens, first_pos=sel.num_tokens - k, scale=scale, rope=rope,
            decay=self.policy.config.decay, out=torch.empty_like(queries),
        )
        sel.add_mass(dict(zip(kept, self._over_ranks(mass).tolist())), queries=k)

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
        key_cache = None  # the general path's view of the keys, made when first needed
        steady = []
        for req, state in step:
            layer = state.layers.get(layer_name)
            if layer is None:
                layer = state.layers[layer_name] = LayerSelection(BlockSelection(self.policy, self.block_size))
            self._check_start(layer_name, layer, req)
            self.score_pending(layer, req, kv_cache, scale=scale, rope=rope)  # older queries count first
            if state.steady:
                steady.append((req, layer))
                continue
            layer.plan = None
            if key_cache is None:
                key_cache = self._key_view(kv_cache)
            self._attend(layer, req, query, kv_cache, key_cache, scale=scale, rope=rope, out=out)
            self._score_complete(layer, req, key_cache, req.seq_len)
            layer.selection.evict(req.seq_len)
            self._relocate(layer, req, kv_cache)
        if steady:
            self._decode_steady(layer_name, steady, query, kv_cache, scale=scale, rope=rope, out=out)

    def _over_ranks(self, mass: torch.Tensor) -> torch.Tensor:
        """Attention mass of this rank's heads -> of every head (one decision on every rank)."""
        return mass if self.rank_sum is None else self.rank_sum(mass)

    # Hooks over the cache layout (vLLM's CPU layout here; quantized pages in
    # ``quant_attention.QuantSelectionStore``): the keys for norms, the ids attention reads,
    # and attention over kept blocks.
    def _key_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return split_cpu_kv_cache(kv_cache)[0]

    def _read_ids(self, physical: list[int]) -> torch.Tensor:
        return torch.tensor(physical)

    def _selected_attention(self, query, kv_cache, blocks, logical, **kwargs) -> torch.Tensor:
        return selected_attention(query, kv_cache, blocks, logical, **kwargs)

    def _decode_steady(self, layer_name, steady, query, kv_cache, *, scale, rope, out) -> None:
        """Steady decode steps (:meth:`_is_steady`) of every request at once: one batched
        attention over each request's kept blocks, then the mass into each selection."""
        bs = self.block_size
        self.steady_steps += len(steady)
        plans = [layer.decode_plan(req.row, bs) for req, layer in steady]
        counts = tuple(len(layer.selection.kept) for _, layer in steady)
        tails = tuple(req.seq_len - layer.selection.kept[-1] * bs for req, layer in steady)
        rows = tuple(req.q_start for req, _ in steady)
        width = max(counts)
        key = (rows, counts, tails)
        if self._plan_key != key:  # once per step: every layer keeps as many blocks
            self._plan_key = key
            self._plan = plan_selected_decode(
                torch.tensor(rows), torch.tensor(counts), torch.tensor(tails), width=width, block_size=bs
            )
        serials = (rows, tuple(layer.plan_id for _, layer in steady))
        cached = self._stacked.get(layer_name)
        if cached is not None and cached[0] == serials:
            blocks, shift, cos_sin = cached[1:]
        else:
            blocks, shift, cos_sin = self._stack(plans, counts, width, rope)
            self._stacked[layer_name] = (serials, blocks, shift, cos_sin)
        mass = selected_decode_cpu(
            query, kv_cache, self._plan, blocks, shift, scale=scale, rope=rope, out=out, shift_cos_sin=cos_sin
        )
        masses = self._over_ranks(mass).tolist() if self.policy.config.score == "attention" else None
        for i, (req, layer) in enumerate(steady):
            sel = layer.selection
            if masses is not None:
                sel.add_mass(dict(zip(sel.kept, masses[i])), queries=1)
            sel.extend(req.seq_len)

    @staticmethod
    def _stack(plans, counts, width, rope):
        """The step's per-request plans as ``[B, M]`` blocks and shifts, padded where requests
        keep fewer blocks (each with its first kept block, held, so finite; shift 0), and the
        query's back-rotation ``rope.cos_sin(-shift)`` as ``[B, M, rotary_dim // 2]`` each."""
        if min(counts) == width:
            blocks, shift = torch.stack([p for p, _ in plans]), torch.stack([sh for _, sh in plans])
        else:
            blocks = torch.stack([torch.cat((p, p[:1].expand(width - len(p)))) for p, _ in plans])
            shift = torch.stack([torch.cat((sh, sh.new_zeros(width - len(sh)))) for _, sh in plans])
        cos_sin = None
        if rope is not None:
            cos, sin = rope.cos_sin(-shift.reshape(-1))
            cos_sin = (cos.view(*shift.shape, -1), sin.view(*shift.shape, -1))
        return blocks, shift, cos_sin

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
            phys = self._read_ids([layer.location(lb, req.row) for lb in kept])
            lo = req.q_start + (a - req.first_pos)
            hi = lo + (b - a)
            mass = self._selected_attention(
                query[lo:hi], kv_cache, phys, torch.tensor(kept),
                num_tokens=b, first_pos=a, scale=scale, rope=rope, decay=decay, out=out[lo:hi],
            )
            if self.policy.config.score == "attention":
                sel.add_mass(dict(zip(kept, self._over_ranks(mass).tolist())), queries=b - a)
            a = b

    def _score_complete(self, layer, req, key_cache, num_tokens: int) -> None:
        """``key-norm``: score every kept block that is full and not scored yet."""
        if self.policy.config.score != "key-norm":
            return
        sel = layer.selection
        todo = [lb for lb in sel.kept if (lb + 1) * self.block_size <= num_tokens and lb not in sel.scores]
        if todo:
            norms = block_key_norms(key_cache, self._read_ids([layer.location(lb, req.row) for lb in todo]))
            if self.rank_sum is not None:  # a mean over this rank's heads: the mean over all
                norms = self.rank_sum.mean(norms)
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
