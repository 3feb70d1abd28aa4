"""A lean greedy decode loop for Llama-family causal LMs (Llama, Mistral, Qwen2 and their kin, e.g. SmolLM2).

A decode step of a small model spends much of its time outside the linears: a 30-layer Llama of SmolLM2's shape
but with 64-wide layers takes 4.6 ms a token through transformers' forward on one thread, all of it dispatch and
Python (about 60 operator calls a layer). :class:`LeanDecoder` runs the same computation as transformers'
``LlamaDecoderLayer`` with about half the calls: one fused RMS norm, rotary embedding as one multiply-add on a
rolled copy, the KV cache preallocated and written in place, one ``scaled_dot_product_attention`` with grouped
query heads (on the CPU in float32 whatever the model's dtype, with a float32 cache: torch's bfloat16 attention
for one query is several times slower there), and each linear called directly (a
:class:`~secateurs.runtime.modules.SparseLinear`, grouped with the linears that share its input or not, or a plain
``nn.Linear``). The model's own modules are used for the
embedding, the rotary frequencies (so every RoPE scaling transformers knows is honoured) and the LM head.

Results equal transformers' to rounding (the norm and the attention sum in another order), so greedy tokens
match on the tested models; ``secateurs bench --decoder lean`` times dense and sparse models through this loop
alike. Batch size one; a model of another family, with a sliding attention window shorter than the sequence,
or with an activation other than SiLU is refused with one line saying why (:func:`why_not`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.errors import SecateursError
from secateurs.runtime import kernels

FAMILIES = ("llama", "mistral", "qwen2")


def why_not(model: nn.Module) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (one line), or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"the lean decoder runs {', '.join(FAMILIES)} models, not {kind or type(model).__name__}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the lean decoder needs SiLU gating, not {config.hidden_act}"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"the model has no model.{name}: not the Llama layout the lean decoder runs"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            return f"layer {i} lacks one of q/k/v/o_proj or gate/up/down_proj"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if norm is None or not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
                return f"layer {i}'s norms are not RMS norms with a weight"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return f"layer {i} normalises its queries and keys (not a Llama attention)"
    return None


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or (config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False)):
        return None
    return int(window)


class LeanDecoder:
    """Greedy decoding of one sequence of a Llama-family model, with its own preallocated KV cache.

    ``decoder = LeanDecoder(model)``; ``decoder.generate(ids, new_tokens)`` returns the new tokens
    ``[1, new_tokens]``; ``prefill(ids)`` and ``step(token)`` return the last position's float32 logits ``[1, vocab]``
    and advance the cache, for callers that time the steps apart. ``max_len`` bounds prompt plus new tokens
    (default: the model's ``max_position_embeddings``; the cache is allocated for it on first use).
    """

    def __init__(self, model: nn.Module, max_len: int | None = None):
        reason = why_not(model)
        if reason:
            raise SecateursError(reason)
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm
        self.head = model.get_output_embeddings()
        self.window = _sliding_window(config)
        self.max_len = int(max_len or getattr(config, "max_position_embeddings", 4096))
        if self.window is not None:
            self.max_len = min(self.max_len, self.window)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads)
            scaling = getattr(attn, "scaling", head_dim**-0.5)
            self.layers.append(
                (
                    layer.input_layernorm,
                    attn.q_proj.forward,
                    attn.k_proj.forward,
                    attn.v_proj.forward,
                    attn.o_proj.forward,
                    layer.post_attention_layernorm,
                    mlp.gate_proj.forward,
                    mlp.up_proj.forward,
                    mlp.down_proj.forward,
                    head_dim,
                    scaling,
                )
            )
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.gqa = heads != self.kv_heads
        self.cache = None
        self.length = 0

    # ------------------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """transformers' Llama RMS norm: in float32, cast back, times the weight (one native call on the CPU)."""
        return kernels.rms_norm(x, norm.weight, norm.variance_epsilon)

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        self.cache = []
        for *_, head_dim, _ in self.layers:
            shape = (1, self.kv_heads, self.max_len, head_dim)
            k = torch.zeros(shape, dtype=dtype, device=device)
            self.cache.append((k, torch.zeros_like(k)))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor):
        """cos and the signed sin of the rotary embedding for ``positions`` ([1, 1, T, D]): rotate_half(q) * sin
        equals roll(q, D/2) * signed sin, one roll instead of two slices, a negation and a concatenation."""
        cos, sin = self.rotary(x, positions)
        half = cos.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(1), signed.unsqueeze(1)

    @staticmethod
    def _rotate(q: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(q * cos, torch.roll(q, q.shape[-1] // 2, -1), signed_sin)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` [1, T] from the cache's current length; the last position's logits [1, vocab]."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise SecateursError(f"the lean decoder runs one sequence ([1, T] token ids), got {tuple(ids.shape)}")
        T = ids.shape[1]
        start, end, causal = self.length, self.length + T, T > 1
        if causal and start > 0:
            raise SecateursError("the lean decoder takes the prompt in one piece, then one token at a time")
        if end > self.max_len:
            what = "its sliding window" if self.window is not None and self.max_len == self.window else "max_len"
            raise SecateursError(f"{end} tokens exceed the lean decoder's {self.max_len} ({what})")
        h = self.embed(ids)
        # attention in float32 on the CPU whatever the model's dtype: torch's CPU attention for one bfloat16 query
        # is ~5x slower than in float32 (SmolLM2's shape, 100 keys, one thread: 99 vs 17 us), and the cache is small
        adt = torch.float32 if h.device.type == "cpu" else h.dtype
        if self.cache is None or self.cache[0][0].dtype != adt:
            self._allocate(adt, h.device)
        cos, ssin = self._rope(h, torch.arange(start, end, device=ids.device).unsqueeze(0))
        for (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down, d, scaling), (kc, vc) in zip(
            self.layers, self.cache, strict=True
        ):
            x = self._norm(norm1, h)
            q, k, v = q_proj(x), k_proj(x), v_proj(x)
            if T == 1:  # [1, 1, heads * d] is [1, heads, 1, d] in memory
                q, k, v = q.view(1, -1, 1, d), k.view(1, -1, 1, d), v.view(1, -1, 1, d)
            else:
                q, k, v = (t.view(1, T, -1, d).transpose(1, 2) for t in (q, k, v))
            q, k = self._rotate(q, cos, ssin), self._rotate(k, cos, ssin)
            if q.dtype != adt:
                q = q.to(adt)
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            a = kernels.attend(q, kc, vc, end, scaling) if T == 1 else None
            if a is None:
                a = F.scaled_dot_product_attention(
                    q, kc[:, :, :end], vc[:, :, :end], is_causal=causal, scale=scaling, enable_gqa=self.gqa
                )
            a = a.view(1, 1, -1) if T == 1 else a.transpose(1, 2).reshape(1, T, -1)  # [1, heads, 1, d] in order
            h = h + o_proj(a if a.dtype == h.dtype else a.to(h.dtype))
            x = self._norm(norm2, h)
            h = h + down(F.silu(gate(x)) * up(x))
        self.length = end
        h = self._norm(self.final_norm, h[:, -1:])
        return self.head(h)[:, -1].float()  # float32 logits, as transformers' generate takes them

    # ------------------------------------------------------------------------------------------------ API
    def reset(self) -> None:
        """Forget the sequence (the cache memory is kept for the next)."""
        self.length = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence with the prompt ``ids`` [1, T]; the logits after its last token."""
        self.reset()
        return self._forward(ids)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One more token ([1, 1]); the logits after it."""
        return self._forward(token)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Exactly ``new_tokens`` greedy tokens after ``ids`` [1, T] (the new ones only, [1, new_tokens])."""
        if new_tokens < 1:
            raise SecateursError(f"new_tokens must be at least 1, got {new_tokens}")
        return lean_loop_seconds(self, ids, new_tokens)[1]


def lean_loop_seconds(decoder: LeanDecoder, ids: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decoding through ``decoder``, as :func:`secateurs.runtime.timing.decode_loop` does it: (seconds of the
    ``tokens - 1`` steps after the prefill, the ``tokens`` new tokens [1, tokens])."""
    with torch.inference_mode():
        token = decoder.prefill(ids).argmax(-1, keepdim=True)
        new = [token]
        start = time.perf_counter()
        for _ in range(tokens - 1):
            token = decoder.step(token).argmax(-1, keepdim=True)
            new.append(token)
        return time.perf_counter() - start, torch.cat(new, 1)
