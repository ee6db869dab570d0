"""Independent reference (oracle) implementation of StreamingLLM on a Hugging Face Llama model.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks") keeps, for
every layer and head, the keys/values of the first ``S`` tokens of the stream (the attention
sinks) plus the ``W`` most recent tokens, and evicts everything in between.  Positions are
counted *inside the cache*: keys are cached before RoPE, and at every step the kept keys, in
cache order (sinks first, then the window in stream order), are rotated with positions
``0, 1, ..., n-1`` while the query gets position ``n-1`` (``n`` = number of kept tokens).

Exact semantics implemented here.  For a stream ``x_0 .. x_{T-1}``, the output at query index
``p`` is computed with every layer / head attending to exactly the tokens::

    {0 .. min(S, p+1)-1}  U  {max(S, p-W+1) .. p}

in that order, with RoPE positions ``0 .. n-1`` for the keys and ``n-1`` for the query.  The
cached key/value of a token are the ones computed when that token was itself the query (they are
never recomputed), so in layers >= 1 they carry the policy that was in force at that earlier step.
While ``p < S + W`` nothing has been evicted and positions equal the true positions, so the
result equals the ordinary full-attention model.

This module deliberately does not use vLLM or any other part of ``vllm_kvstream``; it only runs
the model's own submodules by hand (embedding, per layer RMSNorm / q,k,v projections / RoPE via
``model.model.rotary_emb`` and ``apply_rotary_pos_emb`` / GQA ``repeat_kv`` / softmax attention
with scale ``head_dim**-0.5`` / o_proj / MLP, final norm, lm_head), attending one query at a
time, so that it can serve as an oracle. Public functions:

* :func:`streaming_logprobs` -- the oracle (layer-by-layer evaluation order, see its docstring);
* :func:`streaming_logprobs_stepwise` -- the literal token-by-token stream with an evicting
  cache (slow; identical results, used to cross-check);
* :func:`full_logprobs` -- the model's ordinary forward, for comparison;
* :func:`streaming_perplexity` -- ``exp`` of the mean streaming NLL;
* :func:`kept_token_indices` -- the visible set of one query, in cache order.

Only the plain Llama architecture is supported (default-style RoPE, no q/k norms, no
model-level sliding window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

__all__ = [
    "full_logprobs",
    "kept_token_indices",
    "streaming_logprobs",
    "streaming_logprobs_stepwise",
    "streaming_perplexity",
]


def kept_token_indices(p: int, *, sink_tokens: int, window_tokens: int) -> list[int]:
    """Stream indices visible to the query at index ``p``, in cache order (sinks, then window)."""
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    sinks = range(min(sink_tokens, p + 1))
    window = range(max(sink_tokens, p - window_tokens + 1), p + 1)
    return [*sinks, *window]


def _check_args(token_ids: Sequence[int], sink_tokens: int, window_tokens: int) -> list[int]:
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 1:
        raise ValueError(f"window_tokens must be an int >= 1, got {window_tokens!r}")
    return [int(t) for t in token_ids]


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    weight = model.model.embed_tokens.weight
    return weight.device, weight.dtype


def _decoder_layers(model) -> list:
    layers = list(model.model.layers[: model.config.num_hidden_layers])
    for layer in layers:
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise NotImplementedError("q/k norms are not supported by this Llama reference")
    return layers


class _RopeTables:
    """``rotary_emb`` cos/sin for cache positions ``0 .. n-1``, computed once per distinct ``n``."""

    def __init__(self, rotary_emb, like: torch.Tensor) -> None:
        self._rotary_emb = rotary_emb
        self._like = like
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._tables:
            position_ids = torch.arange(n, device=self._like.device).unsqueeze(0)
            self._tables[n] = self._rotary_emb(self._like, position_ids=position_ids)  # [1, n, D]
        return self._tables[n]


def _attend_one_query(
    attn,
    q: torch.Tensor,
    k_kept: torch.Tensor,
    v_kept: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Attention of a single query over the kept cache entries, with cache-relative RoPE.

    ``q``: ``[1, H, 1, D]`` pre-RoPE query; ``k_kept`` / ``v_kept``: ``[1, Hkv, n, D]`` pre-RoPE
    keys and values in cache order; ``cos`` / ``sin``: ``[1, n, D]`` for positions ``0 .. n-1``.
    Keys get positions ``0 .. n-1`` and the query gets ``n-1``. Returns ``[1, 1, H*D]``.
    """
    n = k_kept.shape[2]
    head_dim = attn.head_dim
    # apply_rotary_pos_emb applies one cos/sin table to both of its arguments, so the query
    # (position n-1) and the keys (positions 0..n-1) are rotated in separate calls.
    q_rot, _ = apply_rotary_pos_emb(q, q, cos[:, n - 1 : n], sin[:, n - 1 : n])
    k_rot, _ = apply_rotary_pos_emb(k_kept, k_kept, cos, sin)
    n_rep = q.shape[1] // k_kept.shape[1]
    k_rep = repeat_kv(k_rot, n_rep)
    v_rep = repeat_kv(v_kept, n_rep)
    scores = torch.matmul(q_rot, k_rep.transpose(2, 3)) * (head_dim**-0.5)  # [1, H, 1, n]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    ctx = torch.matmul(probs, v_rep)  # [1, H, 1, D]
    return ctx.transpose(1, 2).reshape(1, 1, -1)


def _logprobs_from_hidden(model, hidden: torch.Tensor, out: torch.Tensor, rows: slice) -> None:
    logits = model.lm_head(model.model.norm(hidden))
    out[rows] = torch.log_softmax(logits.float(), dim=-1).reshape(-1, out.shape[1]).cpu()


def full_logprobs(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Ordinary full-attention forward of ``model`` over the whole sequence.

    Returns a float32 CPU tensor ``[T, vocab]`` of next-token log-probabilities.
    """
    ids = [int(t) for t in token_ids]
    device, _ = _model_device_dtype(model)
    if not ids:
        return torch.empty(0, model.config.vocab_size, dtype=torch.float32)
    with torch.inference_mode():
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def streaming_logprobs(
    model,
    token_ids: Sequence[int],
    *,
    sink_tokens: int,
    window_tokens: int,
) -> torch.Tensor:
    """StreamingLLM next-token log-probabilities (one query at a time, layer by layer).

    Args:
        model: a ``transformers`` ``LlamaForCausalLM`` (already loaded; computation happens in
            the model's own dtype and on its device).
        token_ids: the token stream ``x_0 .. x_{T-1}``.
        sink_tokens: ``S``, number of initial tokens that are never evicted (may be 0).
        window_tokens: ``W``, number of most recent tokens kept, including the query itself.

    Returns:
        float32 CPU tensor ``[T, vocab]``; row ``p`` is the log-softmax distribution of token
        ``p+1`` given the stream up to ``p`` under the StreamingLLM policy.

    Evaluation order: layer by layer, and inside a layer query by query. This computes exactly
    what the literal token-by-token stream (:func:`streaming_logprobs_stepwise`) computes: the
    cached pre-RoPE K/V of token ``q`` in layer ``l`` is a function of ``q``'s layer-``l``
    input only, and that input was produced by ``q``'s own step (it is never recomputed when
    later tokens arrive), so it can be computed for all tokens at once. What differs per query
    -- which cache entries are visible and their RoPE positions -- is applied per query, exactly
    as in the stream. Only the projections/MLP are batched over tokens, which makes the oracle
    fast enough for ~1000 tokens on a 135M model on CPU. It issues many tiny ops: on a small or
    busy CPU, ``torch.set_num_threads(1)`` in the caller can make it far faster.
    """
    ids = _check_args(token_ids, sink_tokens, window_tokens)
    S, W = sink_tokens, window_tokens
    T = len(ids)
    layers = _decoder_layers(model)
    device, _ = _model_device_dtype(model)
    out = torch.empty(T, model.config.vocab_size, dtype=torch.float32)
    if T == 0:
        return out
    inner = model.model

    with torch.inference_mode():
        hidden = inner.embed_tokens(torch.tensor([ids], dtype=torch.long, device=device))  # [1,T,h]
        rope = _RopeTables(inner.rotary_emb, hidden)
        # Visible set of query p: sinks [0, sink_end) and window [win_start, p] (cache order).
        spans = [(min(S, p + 1), max(S, p - W + 1)) for p in range(T)]

        for layer in layers:
            attn = layer.self_attn
            head_dim = attn.head_dim
            residual = hidden
            x = layer.input_layernorm(hidden)
            # Pre-RoPE q/k/v of every token at this layer: [1, heads, T, D].
            q = attn.q_proj(x).view(1, T, -1, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, T, -1, head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, T, -1, head_dim).transpose(1, 2)

            ctx = torch.empty(1, T, q.shape[1] * head_dim, dtype=x.dtype, device=device)
            for p, (sink_end, win_start) in enumerate(spans):
                k_kept = torch.cat([k[:, :, :sink_end], k[:, :, win_start : p + 1]], dim=2)
                v_kept = torch.cat([v[:, :, :sink_end], v[:, :, win_start : p + 1]], dim=2)
                cos, sin = rope(k_kept.shape[2])
                q_p = q[:, :, p : p + 1]
                ctx[:, p : p + 1] = _attend_one_query(attn, q_p, k_kept, v_kept, cos, sin)

            hidden = residual + attn.o_proj(ctx)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        chunk = 256  # bound the size of the [rows, vocab] logits buffer
        for start in range(0, T, chunk):
            rows = slice(start, min(T, start + chunk))
            _logprobs_from_hidden(model, hidden[:, rows], out, rows)
    return out


def streaming_logprobs_stepwise(
    model,
    token_ids: Sequence[int],
    *,
    sink_tokens: int,
    window_tokens: int,
) -> torch.Tensor:
    """Literal token-by-token StreamingLLM with an explicit evicting pre-RoPE K/V cache.

    Same result as :func:`streaming_logprobs` (same arguments and return value); this version
    runs the whole model once per incoming token, appends the token's K/V to each layer's cache,
    evicts the token that leaves the window, and attends over what is left. It is the most
    direct transcription of the algorithm, used to cross-check the faster evaluation order, but
    it is memory-bandwidth bound (one matrix-vector product per weight per token).
    """
    ids = _check_args(token_ids, sink_tokens, window_tokens)
    S, W = sink_tokens, window_tokens
    T = len(ids)
    layers = _decoder_layers(model)
    device, _ = _model_device_dtype(model)
    out = torch.empty(T, model.config.vocab_size, dtype=torch.float32)
    if T == 0:
        return out
    inner = model.model

    # Per-layer cache of pre-RoPE keys / values, shape [1, num_kv_heads, n, head_dim], kept in
    # cache order (sinks first, then the window in stream order).
    k_cache: list[torch.Tensor | None] = [None] * len(layers)
    v_cache: list[torch.Tensor | None] = [None] * len(layers)
    cached_token_idx: list[int] = []  # stream index held by every cache slot (same in all layers)

    with torch.inference_mode():
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        rope = None
        for p in range(T):
            # Append token p; once the cache exceeds S + W entries it holds the S sinks followed
            # by tokens p-W .. p, so the token leaving the window (p-W) sits in slot S.
            cached_token_idx.append(p)
            evict_slot = None
            if len(cached_token_idx) > S + W:
                evict_slot = S
                del cached_token_idx[evict_slot]
            expected = kept_token_indices(p, sink_tokens=S, window_tokens=W)
            if cached_token_idx != expected:  # pragma: no cover - internal invariant
                raise AssertionError(f"step {p}: cache {cached_token_idx} != expected {expected}")

            hidden = inner.embed_tokens(ids_t[p : p + 1]).view(1, 1, -1)  # [1, 1, hidden]
            if rope is None:
                rope = _RopeTables(inner.rotary_emb, hidden)
            cos, sin = rope(len(cached_token_idx))

            for li, layer in enumerate(layers):
                attn = layer.self_attn
                head_dim = attn.head_dim
                residual = hidden
                x = layer.input_layernorm(hidden)
                q = attn.q_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)  # [1, H, 1, D]
                k_new = attn.k_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)  # [1, Hkv, 1, D]
                v_new = attn.v_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)

                if k_cache[li] is None:
                    k_all, v_all = k_new, v_new
                else:
                    k_all = torch.cat([k_cache[li], k_new], dim=2)
                    v_all = torch.cat([v_cache[li], v_new], dim=2)
                if evict_slot is not None:
                    e = evict_slot
                    k_all = torch.cat([k_all[:, :, :e], k_all[:, :, e + 1 :]], dim=2)
                    v_all = torch.cat([v_all[:, :, :e], v_all[:, :, e + 1 :]], dim=2)
                k_cache[li], v_cache[li] = k_all, v_all  # stays pre-RoPE

                ctx = _attend_one_query(attn, q, k_all, v_all, cos, sin)
                hidden = residual + attn.o_proj(ctx)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

            _logprobs_from_hidden(model, hidden, out, slice(p, p + 1))
    return out


def streaming_perplexity(
    model,
    token_ids: Sequence[int],
    *,
    sink_tokens: int,
    window_tokens: int,
) -> float:
    """``exp`` of the mean NLL of tokens ``1 .. T-1`` under :func:`streaming_logprobs`."""
    ids = _check_args(token_ids, sink_tokens, window_tokens)
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to compute a perplexity")
    lp = streaming_logprobs(model, ids, sink_tokens=sink_tokens, window_tokens=window_tokens)
    targets = torch.tensor(ids[1:], dtype=torch.long)
    nll = -lp[:-1].gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(math.exp(nll.double().mean().item()))
