"""PyTorch reference of the DPO loss (Rafailov et al.) as llama3 post-trains with it:
    loss = mean_i -log sigmoid(beta * ((lc_i - refc_i) - (lr_i - refr_i)))
         + alpha * mean_i (-lc_i / n_i)
where l* are log-probs of the response tokens selected by the mask (assistant content; headers
and terminators excluded), summed per sequence, and n_i the number of counted tokens of
chosen response i. The model is tests/reference/llama_ref.py's.

Usage: dpo_ref.py DIR
  reads  DIR/config.json, DIR/model.safetensors, DIR/batch.safetensors (tokens (2n, T),
         labels (2n, T), mask (2n, T), ref_logps (2n)), DIR/dpo.json (beta, alpha)
  writes DIR/ref.safetensors: loss, logps (2n), grad.<name> for every parameter.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import safetensors_io  # noqa: E402

torch.set_num_threads(2)


def main():
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    hp = json.load(open(os.path.join(d, "dpo.json")))
    weights = safetensors_io.load(os.path.join(d, "model.safetensors"))
    b = safetensors_io.load(os.path.join(d, "batch.safetensors"))
    tokens = torch.from_numpy(b["tokens"]).long()
    labels = torch.from_numpy(b["labels"]).long()
    mask = torch.from_numpy(b["mask"]).bool()
    ref = torch.from_numpy(b["ref_logps"]).double()
    p = {k: torch.from_numpy(v).float().requires_grad_(True) for k, v in weights.items()}
    n = tokens.shape[0] // 2
    logits = llama_ref.forward(p, cfg, tokens, torch.zeros_like(tokens))
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    seq = (logp * mask).sum(-1)  # (2n)
    lc, lr = seq[:n], seq[n:]
    beta, alpha = hp["beta"], hp["alpha"]
    z = beta * ((lc - ref[:n]) - (lr - ref[n:]))
    dpo = -torch.nn.functional.logsigmoid(z).mean()
    nll = (-lc / mask[:n].sum(-1).double()).mean()
    loss = dpo + alpha * nll
    loss.backward()
    out = {"loss": np.array([loss.item()]), "logps": seq.detach().numpy()}
    for k, v in p.items():
        out["grad." + k] = v.grad.numpy().copy()
    safetensors_io.save(os.path.join(d, "ref.safetensors"), out)


if __name__ == "__main__":
    main()
