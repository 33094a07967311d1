"""Prompt encoding for SD3-style pipelines: CLIP-L + CLIP-G + T5, as DiffusionKit combines them.

Takes DiffusionKit encoders and tokenizers (real or tiny), gives per prompt the pair
[prompt, empty negative] as `cs (2, L, D)` and `cs_pooled (2, Dp)`. The arithmetic follows
`DiffusionPipeline.encode_text` (hidden_states[-2] of both CLIPs, zero-padded to T5's width,
T5 tokens appended), so the tiny model exercises exactly the real code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from diffusionkit.mlx.t5 import TransformerEncoder


class SafeT5Stack(TransformerEncoder):
    """DiffusionKit's T5 encoder stack without its two traps, evaluated a piece at a time.

    In low_memory_mode it clears its layers after the first call, so every later prompt gets a
    wrong embedding, silently; and it calls `mx.metal.set_memory_limit(...)`, which fails off
    Metal. Same arithmetic, neither side effect. (Swapped in by class, weights untouched.)

    Why the evaluation points: the residual stream is float32 from the first layer on, so each
    of the MLP's three matmuls casts its float16 weight to float32 (168 MB for T5-XXL, plus a
    transposed copy), and MLX keeps such temporaries until the device has run them. Queued
    whole, the 24 layers held 2.2 GB of them on an H100; one layer at a time still held one
    layer's 1.0 GB (encode peak 13.1 GB against 11.2 GB of encoders, over a 16 GB Mac's 12).
    Evaluating after the attention and after each matmul holds one weight's cast at a time.
    `run_layer` is `TransformerEncoderLayer.__call__` and `DenseActivation.__call__` op for op;
    evaluation points change no result.
    """

    def __call__(self, x: mx.array) -> mx.array:
        t = x.dtype
        pos_bias = self.relative_attention_bias(x.shape[1], x.shape[1])
        mx.eval(pos_bias)
        for layer in self.layers:
            x = self.run_layer(layer, x, pos_bias)
        return self.ln(x).astype(t)

    @staticmethod
    def run_layer(layer: Any, x: mx.array, mask: mx.array) -> mx.array:
        """One encoder layer, evaluated after its attention and after each MLP matmul."""
        y = layer.ln1(x).astype(layer.ln1.weight.dtype)
        y, _ = layer.attention(y, y, y, mask=mask)
        x = x + y.astype(mx.float32)
        mx.eval(x)
        y = layer.ln2(x)
        mlp = layer.dense
        if mlp.gated:
            h = mlp.act(mlp.wi_0(y))
            mx.eval(h)
            h = h * mlp.wi_1(y)
        else:
            h = mlp.act(mlp.wi(y))
        mx.eval(h)
        x = x + mlp.wo(h)
        mx.eval(x)
        return x


def make_t5_safe(t5_encoder: Any) -> Any:
    """Give an SD3T5Encoder the safe stack (in place) and return it."""
    t5_encoder.encoder.__class__ = SafeT5Stack
    return t5_encoder


def _tokenize(tokenizer: Any, text: str, negative_text: str = "") -> mx.array:
    """[text, negative] token ids, padded like DiffusionPipeline._tokenize."""
    pad_token = tokenizer.eos_token if tokenizer.pad_with_eos else 0
    tokens = [tokenizer.tokenize(text), tokenizer.tokenize(negative_text)]
    if tokenizer.pad_to_max_length:
        tokens[0].extend([pad_token] * (tokenizer.max_length - len(tokens[0])))
    n = max(len(t) for t in tokens)
    return mx.array([t + [pad_token] * (n - len(t)) for t in tokens])


@dataclass
class TextEncoders:
    """The three encoders and their tokenizers; `token_dim` is T5's width (4096 for SD3)."""

    clip_l: Any
    tokenizer_l: Any
    clip_g: Any
    tokenizer_g: Any
    t5: Any
    t5_tokenizer: Any
    token_dim: int

    def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One prompt -> (cs (2, L, D), cs_pooled (2, Dp)) float32, index 1 = empty negative."""
        out_l = self.clip_l(_tokenize(self.tokenizer_l, text))
        out_g = self.clip_g(_tokenize(self.tokenizer_g, text))
        cond = mx.concatenate([out_l.hidden_states[-2], out_g.hidden_states[-2]], axis=-1)
        pooled = mx.concatenate([out_l.pooled_output, out_g.pooled_output], axis=-1)
        pad = mx.zeros((cond.shape[0], cond.shape[1], self.token_dim - cond.shape[2]), cond.dtype)
        cond = mx.concatenate([cond, pad], axis=-1)
        mx.eval(cond, pooled)  # the CLIPs' temporaries go before T5's arrive
        t5 = self.t5(_tokenize(self.t5_tokenizer, text))
        cond = mx.concatenate([cond, t5.astype(cond.dtype)], axis=1)
        mx.eval(cond, pooled)
        return np.array(cond.astype(mx.float32)), np.array(pooled.astype(mx.float32))

    def encode(self, prompts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """All prompts -> cs (P, 2, L, D), cs_pooled (P, 2, Dp), each prompt encoded on its own
        with every layer intact (a batched encode would pad T5 differently)."""
        pairs = [self.encode_one(p) for p in prompts]
        return np.stack([c for c, _ in pairs]), np.stack([p for _, p in pairs])
