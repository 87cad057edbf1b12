"""PyTorch peer for bench_train_step: the same Llama training step (dim 512, 8 layers,
8 heads, 2 kv heads, FFN 1536, vocab 8192, seq 512, batch 8, AdamW) in PyTorch eager,
autocast-bf16, or torch.compile. Prints one JSON line like the C++ benchmark.

usage: train_step_peer.py --mode f32|bf16|compile|compile-bf16 [--steps N] [--warmup N] [--threads N]
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, LAYERS, HEADS, KV, FFN, VOCAB = 512, 8, 8, 2, 1536, 8192


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        hd = DIM // HEADS
        self.hd = hd
        self.input_layernorm = RMSNorm(DIM)
        self.q_proj = nn.Linear(DIM, HEADS * hd, bias=False)
        self.k_proj = nn.Linear(DIM, KV * hd, bias=False)
        self.v_proj = nn.Linear(DIM, KV * hd, bias=False)
        self.o_proj = nn.Linear(HEADS * hd, DIM, bias=False)
        self.post_attention_layernorm = RMSNorm(DIM)
        self.gate_proj = nn.Linear(DIM, FFN, bias=False)
        self.up_proj = nn.Linear(DIM, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, DIM, bias=False)

    def forward(self, h, cos, sin):
        B, T, _ = h.shape
        x = self.input_layernorm(h)
        q = self.q_proj(x).view(B, T, HEADS, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(HEADS // KV, dim=1)
        v = v.repeat_interleave(HEADS // KV, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            o = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v
        h = h + self.o_proj(o.transpose(1, 2).reshape(B, T, DIM))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, targets):
        T = tokens.shape[1]
        hd = DIM // HEADS
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat((f, f), -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits.view(-1, VOCAB).float(), targets.view(-1))


def flops_per_token(T):
    hd = DIM // HEADS
    matmul = LAYERS * (DIM * HEADS * hd * 2 + DIM * KV * hd * 2 + 3 * DIM * FFN) + VOCAB * DIM
    return 6 * matmul + 6 * LAYERS * T * DIM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="f32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (a.batch, a.seq))
    targets = torch.randint(0, VOCAB, (a.batch, a.seq))
    step_fn = model
    if a.mode.startswith("compile"):
        step_fn = torch.compile(model)
    bf16 = a.mode.endswith("bf16")
    total = 0.0
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_fn(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if s >= a.warmup:
            total += dt
    step_s = total / a.steps
    tps = a.batch * a.seq / step_s
    gf = flops_per_token(a.seq) * a.batch * a.seq / step_s / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": f"torch-{torch.__version__}", "precision": a.mode, "threads": a.threads,
                      "tokens_per_s": round(tps, 1), "gflops": round(gf, 1), "peak_rss_mb": round(rss),
                      "step_s": round(step_s, 3)}))


if __name__ == "__main__":
    main()
