"""Attention written the way model families write it: found, fused, and at parity with eager.

Each module is written from scratch in a family's style (not imported): what matters is the
graph Dynamo records, which is what the matcher sees.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfx
from flashfx import config
from flashfx.passes.pipeline import counters

B, N, C, H = 2, 24, 32, 4
HD = C // H


def _split(x, heads):  # [B, T, heads*hd] -> [B, heads, T, hd]
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _merge(y):  # [B, h, T, hd] -> [B, T, h*hd]
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


class LlamaAttention(nn.Module):
    """GQA through repeat_kv, softmax in fp32 cast back, additive causal mask passed in."""

    def __init__(self, kv_heads=2):
        super().__init__()
        self.kv_heads = kv_heads
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, kv_heads * HD, bias=False)
        self.v_proj = nn.Linear(C, kv_heads * HD, bias=False)

    @staticmethod
    def repeat_kv(x, n_rep):
        b, kvh, s, d = x.shape
        if n_rep == 1:
            return x
        return x[:, :, None, :, :].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)

    def forward(self, x, attention_mask):
        q, k, v = _split(self.q_proj(x), H), _split(self.k_proj(x), self.kv_heads), _split(self.v_proj(x), self.kv_heads)
        k, v = self.repeat_kv(k, H // self.kv_heads), self.repeat_kv(v, H // self.kv_heads)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HD)
        w = w + attention_mask[:, :, :, : k.shape[-2]]
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        return _merge(torch.matmul(w, v))


def llama_mask(x):
    t = x.shape[1]
    m = torch.full((t, t), torch.finfo(torch.float32).min, device=x.device).triu(1)
    return m[None, None].expand(x.shape[0], 1, t, t)


class BertSelfAttention(nn.Module):
    """Encoder with an additive padding mask [B, 1, 1, N] made from a 0/1 attention mask."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, pad):
        ext = (1.0 - pad[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        q, k, v = _split(self.query(x), H), _split(self.key(x), H), _split(self.value(x), H)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(HD)
        scores = scores + ext
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        return _merge(torch.matmul(probs, v))


class GPT2Attention(nn.Module):
    """HF GPT-2: a bool tril buffer sliced per length, torch.where with finfo.min, then div."""

    def __init__(self, max_pos=64):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.register_buffer("bias", torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool)).view(1, 1, max_pos, max_pos))

    def forward(self, x):
        q, k, v = (_split(t, H) for t in self.c_attn(x).split(C, dim=2))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / (v.size(-1) ** 0.5)
        ql, kl = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kl - ql : kl, :kl]
        w = torch.where(causal, w.to(w.dtype), torch.finfo(w.dtype).min)
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return _merge(torch.matmul(w, v))


class GPT2ModernAttention(nn.Module):
    """Recent HF GPT-2: scale by a 0-d tensor from torch.full, additive causal mask passed in."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)

    def forward(self, x, attention_mask):
        q, k, v = (_split(t, H) for t in self.c_attn(x).split(C, dim=2))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return _merge(torch.matmul(w, v))


class T5Attention(nn.Module):
    """No scaling; a learned relative-position bias [1, H, N, N]; softmax over scores.float()."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.rel = nn.Embedding(2 * 64, H)

    def forward(self, x):
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)[None, :] - torch.arange(t, device=x.device)[:, None] + 64
        bias = self.rel(pos).permute(2, 0, 1).unsqueeze(0).detach()  # [1, H, t, t]
        q, k, v = _split(self.q(x), H), _split(self.k(x), H), _split(self.v(x), H)
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        w = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return _merge(torch.matmul(w, v))


class Gemma2Attention(nn.Module):
    """Scale, tanh softcapping, causal mask from a boolean buffer via masked_fill."""

    def __init__(self, cap=50.0):
        super().__init__()
        self.cap = cap
        self.qkv = nn.Linear(C, 3 * C)
        self.register_buffer("causal", torch.ones(64, 64, dtype=torch.bool).triu(1))

    def forward(self, x):
        t = x.shape[1]
        q, k, v = (_split(u, H) for u in self.qkv(x).chunk(3, dim=-1))
        w = torch.matmul(q, k.transpose(2, 3)) * HD**-0.5
        w = w / self.cap
        w = torch.tanh(w)
        w = w * self.cap
        w = w.masked_fill(self.causal[:t, :t], float("-inf"))
        return _merge(torch.matmul(F.softmax(w, dim=-1), v))


class ViTSelfAttention(nn.Module):
    """Plain encoder attention, heads merged back with permute."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, H, HD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * HD**-0.5
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, t, C)


class WhisperAttention(nn.Module):
    """Query scaled before the matmul; heads folded into the batch: 3-D bmm."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C, bias=False), nn.Linear(C, C)

    def forward(self, x, enc):
        b, t, _ = x.shape
        q = self.q(x) * HD**-0.5
        q = _split(q, H).reshape(b * H, t, HD)
        k = _split(self.k(enc), H).reshape(b * H, -1, HD)
        v = _split(self.v(enc), H).reshape(b * H, -1, HD)
        w = torch.bmm(q, k.transpose(1, 2))
        w = nn.functional.softmax(w, dim=-1)
        return torch.bmm(w, v).view(b, H, t, HD).transpose(1, 2).reshape(b, t, C)


class SlidingWindowAttention(nn.Module):
    """Mistral-style sliding window from arange comparisons, filled with finfo.min."""

    def __init__(self, window=6):
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        t = x.shape[1]
        i, j = torch.arange(t, device=x.device)[:, None], torch.arange(t, device=x.device)[None, :]
        allowed = (j <= i) & (j > i - self.window)
        q, k, v = (_split(u, H) for u in self.qkv(x).chunk(3, dim=-1))
        w = q @ k.transpose(-1, -2) / math.sqrt(HD)
        w = w.masked_fill(~allowed, torch.finfo(w.dtype).min)
        return _merge(w.softmax(-1) @ v)


class MQAttention(nn.Module):
    """Multi-query: one K/V head broadcast by matmul."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * HD)

    def forward(self, x):
        q = _split(self.q(x), H)
        k, v = (u.unsqueeze(1) for u in self.kv(x).split(HD, dim=-1))  # [B, 1, T, hd]
        w = torch.softmax(q @ k.transpose(-1, -2) * HD**-0.5, dim=-1)
        return _merge(w @ v)


class CrossAttention(nn.Module):
    """Encoder-decoder cross-attention with the encoder's padding mask (bool, masked_fill)."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(C, C), nn.Linear(C, 2 * C)

    def forward(self, x, enc, enc_pad):
        q = _split(self.q(x), H)
        k, v = (_split(u, H) for u in self.kv(enc).chunk(2, dim=-1))
        w = (q @ k.transpose(-1, -2)) / math.sqrt(HD)
        w = w.masked_fill(~enc_pad[:, None, None, :], float("-inf"))
        return _merge(torch.softmax(w, dim=-1) @ v)


class SDPAEncoder(nn.Module):
    """A model that already calls SDPA, with a boolean padding mask."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x, pad):
        q, k, v = (_split(u, H) for u in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])
        return _merge(y)


class BloomStyleAttention(nn.Module):
    """ALiBi through baddbmm on [B·H, N, D], a 3-D padding mask filled with finfo.min, bmm."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])
        self.register_buffer("slopes", slopes)

    def forward(self, x, pad):
        b, t, _ = x.shape
        q, k, v = (_split(u, H).reshape(b * H, t, HD) for u in self.qkv(x).chunk(3, dim=-1))
        alibi = (self.slopes[:, None] * torch.arange(t, device=x.device)[None, :]).repeat(b, 1)[:, None, :]  # [B·H, 1, t]
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=HD**-0.5)
        mask = (~pad).repeat_interleave(H, dim=0)[:, None, :]  # [B·H, 1, t]
        scores = torch.masked_fill(scores, mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        return torch.bmm(probs, v).view(b, H, t, HD).transpose(1, 2).reshape(b, t, C)


class BloomAttention(nn.Module):
    """HF BLOOM: ALiBi via baddbmm on [B·H, N, D], viewed as [B, H, N, N] for the additive mask
    and an fp32 softmax, viewed back to [B·H, N, N] for bmm with V."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]))

    def forward(self, x, mask):  # mask: additive [B, 1, N, N]
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, H, 3, HD)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # [B, H, t, hd]
        q = q.reshape(b * H, t, HD)
        k = k.reshape(b * H, t, HD).transpose(-1, -2)
        v = v.reshape(b * H, t, HD)
        alibi = (self.slopes[:, None, None] * torch.arange(t, device=x.device)).repeat(b, 1, 1)  # [B·H, 1, t]
        scores = alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=HD**-0.5)
        w = scores.view(b, H, t, -1) + mask
        probs = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, 0.0, False)
        ctx = torch.bmm(probs.view(b * H, t, -1), v)
        return ctx.view(b, H, t, HD).permute(0, 2, 1, 3).reshape(b, t, C)


def bloom_mask(x, pad):  # causal and padding, additive with finfo.min: [B, 1, N, N]
    t = x.shape[1]
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


class GPTNeoAttention(nn.Module):
    """HF GPT-Neo: no scaling; torch.where with a bool tril buffer and a 0-d tensor fill."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64))

    def forward(self, x, attention_mask):
        q, k, v = _split(self.q(x), H), _split(self.k(x), H), _split(self.v(x), H)
        q, k = q.to(torch.float32), k.to(torch.float32)
        w = torch.matmul(q, k.transpose(-1, -2))
        ql, kl = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kl - ql : kl, :kl]
        mask_value = torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w, mask_value)
        w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1).to(v.dtype)
        return _merge(torch.matmul(w, v))


def padding_bias(x, pad):  # additive padding mask [B, 1, 1, N]
    return (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min


class Wav2Vec2Attention(nn.Module):
    """Speech encoder (wav2vec2 / older BART and Whisper code): q scaled before the projection's
    split, 3-D bmm, scores viewed to [B, H, N, N] to add the padding mask from feature lengths
    and back to [B·H, N, N] for the softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.scaling = HD**-0.5

    def forward(self, x, lengths):
        b, t, _ = x.shape
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # [B, t]
        mask = (~valid)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        q = self.q(x) * self.scaling
        q = _split(q, H).reshape(b * H, t, HD)
        k = _split(self.k(x), H).reshape(b * H, t, HD)
        v = _split(self.v(x), H).reshape(b * H, t, HD)
        w = torch.bmm(q, k.transpose(1, 2))
        w = w.view(b, H, t, t) + mask
        w = w.view(b * H, t, t)
        w = nn.functional.softmax(w, dim=-1)
        out = torch.bmm(F.dropout(w, p=0.1, training=self.training), v)
        return out.view(b, H, t, HD).transpose(1, 2).reshape(b, t, C)


class DebertaAttention(nn.Module):
    """HF DeBERTa-v2: Kᵀ divided by a 0-d tensor scale inside the bmm, scores viewed to
    [B, H, N, N] for masked_fill with ~mask, probabilities viewed back to [B·H, N, N]."""

    def __init__(self):
        super().__init__()
        self.query_proj, self.key_proj, self.value_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    @staticmethod
    def transpose_for_scores(x):  # [B, t, C] -> [B·H, t, hd]
        x = x.view(x.size()[:-1] + (H, -1))
        return x.permute(0, 2, 1, 3).contiguous().view(-1, x.size(1), x.size(-1))

    def forward(self, x, attention_mask):  # attention_mask: [B, 1, N, N] of 0/1
        q = self.transpose_for_scores(self.query_proj(x))
        k = self.transpose_for_scores(self.key_proj(x))
        v = self.transpose_for_scores(self.value_proj(x))
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float) * 1)
        scores = torch.bmm(q, k.transpose(-1, -2) / scale.to(dtype=q.dtype))
        scores = scores.view(-1, H, scores.size(-2), scores.size(-1))
        scores = scores.masked_fill(~(attention_mask.bool()), torch.finfo(q.dtype).min)
        probs = nn.functional.dropout(nn.functional.softmax(scores, dim=-1), 0.1, self.training)
        ctx = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), v)
        ctx = ctx.view(-1, H, ctx.size(-2), ctx.size(-1)).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (-1,))


def deberta_mask(pad):  # [B, 1, N, N]: query and key both valid
    m = pad[:, None, None, :].long()
    return m * m.squeeze(-2).unsqueeze(-1)


class FalconAlibiAttention(nn.Module):
    """HF Falcon with ALiBi: multi-query K/V [B, 1, N, hd] broadcast by matmul, ALiBi added as a
    [B, H, 1, N] view, scaled in place after, and the mask added inside the softmax call."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, C + 2 * HD)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]))
        self.inv_norm_factor = 1.0 / math.sqrt(HD)

    def forward(self, x, mask):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, H + 2, HD)
        q = fused[:, :, :-2].transpose(1, 2)  # [B, H, t, hd]
        k, v = fused[:, :, [-2]].transpose(1, 2), fused[:, :, [-1]].transpose(1, 2)  # [B, 1, t, hd]
        alibi = (self.slopes[:, None] * torch.arange(t, device=x.device)).repeat(b, 1, 1).reshape(b * H, 1, t)
        scores = (q @ k.transpose(-1, -2)).view(b, H, t, t)
        logits = scores + alibi.view(b, H, 1, -1)
        logits *= self.inv_norm_factor
        probs = F.softmax(logits + mask, dim=-1, dtype=x.dtype)
        out = (probs.view(b, H, t, t) @ v).flatten(0, 1)
        return out.view(b, H, t, HD).permute(0, 2, 1, 3).reshape(b, t, C)


class ClampedScoresAttention(nn.Module):
    """Scores clamped for low-precision stability, with the bounds spelled two ways."""

    def __init__(self, bound=0.5):
        super().__init__()
        self.bound = bound
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        q, k, v = (_split(u, H) for u in self.qkv(x).chunk(3, dim=-1))
        w = q @ k.transpose(-1, -2) * HD**-0.5
        w = w.clamp(min=-self.bound)
        w = torch.clamp_max(w, self.bound)
        return _merge(torch.softmax(w, dim=-1) @ v)


class XGLMAttention(nn.Module):
    """HF XGLM: q scaled in the projection, heads folded for bmm, an additive causal mask,
    then the scores floored at finfo.min with torch.max against a 0-d tensor."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = _split(self.q(x) * HD**-0.5, H).reshape(b * H, t, HD)
        k = _split(self.k(x), H).reshape(b * H, t, HD)
        v = _split(self.v(x), H).reshape(b * H, t, HD)
        w = torch.bmm(q, k.transpose(1, 2)).view(b, H, t, t) + mask
        w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min, device=w.device))
        w = nn.functional.softmax(w.view(b * H, t, t), dim=-1)
        return _merge(torch.bmm(w, v).view(b, H, t, HD))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pad(n_valid):
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[1, n_valid:] = False
    return pad


FAMILIES = {
    "llama-gqa": (lambda: LlamaAttention(2), lambda: (x := _x(B, N, C), llama_mask(x)), "causal" and None),
    "llama-mqa": (lambda: LlamaAttention(1), lambda: (x := _x(B, N, C), llama_mask(x)), None),
    "bert-padding": (BertSelfAttention, lambda: (_x(B, N, C), _pad(17).float()), None),
    "gpt2-tril-where": (GPT2Attention, lambda: (_x(B, N, C),), "top_left"),
    "gpt2-tensor-scale": (GPT2ModernAttention, lambda: (x := _x(B, N, C), llama_mask(x)), None),
    "t5-relative-bias": (T5Attention, lambda: (_x(B, N, C),), None),
    "gemma2-softcap": (Gemma2Attention, lambda: (_x(B, N, C),), "top_left"),
    "vit": (ViTSelfAttention, lambda: (_x(B, N, C),), None),
    "whisper-cross-bmm": (WhisperAttention, lambda: (_x(B, N, C), _x(B, 37, C, seed=1)), None),
    "mistral-sliding-window": (SlidingWindowAttention, lambda: (_x(B, N, C),), None),
    "falcon-mqa-broadcast": (MQAttention, lambda: (_x(B, N, C),), None),
    "bart-cross-padding": (CrossAttention, lambda: (_x(B, N, C), _x(B, 19, C, seed=2), _pad(11)[:, :19]), None),
    "sdpa-encoder": (SDPAEncoder, lambda: (_x(B, N, C), _pad(9)), None),
    "bloom-alibi-baddbmm": (BloomStyleAttention, lambda: (_x(B, N, C), _pad(13)), None),
    "bloom-hf-views": (BloomAttention, lambda: (x := _x(B, N, C), bloom_mask(x, _pad(15))), None),
    "gpt-neo-tensor-fill": (GPTNeoAttention, lambda: (x := _x(B, N, C), padding_bias(x, _pad(19))), "top_left"),
    "wav2vec2-speech-encoder": (Wav2Vec2Attention, lambda: (_x(B, N, C), torch.tensor([N, 16])), None),
    "deberta-v2": (DebertaAttention, lambda: (_x(B, N, C), deberta_mask(_pad(18))), None),
    "falcon-alibi-mqa": (FalconAlibiAttention, lambda: (x := _x(B, N, C), llama_mask(x)), None),
    "clamped-scores": (ClampedScoresAttention, lambda: (_x(B, N, C),), None),
    "xglm-max-floor": (XGLMAttention, lambda: (x := _x(B, N, C), llama_mask(x)), None),
}


@pytest.mark.parametrize("kernel", ["chunked", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_fused_and_at_parity(family, kernel, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", kernel)  # triton: the generated kernels, interpreted
    make_module, make_inputs, causal = FAMILIES[family]
    torch.manual_seed(0)
    m = make_module().eval()
    inputs = make_inputs()

    report = flashfx.explain(m, *inputs)
    assert report.sites and all(s.fused for s in report.sites), str(report)
    if causal:
        assert all(f"causal({causal})" in s.program for s in report.sites), str(report)

    before = counters["rewritten"]
    compiled = torch.compile(m, backend="flashfx", options={"inner": "aot_eager"})
    out = compiled(*inputs)
    assert counters["rewritten"] == before + len(report.sites)
    ref = m(*inputs)
    m64 = copy.deepcopy(m).double()  # the float64 truth both fp32 results are measured against
    ref64 = m64(*(x.double() if x.is_floating_point() else x for x in inputs))
    _no_worse_than_eager("output", out, ref, ref64, atol=1e-5)

    grad = _x(*out.shape, seed=7)
    got = torch.autograd.grad(out, list(m.parameters()), grad, allow_unused=True)
    want = torch.autograd.grad(ref, list(m.parameters()), grad, allow_unused=True)
    want64 = torch.autograd.grad(ref64, list(m64.parameters()), grad.double(), allow_unused=True)
    for (name, _), g, w, w64 in zip(m.named_parameters(), got, want, want64):
        if w is not None:
            _no_worse_than_eager(f"d{name}", g, w, w64, atol=2e-5)


def _no_worse_than_eager(what: str, fused, eager, truth, atol: float):
    """The fused fp32 result is as close to the float64 result as eager's fp32 is, give or take
    fp32 rounding (a few times eager's error) and `atol`: a wrong result fails, while two fp32
    roundings of the same math need not agree with each other to `atol`."""
    err = (fused.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    assert err <= 4 * eager_err + atol, (
        f"{what}: fused is {err:.3e} from float64, eager fp32 {eager_err:.3e} (allowed {4 * eager_err + atol:.3e})")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_family_gpu_bf16_inductor(family):
    make_module, make_inputs, _ = FAMILIES[family]
    torch.manual_seed(0)
    m = make_module().eval().cuda()
    inputs = [t.cuda() for t in make_inputs()]
    low = [t.bfloat16() if t.dtype == torch.float32 and t.dim() == 3 else t for t in inputs]
    ref = m(*inputs)  # fp32 eager
    before = counters["rewritten"]
    out = torch.compile(m.bfloat16(), backend="flashfx")(*low)
    assert counters["rewritten"] > before
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 3e-2, err
    out.float().square().mean().backward()  # the backward kernels run and give finite grads
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_multihead_attention_returning_weights_stays_unfused_with_reason():
    mha = nn.MultiheadAttention(C, H, batch_first=True).eval()
    x = _x(B, N, C)
    report = flashfx.explain(lambda x: mha(x, x, x, need_weights=True), x)
    out = torch.compile(lambda x: mha(x, x, x, need_weights=True)[0], backend="flashfx", options={"inner": "eager"})(x)
    torch.testing.assert_close(out, mha(x, x, x, need_weights=True)[0], atol=1e-5, rtol=1e-4)
    for s in report.sites:
        assert s.fused or s.reason  # every site either fused or says why


def einsum_attention(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)


def test_einsum_attention_fused_and_at_parity():
    q, k, v = (_x(B, H, N, HD, seed=i) for i in range(3))
    report = flashfx.explain(einsum_attention, q, k, v)
    assert [s.fused for s in report.sites] == [True], str(report)
    out = torch.compile(einsum_attention, backend="flashfx", options={"inner": "aot_eager"})(q, k, v)
    torch.testing.assert_close(out, einsum_attention(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("eq, want", [
    ("bhqd,bhkd->bhqk", True), ("bhqk,bhkd->bhqd", False), ("bqd,bkd->bqk", True),
    ("bhqd,bhdk->bhqk", False), ("bhqd,bhkd->bhkq", None), ("bhqd,bkhd->bhqk", None), ("...qd,...kd->...qk", None),
])
def test_einsum_equations_recognized(eq, want):
    from flashfx.passes.normalize import _einsum_as_matmul

    assert _einsum_as_matmul(eq) is want

