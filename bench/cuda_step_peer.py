#!/usr/bin/env python3
"""PyTorch peer of bench_cuda_step: the same Llama-style training step (embedding, per layer
RMSNorm / q,k,v / RoPE / causal GQA attention / o / residual / RMSNorm / w1,w3 / SwiGLU / w2 /
residual, final RMSNorm, cross-entropy, backward, AdamW) with f32 master weights and bf16
autocast, on one GPU. Prints tokens/s and MFU with the same FLOP count as the C++ benchmark
(6 * non-embedding params * tokens + causal attention, vs 989 TFLOP/s).

  python3 bench/cuda_step_peer.py --mode eager|compile [--seq 4096] [--steps 3] [--warmup 1]
                                  [--accum N]   # N micro-batches per optimizer step
  python3 bench/cuda_step_peer.py --mode attn [--seq 4096]   # SDPA fwd+bwd timing
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="eager", choices=["eager", "compile", "attn"])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--device", default="cuda", help="cpu: smoke test of this script (tiny configs)")
    return p.parse_args()


def rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def sdpa(q, k, v):
    """Causal GQA attention on (B, H, T, Dh) / (B, Hkv, T, Dh)."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except (TypeError, AttributeError):  # torch < 2.5: no enable_gqa (< 2.0: no sdpa at all)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = q.shape[2]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.softmax(s.float(), dim=-1).type_as(q) @ v


class Block(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        d, h, hk, dh, f = a.dim, a.heads, a.kv_heads, a.dim // a.heads, a.ffn
        self.h, self.hk, self.dh = h, hk, dh
        self.attn_norm = torch.nn.Parameter(torch.ones(d))
        self.ffn_norm = torch.nn.Parameter(torch.ones(d))
        self.wq = torch.nn.Linear(d, h * dh, bias=False)
        self.wk = torch.nn.Linear(d, hk * dh, bias=False)
        self.wv = torch.nn.Linear(d, hk * dh, bias=False)
        self.wo = torch.nn.Linear(h * dh, d, bias=False)
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hn = rms_norm(x, self.attn_norm, 1e-5)
        q = self.wq(hn).view(b, t, self.h, self.dh)
        k = self.wk(hn).view(b, t, self.hk, self.dh)
        v = self.wv(hn).view(b, t, self.hk, self.dh)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, -1))
        hn = rms_norm(x, self.ffn_norm, 1e-5)
        return x + self.w2(F.silu(self.w1(hn)) * self.w3(hn))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos + rot * sin


class Model(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = torch.nn.Embedding(a.vocab, a.dim)
        self.layers = torch.nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = torch.nn.Parameter(torch.ones(a.dim))
        self.head = torch.nn.Linear(a.dim, a.vocab, bias=False)

    def forward(self, ids, targets, cos, sin):
        x = self.emb(ids)
        for l in self.layers:
            x = l(x, cos, sin)
        x = rms_norm(x, self.norm, 1e-5)
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def attn_bench(a):
    dev = a.device
    b, t, h, hk, dh = a.batch, a.seq, a.heads, a.kv_heads, a.dim // a.heads
    flops = 3.5 * 4.0 * b * t * t * h * dh / 2
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(b, h, t, dh, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, hk, t, dh, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, hk, t, dh, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(b, h, t, dh, device=dev, dtype=dt)
        try:
            def run():
                o = sdpa(q, k, v)
                sync(dev)
                t1 = time.perf_counter()
                o.backward(g)
                sync(dev)
                return t1
            tf = tb = 0.0
            reps = 5
            for r in range(-1, reps):
                sync(dev)
                t0 = time.perf_counter()
                t1 = run()
                t2 = time.perf_counter()
                if r >= 0:
                    tf += t1 - t0
                    tb += t2 - t1
            tf, tb = tf / reps, tb / reps
            name = "f32" if dt == torch.float32 else "bf16"
            print(f"torch sdpa {name} B={b} T={t} H={h} Hkv={hk} Dh={dh} causal: fwd {tf*1e3:.2f} ms, "
                  f"bwd {tb*1e3:.2f} ms, fwd+bwd {(tf+tb)*1e3:.2f} ms ({flops/(tf+tb)/1e12:.1f} TFLOP/s)")
            print(f"RESULT torch_attn_ms_{name} {(tf+tb)*1e3:.3f}")
        except Exception as e:  # a backend may not support a dtype/GQA combination
            print(f"torch sdpa {dt}: failed: {e}")
        del q, k, v, g
        if dev == "cuda":
            torch.cuda.empty_cache()


def step_bench(a):
    dev = a.device
    torch.manual_seed(0)
    model = Model(a).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.emb.weight.numel()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if dev == "cuda" else {}))
    dh = a.dim // a.heads
    inv = 1.0 / (500000.0 ** (torch.arange(0, dh, 2, device=dev).float() / dh))
    ang = torch.arange(a.seq, device=dev).float()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)[None, :, None, :]
    cos, sin = ang.cos(), ang.sin()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    targets = torch.roll(ids, -1, dims=1)
    fwd = model
    if a.mode == "compile":
        fwd = torch.compile(model)

    def step():
        total = 0.0
        for _ in range(a.accum):  # each micro-batch's loss is its share of the step's mean
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = fwd(ids, targets, cos, sin) / a.accum
            loss.backward()
            total = total + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        return float(total)

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"torch {torch.__version__} {name} mode {a.mode}; parameters "
          f"{n_params/1e9:.3f} B ({n_matmul/1e9:.3f} B without the embedding table)")
    total = 0.0
    for s in range(1, a.warmup + a.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if s > a.warmup:
            total += dt
        print(f"step {s} loss {loss:.4f} {dt*1e3:.1f} ms{'' if s > a.warmup else ' (warm-up)'}",
              flush=True)
    per = total / a.steps
    tokens = a.batch * a.seq * a.accum
    model_flops = 6.0 * n_matmul * tokens
    attn_flops = 3.0 * 4.0 * a.layers * a.batch * a.accum * a.seq * a.seq * a.heads * dh / 2.0
    mfu = (model_flops + attn_flops) / per / 989e12
    mfu_full = (model_flops + 2.0 * attn_flops) / per / 989e12  # PaLM: the whole matrix
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    print(f"step {per*1e3:.1f} ms, {tokens/per:.0f} tokens/s, MFU {mfu*100:.1f}% ({mfu_full*100:.1f}% "
          f"counting the whole attention matrix); peak memory {peak:.1f} GiB")
    print(f"RESULT torch_{a.mode} seq={a.seq} accum={a.accum} tokens_per_s={tokens/per:.0f} mfu={mfu:.4f} "
          f"mfu_full={mfu_full:.4f} step_ms={per*1e3:.1f} loss={loss:.4f}")


def main():
    a = parse()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return 77
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    if a.mode == "attn":
        attn_bench(a)
    else:
        step_bench(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
