#!/usr/bin/env python3
"""Peer for bench_tokenizer: tiktoken encoding the same text with the same vocabulary and the
Llama 3 pattern, single thread (its native encode_ordinary on 400,000-character chunks, i.e.
without Meta's Python-level run splitting, which would only slow tiktoken down), and its
encode_ordinary_batch over 2 threads on the same documents as ours.

usage: tokenizer_peer.py VOCAB TEXT [REPS] [DOC_BYTES]
prints: tiktoken_single_mbps X / tiktoken_tokens N / tiktoken_batch2_mbps Y
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "conformance"))
import tiktoken_reference as ref  # noqa: E402


def main():
    vocab, text_path = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    doc_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 16384
    with open(text_path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    nbytes = len(text.encode("utf-8"))
    enc = ref.make_encoding(vocab)
    step = ref.MAX_ENCODE_CHARS
    best, ntok = float("inf"), 0
    for _ in range(reps):
        t0 = time.perf_counter()
        ntok = sum(len(enc.encode_ordinary(text[i:i + step])) for i in range(0, len(text), step))
        best = min(best, time.perf_counter() - t0)
    print(f"tiktoken_single_mbps {nbytes / best / 1e6:.3f}")
    print(f"tiktoken_tokens {ntok}")
    # Documents cut at newlines after doc_bytes, as bench_tokenizer cuts them.
    docs, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + doc_bytes)
        end = len(data) if end < 0 else end + 1
        docs.append(data[start:end].decode("utf-8", errors="replace"))
        start = end
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        enc.encode_ordinary_batch(docs, num_threads=2)
        best = min(best, time.perf_counter() - t0)
    print(f"tiktoken_batch2_mbps {nbytes / best / 1e6:.3f}")


if __name__ == "__main__":
    main()
