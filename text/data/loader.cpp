// MixingLoader: see loader.h for the contract and docs/data.md for the stream definition.
//
// The loader defines one global stream of packed rows that does not depend on the data-
// parallel layout: documents are drawn source by source (a seeded RNG picks the source,
// each source walks a seeded per-epoch permutation of its documents), concatenated, and cut
// into rows of seq_len tokens. Global step s is rows [s*G, (s+1)*G) with G = batch_size *
// dp_size; rank r keeps rows s*G + r, s*G + r + dp_size, ... (every dp_size-th row). So the
// union of all ranks' batches of a step, interleaved, is exactly what a single rank with
// batch_size*dp_size would get. Every rank packs the whole global step (packing is a copy,
// cheap next to a training step) which keeps all ranks' states identical: a state saved on
// any rank restores on any rank, even under a different dp_size.
#include "text/data/loader.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <numeric>
#include <thread>

#include "runtime/core/error.h"
#include "text/data/shard.h"

namespace llama3::data {
namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double uniform01(uint64_t& s) {
  return double(splitmix64(s) >> 11) * 0x1.0p-53;
}

struct Source {
  std::string name;
  std::vector<Shard> shards;
  std::vector<int64_t> first_doc;  // prefix sums of shard doc counts (size shards+1)
  int64_t n_docs = 0;
  double mean_len = 1;  // tokens per document, used to turn token weights into doc odds
  bool no_straddle = false;
  int64_t loss_last_tokens = 0;

  std::span<const int32_t> doc(int64_t d) const {
    size_t k = std::upper_bound(first_doc.begin(), first_doc.end(), d) - first_doc.begin() - 1;
    return shards[k].doc(d - first_doc[k]);
  }
};

// The resumable part of the packer: everything state() serialises.
struct PackState {
  uint64_t rng = 0;   // source-choice stream
  uint64_t rows = 0;  // global rows produced so far
  std::vector<double> weights;
  std::vector<uint64_t> epoch, pos;  // per source: permutation epoch and position in it
  int cur_src = -1;                  // document being consumed (-1: none)
  int64_t cur_doc = 0, cur_off = 0;
};

// Packs rows from the sources. Owns a cache of each source's current epoch permutation.
class Packer {
 public:
  Packer(const std::vector<Source>& src, uint64_t seed, PackState st)
      : src_(src),
        seed_(seed),
        st_(std::move(st)),
        perm_(src.size()),
        perm_epoch_(src.size(), ~0ull) {
    if (st_.cur_src >= 0) cur_ = src_[st_.cur_src].doc(st_.cur_doc);
  }

  const PackState& state() const { return st_; }

  // Writes one row of T tokens, targets and doc ids, copying whole document runs.
  void row(int64_t T, int32_t* tok, int32_t* tgt, int32_t* ids) {
    int32_t doc_id = 0;
    int64_t pad = T;  // first padding position (T: none)
    for (int64_t i = 0; i < T;) {
      if (ensure_doc() && i > 0) {
        ++doc_id;
        if (src_[size_t(st_.cur_src)].no_straddle && int64_t(cur_.size()) > T - i) {
          pad = i;  // the new document starts the next row (state: its offset is still 0)
          std::fill_n(tok + i, T - i, cur_[0]);
          std::fill_n(ids + i, T - i, doc_id);
          break;
        }
      }
      int64_t n = std::min<int64_t>(T - i, int64_t(cur_.size()) - st_.cur_off);
      std::copy_n(cur_.data() + st_.cur_off, n, tok + i);
      std::fill_n(ids + i, n, doc_id);
      if (const int64_t last = src_[size_t(st_.cur_src)].loss_last_tokens; last > 0) {
        // The target at document offset o is the token at o + 1: loss iff o + 1 is among
        // the document's last `last` tokens (the last token's target is the next document).
        const int64_t len = int64_t(cur_.size());
        for (int64_t k = 0; k < n; ++k) {
          const int64_t o = st_.cur_off + k;
          if (!(o + 1 < len && o + 1 >= len - last)) masked_.push_back(i + k);
        }
      }
      i += n;
      st_.cur_off += n;
    }
    std::copy_n(tok + 1, T - 1, tgt);
    if (pad < T) {
      std::fill_n(tgt + pad, T - pad, -1);
    } else {
      ensure_doc();  // the last target is the next row's first token (peeked, not consumed)
      tgt[T - 1] = cur_[st_.cur_off];
    }
    for (int64_t k : masked_) tgt[k] = -1;
    masked_.clear();
    ++st_.rows;
  }

 private:
  // Moves to the next document if the current one is used up; true if it moved.
  bool ensure_doc() {
    bool moved = false;
    while (st_.cur_src < 0 || st_.cur_off >= int64_t(cur_.size())) {
      next_doc();
      moved = true;
    }
    return moved;
  }

  void next_doc() {
    // Odds per document are weight / mean length, so the expected *token* share of each
    // source equals its normalised weight whatever its document lengths.
    double total = 0;
    for (size_t s = 0; s < src_.size(); ++s) total += st_.weights[s] / src_[s].mean_len;
    double u = uniform01(st_.rng) * total, acc = 0;
    size_t s = 0;
    for (; s + 1 < src_.size(); ++s) {
      acc += st_.weights[s] / src_[s].mean_len;
      if (u < acc && st_.weights[s] > 0) break;
    }
    while (st_.weights[s] <= 0) s = (s + src_.size() - 1) % src_.size();  // rounding at the end
    if (st_.pos[s] >= uint64_t(src_[s].n_docs)) {
      ++st_.epoch[s];
      st_.pos[s] = 0;
    }
    st_.cur_src = int(s);
    st_.cur_doc = permutation(s)[st_.pos[s]++];
    st_.cur_off = 0;
    cur_ = src_[s].doc(st_.cur_doc);
  }

  const std::vector<uint32_t>& permutation(size_t s) {
    if (perm_epoch_[s] != st_.epoch[s]) {
      auto& p = perm_[s];
      p.resize(src_[s].n_docs);
      std::iota(p.begin(), p.end(), 0u);
      uint64_t r =
          seed_ ^ (0xA24BAED4963EE407ull * (s + 1)) ^ (0x9FB21C651E98DF25ull * (st_.epoch[s] + 1));
      for (size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[splitmix64(r) % i]);
      perm_epoch_[s] = st_.epoch[s];
    }
    return perm_[s];
  }

  const std::vector<Source>& src_;
  uint64_t seed_;
  PackState st_;
  std::vector<std::vector<uint32_t>> perm_;
  std::vector<uint64_t> perm_epoch_;
  std::span<const int32_t> cur_;  // tokens of the current document
  std::vector<int64_t> masked_;    // row positions whose target carries no loss
};

void check_weights(const std::vector<double>& w, size_t n) {
  LLAMA3_CHECK(w.size() == n, "loader: {} weights given for {} sources", w.size(), n);
  double total = 0;
  for (double x : w) {
    LLAMA3_CHECK(x >= 0 && std::isfinite(x), "loader: weight {} is not a finite number >= 0", x);
    total += x;
  }
  LLAMA3_CHECK(total > 0, "loader: all {} source weights are zero", n);
}

}  // namespace

struct MixingLoader::Impl {
  LoaderConfig cfg;
  std::vector<Source> sources;
  PackState consumed;  // state after the last batch next() returned

  // Background prefetch: the worker packs batches ahead from its own Packer.
  std::thread worker;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<Batch, PackState>> queue;
  bool stop = false;
  std::exception_ptr error;

  std::pair<Batch, PackState> make_batch(Packer& p) {
    const int64_t B = cfg.batch_size, T = cfg.seq_len, dp = cfg.dp_size;
    Batch b;
    b.batch_size = B;
    b.seq_len = T;
    b.tokens.resize(B * T);
    b.targets.resize(B * T);
    b.doc_ids.resize(B * T);
    std::vector<int32_t> tok(T), tgt(T), ids(T);
    for (int64_t g = 0; g < B * dp; ++g) {
      int64_t local = g / dp;
      if (g % dp == cfg.dp_rank) {
        p.row(T, b.tokens.data() + local * T, b.targets.data() + local * T,
              b.doc_ids.data() + local * T);
      } else {
        p.row(T, tok.data(), tgt.data(), ids.data());
      }
    }
    return {std::move(b), p.state()};
  }

  void start() {
    if (cfg.prefetch <= 0) return;
    stop = false;
    worker = std::thread([this, packer = Packer(sources, cfg.seed, consumed)]() mutable {
      try {
        for (;;) {
          {
            std::unique_lock lk(mu);
            cv.wait(lk, [&] { return stop || int(queue.size()) < cfg.prefetch; });
            if (stop) return;
          }
          auto item = make_batch(packer);
          std::lock_guard lk(mu);
          queue.push_back(std::move(item));
          cv.notify_all();
        }
      } catch (...) {
        std::lock_guard lk(mu);
        error = std::current_exception();
        cv.notify_all();
      }
    });
  }

  void halt() {
    {
      std::lock_guard lk(mu);
      stop = true;
      cv.notify_all();
    }
    if (worker.joinable()) worker.join();
    queue.clear();
    error = nullptr;
  }
};

MixingLoader::MixingLoader(const LoaderConfig& cfg) : impl_(std::make_unique<Impl>()) {
  auto& I = *impl_;
  I.cfg = cfg;
  LLAMA3_CHECK(!cfg.sources.empty(), "loader: no sources configured");
  LLAMA3_CHECK(cfg.seq_len > 0 && cfg.batch_size > 0,
               "loader: seq_len {} and batch_size {} must be positive", cfg.seq_len,
               cfg.batch_size);
  LLAMA3_CHECK(cfg.dp_size > 0 && cfg.dp_rank >= 0 && cfg.dp_rank < cfg.dp_size,
               "loader: dp_rank {} is not in [0, dp_size {})", cfg.dp_rank, cfg.dp_size);
  std::vector<double> w;
  for (const auto& spec : cfg.sources) {
    Source s;
    s.name = spec.name;
    s.no_straddle = spec.no_straddle;
    s.loss_last_tokens = spec.loss_last_tokens;
    LLAMA3_CHECK(spec.loss_last_tokens >= 0, "loader: source '{}' has loss_last_tokens {} (must be >= 0)", spec.name,
                 spec.loss_last_tokens);
    LLAMA3_CHECK(!spec.shards.empty(), "loader: source '{}' lists no shards", spec.name);
    s.first_doc.push_back(0);
    int64_t tokens = 0;
    for (const auto& path : spec.shards) {
      s.shards.push_back(Shard::load(path));
      s.first_doc.push_back(s.first_doc.back() + s.shards.back().n_docs());
      tokens += s.shards.back().n_tokens();
    }
    s.n_docs = s.first_doc.back();
    LLAMA3_CHECK(tokens > 0,
                 "loader: source '{}' is empty: its {} shard(s) ({}, ...) hold no tokens",
                 spec.name, spec.shards.size(), spec.shards[0]);
    s.mean_len = double(tokens) / double(s.n_docs);
    w.push_back(spec.weight);
    I.sources.push_back(std::move(s));
  }
  check_weights(w, I.sources.size());
  I.consumed.rng = cfg.seed;
  I.consumed.weights = w;
  I.consumed.epoch.assign(I.sources.size(), 0);
  I.consumed.pos.assign(I.sources.size(), 0);
  I.start();
}

MixingLoader::~MixingLoader() {
  impl_->halt();
}

Batch MixingLoader::next() {
  auto& I = *impl_;
  if (I.cfg.prefetch <= 0) {
    Packer p(I.sources, I.cfg.seed, I.consumed);
    auto [b, st] = I.make_batch(p);
    I.consumed = std::move(st);
    return std::move(b);
  }
  std::unique_lock lk(I.mu);
  I.cv.wait(lk, [&] { return !I.queue.empty() || I.error; });
  if (I.queue.empty()) std::rethrow_exception(I.error);
  auto item = std::move(I.queue.front());
  I.queue.pop_front();
  I.cv.notify_all();
  I.consumed = std::move(item.second);
  return std::move(item.first);
}

void MixingLoader::set_weights(const std::vector<double>& weights) {
  auto& I = *impl_;
  check_weights(weights, I.sources.size());
  I.halt();  // batches prefetched under the old mix are dropped and re-packed
  I.consumed.weights = weights;
  I.start();
}

nlohmann::json MixingLoader::state() const {
  const auto& I = *impl_;
  const auto& s = I.consumed;
  nlohmann::json j;
  j["version"] = 1;
  j["seed"] = I.cfg.seed;
  j["seq_len"] = I.cfg.seq_len;
  j["rows"] = s.rows;
  j["rng"] = s.rng;
  j["weights"] = s.weights;
  j["sources"] = nlohmann::json::array();
  for (size_t k = 0; k < I.sources.size(); ++k) {
    j["sources"].push_back({{"name", I.sources[k].name},
                            {"n_docs", I.sources[k].n_docs},
                            {"epoch", s.epoch[k]},
                            {"pos", s.pos[k]}});
  }
  j["current"] = {{"source", s.cur_src}, {"doc", s.cur_doc}, {"offset", s.cur_off}};
  return j;
}

void MixingLoader::restore(const nlohmann::json& j) {
  auto& I = *impl_;
  PackState s;
  try {
    LLAMA3_CHECK(j.at("version").get<int>() == 1, "unsupported loader state version {}",
                 j.at("version").dump());
    LLAMA3_CHECK(j.at("seq_len").get<int64_t>() == I.cfg.seq_len,
                 "state was saved with seq_len {} but the loader has {}", j.at("seq_len").dump(),
                 I.cfg.seq_len);
    LLAMA3_CHECK(j.at("seed").get<uint64_t>() == I.cfg.seed,
                 "state was saved with seed {} but the loader has {}", j.at("seed").dump(),
                 I.cfg.seed);
    const auto& src = j.at("sources");
    LLAMA3_CHECK(src.size() == I.sources.size(), "state has {} sources, the loader {}", src.size(),
                 I.sources.size());
    for (size_t k = 0; k < I.sources.size(); ++k) {
      LLAMA3_CHECK(
          src[k].at("name") == I.sources[k].name && src[k].at("n_docs") == I.sources[k].n_docs,
          "state source {} is '{}' with {} documents, the loader's is '{}' with {}", k,
          src[k].at("name").dump(), src[k].at("n_docs").dump(), I.sources[k].name,
          I.sources[k].n_docs);
      s.epoch.push_back(src[k].at("epoch").get<uint64_t>());
      s.pos.push_back(src[k].at("pos").get<uint64_t>());
    }
    s.rows = j.at("rows").get<uint64_t>();
    s.rng = j.at("rng").get<uint64_t>();
    s.weights = j.at("weights").get<std::vector<double>>();
    const auto& cur = j.at("current");
    s.cur_src = cur.at("source").get<int>();
    s.cur_doc = cur.at("doc").get<int64_t>();
    s.cur_off = cur.at("offset").get<int64_t>();
    LLAMA3_CHECK(s.cur_src >= -1 && s.cur_src < int(I.sources.size()) &&
                     (s.cur_src < 0 || (s.cur_doc >= 0 && s.cur_doc < I.sources[s.cur_src].n_docs)),
                 "current document (source {}, doc {}) is out of range", s.cur_src, s.cur_doc);
  } catch (const nlohmann::json::exception& e) {
    fail("loader: malformed state: {}", e.what());
  } catch (const Error& e) {
    fail("loader: cannot restore: {}", e.what());
  }
  check_weights(s.weights, I.sources.size());
  I.halt();
  I.consumed = std::move(s);
  I.start();
}

}  // namespace llama3::data
