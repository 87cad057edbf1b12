// BPE trainer. Pre-tokenises the corpus exactly as encode() does, counts distinct pieces
// in a hash map, then merges the most frequent adjacent pair repeatedly, updating pair
// counts incrementally: only the pieces that contain the merged pair are revisited (an
// index pair -> pieces finds them), and a lazy max-heap yields the next pair. Ties are
// broken by the lower (left, right) id pair, so training is deterministic.
#include <algorithm>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "runtime/core/error.h"
#include "text/tokenizer/pretokenize.h"
#include "text/tokenizer/tiktoken_file.h"
#include "text/tokenizer/tokenizer.h"
#include "text/tokenizer/utf8.h"

namespace llama3::text {
namespace {

using Pair = uint64_t;  // left id << 32 | right id
Pair make_pair(int32_t a, int32_t b) {
  return uint64_t(uint32_t(a)) << 32 | uint32_t(b);
}
int32_t left_of(Pair p) {
  return static_cast<int32_t>(p >> 32);
}
int32_t right_of(Pair p) {
  return static_cast<int32_t>(p & 0xFFFFFFFFu);
}

struct Word {
  std::vector<int32_t> ids;
  int64_t count = 0;
  int32_t stamp = -1;  // last merge that visited this word (de-duplicates index entries)
};

// Reads up to max_bytes (0 = all) of the files, repairing invalid UTF-8 so any corpus works.
std::unordered_map<std::string, int64_t> count_pieces(std::span<const std::string> files,
                                                      size_t max_bytes) {
  Pretokenizer pre;
  std::unordered_map<std::string, int64_t> counts;
  std::vector<std::string_view> chunks, pieces;
  size_t total = 0;
  for (const std::string& path : files) {
    if (max_bytes && total >= max_bytes) break;
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("train_bpe: cannot open corpus file {}", path);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    if (max_bytes && total + text.size() > max_bytes) text.resize(max_bytes - total);
    total += text.size();
    if (utf8::find_invalid(text) != utf8::kValid) text = utf8::replace_invalid(text);
    chunks.clear();
    split_llama3_limits(text, chunks);
    for (std::string_view chunk : chunks) {
      pieces.clear();
      pre.split(chunk, pieces);
      for (std::string_view p : pieces) ++counts[std::string(p)];
    }
  }
  return counts;
}

}  // namespace

void train_bpe(std::span<const std::string> corpus_files, const BpeTrainOptions& opts,
               const std::string& out_path) {
  LLAMA3_CHECK(opts.vocab_size >= 256, "train_bpe: vocab_size {} is below the 256 byte tokens",
               opts.vocab_size);
  LLAMA3_CHECK(!corpus_files.empty(), "train_bpe: no corpus files");

  std::vector<std::string> tokens(256);
  for (int b = 0; b < 256; ++b) tokens[b] = std::string(1, static_cast<char>(b));
  std::unordered_map<std::string, int32_t> token_id;
  for (int b = 0; b < 256; ++b) token_id.emplace(tokens[b], b);

  // Words in a deterministic order (sorted by bytes), so the index lists are too.
  std::vector<Word> words;
  {
    auto counts = count_pieces(corpus_files, opts.max_bytes);
    std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
    counts.clear();
    std::sort(sorted.begin(), sorted.end());
    words.reserve(sorted.size());
    for (auto& [bytes, c] : sorted) {
      if (bytes.size() < 2) continue;  // a single byte never takes part in a merge
      Word w;
      w.count = c;
      w.ids.reserve(bytes.size());
      for (unsigned char b : bytes) w.ids.push_back(b);
      words.push_back(std::move(w));
    }
  }

  std::unordered_map<Pair, int64_t> pair_count;
  std::unordered_map<Pair, std::vector<uint32_t>> where;  // pair -> words (may be stale)
  for (uint32_t wi = 0; wi < words.size(); ++wi) {
    const Word& w = words[wi];
    for (size_t k = 0; k + 1 < w.ids.size(); ++k) {
      const Pair p = make_pair(w.ids[k], w.ids[k + 1]);
      pair_count[p] += w.count;
      auto& list = where[p];
      if (list.empty() || list.back() != wi) list.push_back(wi);
    }
  }

  // Max-heap on count, then lower pair id. Entries go stale when counts change; a popped
  // entry is used only if it still matches the current count.
  using Entry = std::pair<int64_t, Pair>;
  const auto less = [](const Entry& a, const Entry& b) {
    return a.first != b.first ? a.first < b.first : a.second > b.second;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(less)> heap(less);
  for (const auto& [p, c] : pair_count) heap.push({c, p});

  std::unordered_map<Pair, int64_t> delta;
  std::vector<int32_t> merged;
  int32_t merge_no = 0;
  while (static_cast<int32_t>(tokens.size()) < opts.vocab_size) {
    if (heap.empty())
      fail("train_bpe: the corpus yields only {} tokens, fewer than the {} requested",
           tokens.size(), opts.vocab_size);
    const auto [count, pair] = heap.top();
    heap.pop();
    const auto pc = pair_count.find(pair);
    if (pc == pair_count.end() || pc->second != count || count <= 0) continue;

    const int32_t a = left_of(pair), b = right_of(pair);
    std::string bytes = tokens[a] + tokens[b];
    // Two different pairs can spell the same bytes ("a"+"bc", "ab"+"c"): reuse the id.
    int32_t t;
    if (const auto it = token_id.find(bytes); it != token_id.end()) {
      t = it->second;
    } else {
      t = static_cast<int32_t>(tokens.size());
      token_id.emplace(bytes, t);
      tokens.push_back(std::move(bytes));
    }

    const std::vector<uint32_t> list = std::move(where[pair]);
    where.erase(pair);
    delta.clear();
    for (uint32_t wi : list) {
      Word& w = words[wi];
      if (w.stamp == merge_no) continue;
      w.stamp = merge_no;
      const auto& ids = w.ids;
      merged.clear();
      bool changed = false;
      for (size_t k = 0; k < ids.size();) {
        if (k + 1 < ids.size() && ids[k] == a && ids[k + 1] == b) {
          merged.push_back(t);
          k += 2;
          changed = true;
        } else {
          merged.push_back(ids[k++]);
        }
      }
      if (!changed) continue;  // stale index entry
      for (size_t k = 0; k + 1 < ids.size(); ++k) delta[make_pair(ids[k], ids[k + 1])] -= w.count;
      for (size_t k = 0; k + 1 < merged.size(); ++k) {
        const Pair p = make_pair(merged[k], merged[k + 1]);
        delta[p] += w.count;
        if (merged[k] == t || merged[k + 1] == t) {
          auto& l = where[p];
          if (l.empty() || l.back() != wi) l.push_back(wi);
        }
      }
      w.ids.swap(merged);
    }
    for (const auto& [p, d] : delta) {
      if (d == 0) continue;
      int64_t& c = pair_count[p];
      c += d;
      if (c > 0) {
        heap.push({c, p});
      } else {
        pair_count.erase(p);
      }
    }
    ++merge_no;
  }
  write_tiktoken_file(out_path, tokens);
}

}  // namespace llama3::text
