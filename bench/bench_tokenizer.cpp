// bench_tokenizer: encode throughput of llama3::text::Tokenizer against tiktoken on the same
// text and vocabulary. Measures one-thread encode (best of --reps), batch encode over 1 and 2
// OpenMP threads, runs bench/tokenizer_peer.py for tiktoken's figures, and prints the one
// comparable figure: ours / tiktoken single-thread throughput.
//
// usage: bench_tokenizer --vocab FILE --text FILE [--reps N] [--doc-bytes N]
//                        [--peer bench/tokenizer_peer.py | --no-peer]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "text/tokenizer/tokenizer.h"

namespace {

using llama3::text::Tokenizer;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename F>
double best_of(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

// Runs the Python peer and returns the value printed after `key`, or -1.
std::vector<std::pair<std::string, double>> run_peer(const std::string& cmd) {
  std::vector<std::pair<std::string, double>> out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char key[128];
  double v;
  while (std::fscanf(p, "%127s %lf", key, &v) == 2) out.emplace_back(key, v);
  pclose(p);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string vocab, text_path, peer = "bench/tokenizer_peer.py";
  int reps = 3;
  size_t doc_bytes = 16384;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--vocab")
      vocab = next();
    else if (a == "--text")
      text_path = next();
    else if (a == "--reps")
      reps = std::atoi(next().c_str());
    else if (a == "--doc-bytes")
      doc_bytes = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--peer")
      peer = next();
    else if (a == "--no-peer")
      peer.clear();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (vocab.empty() || text_path.empty()) {
    std::fprintf(stderr,
                 "usage: bench_tokenizer --vocab FILE --text FILE [--reps N] "
                 "[--doc-bytes N] [--peer PY | --no-peer]\n");
    return 2;
  }
  try {
    const Tokenizer tok = Tokenizer::load(vocab);
    std::ifstream in(text_path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    const double mb = text.size() / 1e6;
    llama3::text::EncodeOptions opts;
    opts.invalid_utf8 = llama3::text::InvalidUtf8::kReplace;

    size_t n_tokens = 0;
    omp_set_num_threads(1);
    tok.encode(text, opts);  // warm the page cache, allocator and merge cache
    const double single = best_of(reps, [&] { n_tokens = tok.encode(text, opts).size(); });

    std::vector<std::string> docs;
    for (size_t start = 0; start < text.size();) {
      size_t end = text.find('\n', start + doc_bytes);
      end = end == std::string::npos ? text.size() : end + 1;
      docs.push_back(text.substr(start, end - start));
      start = end;
    }
    std::vector<double> batch(3);
    for (int t = 1; t <= 2; ++t) {
      omp_set_num_threads(t);
      batch[t] = best_of(reps, [&] { tok.encode_batch(docs, opts); });
    }

    std::printf("text      %s: %.2f MB, %zu tokens (vocab %s, %d ranks)\n", text_path.c_str(), mb,
                n_tokens, vocab.c_str(), tok.n_base());
    std::printf("ours      single thread      %8.2f MB/s\n", mb / single);
    std::printf("ours      batch, 1 thread    %8.2f MB/s (%zu docs of ~%zu bytes)\n", mb / batch[1],
                docs.size(), doc_bytes);
    std::printf("ours      batch, 2 threads   %8.2f MB/s (scaling %.2fx)\n", mb / batch[2],
                batch[1] / batch[2]);
    if (peer.empty()) return 0;
    const std::string cmd = "/usr/bin/python3 " + peer + " '" + vocab + "' '" + text_path + "' " +
                            std::to_string(reps) + " " + std::to_string(doc_bytes);
    double peer_single = -1, peer_batch = -1, peer_tokens = -1;
    for (const auto& [k, v] : run_peer(cmd)) {
      if (k == "tiktoken_single_mbps") peer_single = v;
      if (k == "tiktoken_batch2_mbps") peer_batch = v;
      if (k == "tiktoken_tokens") peer_tokens = v;
    }
    if (peer_single <= 0) {
      std::printf("peer      not run (%s failed; is tiktoken installed?)\n", cmd.c_str());
      return 0;
    }
    std::printf("tiktoken  single thread      %8.2f MB/s (%.0f tokens)\n", peer_single,
                peer_tokens);
    std::printf("tiktoken  batch, 2 threads   %8.2f MB/s\n", peer_batch);
    std::printf("ratio ours/tiktoken single-thread encode: %.2fx\n", (mb / single) / peer_single);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: error: %s\n", e.what());
    return 1;
  }
}
