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
the model's own submodules by hand, one query token at a time, so that it can serve as an
oracle.  Only the plain Llama architecture is supported (default-style RoPE, no q/k norms, no
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
    """StreamingLLM next-token log-probabilities, computed one query token at a time.

    Args:
        model: a ``transformers`` ``LlamaForCausalLM`` (already loaded; computation happens in
            the model's own dtype and on its device).
        token_ids: the token stream ``x_0 .. x_{T-1}``.
        sink_tokens: ``S``, number of initial tokens that are never evicted (may be 0).
        window_tokens: ``W``, number of most recent tokens kept, including the query itself.

    Returns:
        float32 CPU tensor ``[T, vocab]``; row ``p`` is the log-softmax distribution of token
        ``p+1`` given the stream up to ``p`` under the StreamingLLM policy.
    """
    ids = _check_args(token_ids, sink_tokens, window_tokens)
    S, W = sink_tokens, window_tokens
    T = len(ids)
    config = model.config
    inner = model.model
    layers = list(inner.layers[: config.num_hidden_layers])
    device, dtype = _model_device_dtype(model)

    for layer in layers:
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise NotImplementedError("q/k norms are not supported by this Llama reference")

    out = torch.empty(T, config.vocab_size, dtype=torch.float32)
    if T == 0:
        return out

    num_layers = len(layers)
    # Per-layer cache of pre-RoPE keys / values, shape [1, num_kv_heads, n, head_dim], kept in
    # cache order (sinks first, then the window in stream order).
    k_cache: list[torch.Tensor | None] = [None] * num_layers
    v_cache: list[torch.Tensor | None] = [None] * num_layers
    cached_token_idx: list[int] = []  # stream index of every cache slot (same for all layers)
    rope_by_len: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    with torch.inference_mode():
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        for p in range(T):
            # ---- cache bookkeeping for this step: append p, evict the token leaving the window.
            cached_token_idx.append(p)
            evict_slot = None
            if len(cached_token_idx) > S + W:
                # Cache holds S sinks + tokens p-W .. p; token p-W sits right after the sinks.
                evict_slot = S
                del cached_token_idx[evict_slot]
            # Cross-check against the closed-form definition of the kept set.
            expected = kept_token_indices(p, sink_tokens=S, window_tokens=W)
            if cached_token_idx != expected:  # pragma: no cover - internal invariant
                raise AssertionError(f"step {p}: cache {cached_token_idx} != expected {expected}")
            n = len(cached_token_idx)

            hidden = inner.embed_tokens(ids_t[p : p + 1]).view(1, 1, -1)  # [1, 1, hidden]

            # Positions inside the cache: keys 0..n-1, query n-1.
            if n not in rope_by_len:
                position_ids = torch.arange(n, device=device).unsqueeze(0)
                rope_by_len[n] = inner.rotary_emb(hidden, position_ids=position_ids)
            cos, sin = rope_by_len[n]  # [1, n, head_dim]
            cos_q, sin_q = cos[:, n - 1 : n], sin[:, n - 1 : n]

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
                    k_all = torch.cat([k_all[:, :, :evict_slot], k_all[:, :, evict_slot + 1 :]], dim=2)
                    v_all = torch.cat([v_all[:, :, :evict_slot], v_all[:, :, evict_slot + 1 :]], dim=2)
                k_cache[li], v_cache[li] = k_all, v_all  # still pre-RoPE

                # RoPE with cache-relative positions (the same cos/sin table is applied to both
                # arguments, so rotate query and keys in separate calls).
                q_rot, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
                k_rot, _ = apply_rotary_pos_emb(k_all, k_all, cos, sin)

                n_rep = q.shape[1] // k_all.shape[1]
                k_rep = repeat_kv(k_rot, n_rep)
                v_rep = repeat_kv(v_all, n_rep)
                scores = torch.matmul(q_rot, k_rep.transpose(2, 3)) * (head_dim**-0.5)  # [1,H,1,n]
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                ctx = torch.matmul(probs, v_rep)  # [1, H, 1, D]
                ctx = ctx.transpose(1, 2).reshape(1, 1, -1)
                hidden = residual + attn.o_proj(ctx)

                residual = hidden
                hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))

            logits = model.lm_head(inner.norm(hidden))[0, 0]
            out[p] = torch.log_softmax(logits.float(), dim=-1).cpu()
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
