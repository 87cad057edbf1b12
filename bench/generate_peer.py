"""PyTorch peer for bench_generate: the same Llama 3 flavour (random weights), KV-cache
greedy decoding written the way HF transformers does it (past key/values concatenated per
layer, GQA by repeat_interleave, RoPE at each new position), batch 1 and 16, prompts of 16
tokens, 64 new tokens. Prints one JSON line per batch size like the C++ benchmark.

usage: generate_peer.py [--flavour tiny|125M] [--batch 1,16] [--prompt 16] [--new 64] [--reps 2] [--threads 2]
                        [--dtype f32|bf16]
"""
import argparse
import json
import time

import torch

FLAVOURS = {  # dim, layers, heads, kv heads, ffn hidden, vocab
    "tiny": (256, 4, 8, 2, 704, 4096),
    "125M": (768, 12, 12, 4, 2048, 32768),
}


def ffn_hidden(dim, multiple_of):
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class Model:
    def __init__(self, dim, layers, heads, kv, ffn, vocab, theta=500000.0):
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
        self.dim, self.h, self.kv, self.hd = dim, heads, kv, dim // heads
        self.emb = r(vocab, dim)
        self.layers = [
            dict(n1=torch.ones(dim), q=r(dim, dim), k=r(kv * self.hd, dim), v=r(kv * self.hd, dim), o=r(dim, dim),
                 n2=torch.ones(dim), g=r(ffn, dim), u=r(ffn, dim), d=r(dim, ffn))
            for _ in range(layers)
        ]
        self.norm = torch.ones(dim)
        self.head = r(vocab, dim)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(self, x, pos):  # x (B, H, T, hd), pos (T)
        f = torch.outer(pos.float(), self.inv_freq)
        e = torch.cat((f, f), -1)
        cos, sin = e.cos().to(x.dtype), e.sin().to(x.dtype)
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), -1)
        return x * cos + rot * sin

    def forward(self, tokens, cache, start):
        B, T = tokens.shape
        x = self.emb[tokens]
        pos = torch.arange(start, start + T)
        for i, L in enumerate(self.layers):
            y = self.rms(x, L["n1"])
            q = (y @ L["q"].T).view(B, T, self.h, self.hd).transpose(1, 2)
            k = (y @ L["k"].T).view(B, T, self.kv, self.hd).transpose(1, 2)
            v = (y @ L["v"].T).view(B, T, self.kv, self.hd).transpose(1, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if cache[i] is not None:
                k = torch.cat((cache[i][0], k), 2)
                v = torch.cat((cache[i][1], v), 2)
            cache[i] = (k, v)
            rep = self.h // self.kv
            kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = (q @ kk.transpose(-1, -2)) / (self.hd ** 0.5)
            if T > 1:  # causal within the new tokens (they follow the cached ones)
                S = kk.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
                s = s.masked_fill(~mask, float("-inf"))
            o = torch.softmax(s, -1) @ vv
            x = x + o.transpose(1, 2).reshape(B, T, self.dim) @ L["o"].T
            y = self.rms(x, L["n2"])
            x = x + (torch.nn.functional.silu(y @ L["g"].T) * (y @ L["u"].T)) @ L["d"].T
        return self.rms(x[:, -1], self.norm) @ self.head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", default="tiny")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])  # bf16: weights and activations
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dim, layers, heads, kv, ffn, vocab = FLAVOURS[a.flavour]
    m = Model(dim, layers, heads, kv, ffn, vocab)
    if a.dtype == "bf16":  # the usual bf16 inference: every weight converted once
        m.emb, m.norm, m.head = m.emb.bfloat16(), m.norm.bfloat16(), m.head.bfloat16()
        m.layers = [{n: w.bfloat16() for n, w in L.items()} for L in m.layers]
    for B in [int(b) for b in a.batch.split(",")]:
        toks = torch.randint(0, vocab, (B, a.prompt), generator=torch.Generator().manual_seed(7))
        best_d = best_t = 0.0
        for _ in range(a.reps):
            with torch.inference_mode():
                cache = [None] * layers
                t0 = time.perf_counter()
                nxt = m.forward(toks, cache, 0).argmax(-1)
                t1 = time.perf_counter()
                pos = a.prompt
                for _ in range(a.new - 1):
                    nxt = m.forward(nxt[:, None], cache, pos).argmax(-1)
                    pos += 1
                t2 = time.perf_counter()
            best_d = max(best_d, B * (a.new - 1) / (t2 - t1))
            best_t = max(best_t, B * a.new / (t2 - t0))
        print(json.dumps({"impl": "pytorch-" + torch.__version__, "flavour": a.flavour, "precision": a.dtype, "batch": B,
                          "prompt": a.prompt, "new": a.new, "decode_tokens_per_s": round(best_d, 1),
                          "total_tokens_per_s": round(best_t, 1)}), flush=True)


if __name__ == "__main__":
    main()
