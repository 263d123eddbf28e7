"""A small Qwen2-shaped causal LM for CPU tests of ckv.hf without transformers.

It has what ckv.hf relies on in transformers' Qwen2 — per layer q/k/v projections
with biases, rotate-half RoPE at position_ids, GQA, and attention through
``ckv.hf.attention(module, q, k, v, mask, scaling=...)`` with module.layer_idx and
module.num_key_value_groups — and the forward signature ckv.hf calls (input_ids,
position_ids, use_cache, past_key_values, logits_to_keep; .logits and
.past_key_values on the output). ``ckv_attention = True`` tells ckv.hf.install
that no registration is needed. Not a product path: tests only.
"""

from types import SimpleNamespace

import torch
from torch import nn

import ckv.hf as ckvhf


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


class _Attn(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        hd, qh, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, qh * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * hd, bias=True)
        self.o_proj = nn.Linear(qh * hd, cfg.hidden_size, bias=False)
        self.theta = cfg.rope_theta

    def forward(self, x, pos, past):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        fr = pos[0].float()[:, None] * inv[None]
        emb = torch.cat([fr, fr], -1)
        cos, sin = emb.cos().to(x.dtype)[None, None], emb.sin().to(x.dtype)[None, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:
            if self.layer_idx < len(past):
                pk, pv = past[self.layer_idx]
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
                past[self.layer_idx] = (k, v)
            else:
                past.append((k, v))
        out, _ = ckvhf.attention(self, q, k, v, None, scaling=self.scaling)
        return self.o_proj(out.reshape(B, S, -1))


class _RMS(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype)


class _Layer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.self_attn = _Attn(cfg, i)
        self.n1, self.n2 = _RMS(cfg.hidden_size), _RMS(cfg.hidden_size)
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, pos, past):
        x = x + self.self_attn(self.n1(x), pos, past)
        h = self.n2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyQwen(nn.Module):
    ckv_attention = True

    def __init__(self, layers=3, hidden=64, heads=4, kv_heads=2, vocab=97, seed=0,
                 name="test/tiny-qwen", rope_theta=10000.0):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=hidden // heads, intermediate_size=2 * hidden,
                                      vocab_size=vocab, _name_or_path=name,
                                      rope_theta=rope_theta, layer_types=None)
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([_Layer(self.config, i) for i in range(layers)])
        self.norm = _RMS(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))

    def forward(self, input_ids, position_ids=None, use_cache=False, past_key_values=None,
                logits_to_keep=0, **kw):
        S = input_ids.shape[1]
        past = past_key_values if past_key_values is not None else ([] if use_cache else None)
        start = len(past) and past[0][0].shape[2] if past else 0
        pos = position_ids if position_ids is not None else torch.arange(start, start + S)[None]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, pos, past)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.lm_head(x), past_key_values=past)
