"""flashfx quickstart: compile a small GPT with backend="flashfx" and see what it did.

    python examples/quickstart.py

The model is written the way nanoGPT writes it — attention by hand, with a causal tril
buffer — and knows nothing about flashfx. One line compiles it. The script prints the
explain report, checks outputs and gradients against eager, and compares one training
step's time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfx  # for explain; torch.compile(backend="flashfx") itself needs no import once installed


@dataclass
class Config:
    vocab: int = 512
    block_size: int = 1024
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        bias = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", bias.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x):  # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # [B, nh, T, T]
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, nh, T, hd]
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)

    def forward(self, idx):  # idx: [B, T] token ids
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, vocab]


# ---------------------------------------------------------------------------------------------


def setup(device: str, seq: int, batch: int):
    torch.manual_seed(0)
    cfg = Config(block_size=max(seq, 64))
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab, (batch, seq), device=device)
    return model, idx


def train_step(model, idx):
    logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss


def compiled(model, device):
    # On CPU, inductor compiles C++ for the rest of the graph, which takes a while on a small
    # machine; aot_eager keeps the demo quick. On a GPU the default (inductor) is used.
    options = {} if device == "cuda" else {"inner": "aot_eager"}
    return torch.compile(model, backend="flashfx", options=options)


def measure(which: str, device: str, seq: int, batch: int, steps: int) -> dict:
    """Time and peak memory of a training step, eager or flashfx (run in its own process on CPU)."""
    model, idx = setup(device, seq, batch)
    run = compiled(model, device) if which == "flashfx" else model
    train_step(run, idx)  # warm-up (and compile)
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, idx)
        model.zero_grad(set_to_none=True)
    sync()
    ms = (time.perf_counter() - t0) / steps * 1e3
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": ms, "peak_mib": max(peak, 0) / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 512 on CPU, 2048 on GPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--measure", choices=["eager", "flashfx"], help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq = args.seq or (2048 if device == "cuda" else 512)
    batch = args.batch or (8 if device == "cuda" else 2)

    if args.measure:  # a child process measuring one variant
        print(json.dumps(measure(args.measure, device, seq, batch, args.steps)))
        return 0

    model, idx = setup(device, seq, batch)
    print(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch {batch}, seq {seq}, {device}\n")
    print(flashfx.explain(model, idx))

    # ---- the compiled model computes what the model computes, forward and backward ----
    loss_ref = train_step(model, idx)
    grads_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = train_step(compiled(model, device), idx)
    grad_err = max(((p.grad - g).norm() / g.norm()).item() for p, g in zip(model.parameters(), grads_ref))
    loss_err = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    print(f"\nloss eager {loss_ref.item():.6f}, flashfx {loss.item():.6f} (relative difference {loss_err:.1e}); "
          f"largest relative gradient difference {grad_err:.1e}")
    ok = loss_err < 1e-4 and grad_err < 1e-3
    if not ok:
        print("MISMATCH between eager and flashfx")

    # ---- time and peak memory of a training step, each in a fresh process on CPU ----
    results = {}
    for which in ("eager", "flashfx"):
        if device == "cuda":
            results[which] = measure(which, device, seq, batch, args.steps)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--measure", which,
                   "--seq", str(seq), "--batch", str(batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\ntraining step (forward + backward), batch {batch} x seq {seq}, {device}:")
    print(f"  {'':8} {'ms/step':>9} {'peak MiB':>9}")
    for which, r in results.items():
        print(f"  {which:8} {r['ms']:9.1f} {r['peak_mib']:9.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
