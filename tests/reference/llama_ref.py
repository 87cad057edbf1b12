"""PyTorch reference of the Llama 3 model, written from the HF `transformers` Llama
implementation's semantics (rotate_half RoPE with Llama 3.1 scaling, GQA via repeat_kv,
RMSNorm in f32, SwiGLU, untied head) plus the document attention mask.

Usage: llama_ref.py DIR
  reads  DIR/config.json, DIR/model.safetensors, DIR/batch.safetensors (tokens, targets, doc_ids),
         DIR/train.json (lr, betas, eps, weight_decay, max_grad_norm, steps)
  writes DIR/ref.safetensors: logits, loss, grad.<name> for every parameter, and
         train_losses (the losses of `steps` AdamW steps on the same batch).
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402

torch.set_num_threads(2)


def inv_freq(cfg):
    hd = cfg["head_dim"]
    f = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.get("rope_scaling")
    if rs:
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
        out = []
        for x in f:
            wl = 2 * math.pi / x
            if wl < high_wl:
                out.append(x)
            elif wl > low_wl:
                out.append(x / rs["factor"])
            else:
                s = (old / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
                out.append((1 - s) * x / rs["factor"] + s * x)
        f = np.array(out)
    return torch.tensor(f, dtype=torch.float32)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms_norm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * w


def forward(p, cfg, tokens, doc_ids):
    B, T = tokens.shape
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = causal[None] & same_doc  # (B, T, T)
    h = p["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        x = rms_norm(h, p[pre + "input_layernorm.weight"], eps)
        q = (x @ p[pre + "self_attn.q_proj.weight"].T).view(B, T, H, hd)
        k = (x @ p[pre + "self_attn.k_proj.weight"].T).view(B, T, KV, hd)
        v = (x @ p[pre + "self_attn.v_proj.weight"].T).view(B, T, KV, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = H // KV
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(~mask[:, None], float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, T, H * hd)
        h = h + o @ p[pre + "self_attn.o_proj.weight"].T
        x = rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
        g = x @ p[pre + "mlp.gate_proj.weight"].T
        u = x @ p[pre + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(g) * u) @ p[pre + "mlp.down_proj.weight"].T
    h = rms_norm(h, p["model.norm.weight"], eps)
    return h @ p["lm_head.weight"].T


def main():
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    tr = json.load(open(os.path.join(d, "train.json")))
    weights = safetensors_io.load(os.path.join(d, "model.safetensors"))
    batch = safetensors_io.load(os.path.join(d, "batch.safetensors"))
    tokens = torch.from_numpy(batch["tokens"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    doc_ids = torch.from_numpy(batch["doc_ids"]).long()
    p = {k: torch.from_numpy(v).float().requires_grad_(True) for k, v in weights.items()}
    V = cfg["vocab_size"]

    def loss_fn():
        logits = forward(p, cfg, tokens, doc_ids)
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)

    logits, loss = loss_fn()
    loss.backward()
    out = {"logits": logits.detach().numpy(), "loss": np.array([loss.item()], dtype=np.float64)}
    for k, v in p.items():
        out["grad." + k] = v.grad.numpy().copy()
    # Training: AdamW with decay on all but the norm gains, clipping, same batch each step.
    decay = [v for k, v in p.items() if not k.endswith("norm.weight")]
    no_decay = [v for k, v in p.items() if k.endswith("norm.weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tr["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tr["lr"], betas=(tr["beta1"], tr["beta2"]), eps=tr["eps"], foreach=False,
    )
    losses = []
    for _ in range(tr["steps"]):
        opt.zero_grad()
        _, l = loss_fn()
        losses.append(l.item())
        l.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), tr["max_grad_norm"])
        opt.step()
    out["train_losses"] = np.array(losses, dtype=np.float64)
    safetensors_io.save(os.path.join(d, "ref.safetensors"), out)


if __name__ == "__main__":
    main()
