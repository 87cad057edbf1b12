#include "text/data/build.h"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "text/data/curate.h"
#include "text/data/shard.h"
#include "text/data/text_clean.h"

namespace llama3::data {
namespace fs = std::filesystem;
using json = nlohmann::json;

TokenizeStats tokenize_jsonl(const TextEncoder& enc, const std::string& in_path,
                             const std::string& out_path) {
  std::ifstream in(in_path, std::ios::binary);
  if (!in) fail("tokenize: cannot open {}", in_path);
  ShardWriter w(out_path, uint32_t(enc.vocab_size));
  TokenizeStats st;
  std::vector<std::string> texts;
  std::vector<int64_t> lines;
  auto flush = [&] {
    if (texts.empty()) return;
    std::vector<std::vector<int32_t>> ids;
    try {
      ids = enc.encode_batch(texts);
    } catch (const Error& e) {
      // Re-encode one by one to name the line at fault.
      for (size_t i = 0; i < texts.size(); ++i) {
        try {
          enc.encode_batch(std::span(&texts[i], 1));
        } catch (const Error& e1) {
          fail("tokenize {}:{}: {}", in_path, lines[i], e1.what());
        }
      }
      fail("tokenize {}: {}", in_path, e.what());
    }
    std::vector<int32_t> doc;
    for (size_t i = 0; i < ids.size(); ++i) {
      doc.clear();
      doc.push_back(enc.bos_id);
      doc.insert(doc.end(), ids[i].begin(), ids[i].end());
      doc.push_back(enc.eos_id);
      try {
        w.add(doc);
      } catch (const Error& e) {
        fail("tokenize {}:{}: {}", in_path, lines[i], e.what());
      }
      st.docs++;
      st.tokens += int64_t(doc.size());
    }
    texts.clear();
    lines.clear();
  };
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    size_t bad = find_invalid_utf8(line);
    if (bad != std::string::npos)
      fail("tokenize {}:{}: invalid UTF-8 at byte offset {} of the line", in_path, n, bad);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      fail("tokenize {}:{}: invalid JSONL line: {}", in_path, n, e.what());
    }
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      fail("tokenize {}:{}: expected an object with a string field \"text\"", in_path, n);
    texts.push_back(j["text"].get<std::string>());
    lines.push_back(n);
    if (texts.size() == 256) flush();
  }
  flush();
  if (st.docs == 0) fail("tokenize {}: empty source (no documents)", in_path);
  w.finish();
  return st;
}

TokenizeStats tokenize_jsonl(const text::Tokenizer& tok, const std::string& in_path,
                             const std::string& out_path) {
  TextEncoder enc;
  enc.encode_batch = [&tok](std::span<const std::string> texts) { return tok.encode_batch(texts); };
  enc.bos_id = tok.bos_id();
  enc.eos_id = tok.eos_id();
  enc.vocab_size = tok.vocab_size();
  return tokenize_jsonl(enc, in_path, out_path);
}

std::vector<SourceSpec> read_manifest_sources(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("manifest {}: cannot open", path);
  std::vector<SourceSpec> out;
  try {
    json j = json::parse(f);
    for (const auto& s : j.at("sources")) {
      out.push_back({s.at("name").get<std::string>(),
                     s.at("shards").get<std::vector<std::string>>(), s.at("weight").get<double>()});
    }
  } catch (const json::exception& e) {
    fail("manifest {}: {}", path, e.what());
  }
  if (out.empty()) fail("manifest {}: no sources", path);
  return out;
}

namespace {

std::string read_maybe_gz(const fs::path& p, size_t max_bytes) {
  gzFile f = gzopen(p.c_str(), "rb");
  if (!f) return {};
  std::string out(max_bytes, '\0');
  int n = gzread(f, out.data(), unsigned(max_bytes));
  gzclose(f);
  out.resize(n > 0 ? size_t(n) : 0);
  return out;
}

// Roff (man page source) to plain text: enough of man(7)/mdoc(7) for readable prose.
std::string roff_to_text(const std::string& src) {
  std::string out;
  auto inline_escapes = [](std::string_view s) {
    std::string r;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] != '\\' || i + 1 >= s.size()) {
        r.push_back(s[i]);
        continue;
      }
      char c = s[++i];
      if (c == 'f') {  // font: \fB, \f(CW, \f[B]
        if (i + 1 < s.size() && s[i + 1] == '(')
          i += 3;
        else if (i + 1 < s.size() && s[i + 1] == '[')
          i = std::min(s.size() - 1, s.find(']', i));
        else
          ++i;
      } else if (c == '(') {  // special character \(xx
        std::string_view n = s.substr(i + 1, 2);
        i += 2;
        if (n == "em" || n == "en")
          r += "-";
        else if (n == "aq" || n == "cq" || n == "oq")
          r += "'";
        else if (n == "dq" || n == "lq" || n == "rq")
          r += "\"";
        else if (n == "bu")
          r += "*";
        else if (n == "co")
          r += "(C)";
      } else if (c == '[') {
        size_t e = s.find(']', i);
        i = e == std::string_view::npos ? s.size() : e;
      } else if (c == '*') {  // string: \*(xx, \*[name], \*x
        if (i + 1 < s.size() && s[i + 1] == '(')
          i += 3;
        else if (i + 1 < s.size() && s[i + 1] == '[')
          i = std::min(s.size() - 1, s.find(']', i));
        else
          ++i;
      } else if (c == 's') {  // size: \s+2, \s0
        while (i + 1 < s.size() &&
               (s[i + 1] == '+' || s[i + 1] == '-' || std::isdigit((unsigned char)s[i + 1])))
          ++i;
      } else if (c == '-' || c == 'e' || c == '\\') {
        r.push_back(c == '-' ? '-' : '\\');
      } else if (c == ' ' || c == '~' || c == '0') {
        r.push_back(' ');
      } else if (c == '"') {
        break;  // comment to end of line
      }         // \& \c \% \| \^ and anything else: dropped
    }
    return r;
  };
  auto args = [&](std::string_view rest) {
    std::string r;
    bool q = false;
    for (char c : rest) {
      if (c == '"')
        q = !q;
      else
        r.push_back(c);
    }
    return inline_escapes(r);
  };
  // Macros whose arguments are running text (man(7) font macros; mdoc(7) semantic macros
  // are recognised by their Xx shape). Everything else is layout and is dropped.
  auto text_macro = [](std::string_view m) {
    static const std::string_view kMan[] = {"B",  "I",  "BR", "BI", "IB", "IR", "RB",
                                            "RI", "SM", "SB", "UR", "MT", "OP", "Nm"};
    for (auto k : kMan)
      if (m == k) return true;
    static const std::string_view kLayout[] = {"Vb", "Ve", "Bl", "El", "Bd", "Ed", "Dd",
                                               "Dt", "Os", "Bk", "Ek", "Rs", "Re"};
    for (auto k : kLayout)
      if (m == k) return false;
    return m.size() == 2 && std::isupper(static_cast<unsigned char>(m[0])) &&
           std::islower(static_cast<unsigned char>(m[1]));
  };
  std::string skip_until;  // inside a macro definition (..) or a conditional block (\})
  size_t p = 0;
  while (p < src.size()) {
    size_t e = src.find('\n', p);
    if (e == std::string::npos) e = src.size();
    std::string_view line(src.data() + p, e - p);
    p = e + 1;
    if (!skip_until.empty()) {
      if (line.find(skip_until) != std::string_view::npos) skip_until.clear();
      continue;
    }
    if (line.empty() || (line[0] != '.' && line[0] != '\'')) {
      out += inline_escapes(line);
      out.push_back('\n');
      continue;
    }
    size_t sp = line.find_first_of(" \t");
    std::string_view mac =
        line.substr(1, sp == std::string_view::npos ? std::string_view::npos : sp - 1);
    std::string_view rest = sp == std::string_view::npos ? std::string_view() : line.substr(sp + 1);
    if (mac == "de" || mac == "de1" || mac == "am" || mac == "ig") {
      skip_until = "..";
      continue;
    }
    if (line.find("\\{") != std::string_view::npos) {  // .if/.ie with a multi-line body
      if (line.find("\\}") == std::string_view::npos) skip_until = "\\}";
      continue;
    }
    if (mac == "SH" || mac == "SS" || mac == "Sh" || mac == "Ss") {
      out += "\n" + args(rest) + "\n";
    } else if (mac == "PP" || mac == "P" || mac == "LP" || mac == "TP" || mac == "Pp" ||
               mac == "sp" || mac == "IP" || mac == "br" || mac == "It") {
      out += "\n";
      if ((mac == "IP" || mac == "It") && !rest.empty()) out += args(rest) + " ";
    } else if (text_macro(mac) && !rest.empty()) {
      std::string a = args(rest);
      if (mac == "Fl") a = "-" + a;
      out += a + "\n";
    }
  }
  return out;
}

std::vector<fs::path> sorted_files(const fs::path& dir, bool recursive) {
  std::vector<fs::path> v;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return v;
  if (recursive) {
    for (auto it = fs::recursive_directory_iterator(
             dir, fs::directory_options::skip_permission_denied, ec);
         it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) break;
      if (it->is_regular_file(ec) && !it->is_symlink(ec)) v.push_back(it->path());
    }
  } else {
    for (auto& e : fs::directory_iterator(dir, ec))
      if (e.is_regular_file(ec) && !e.is_symlink(ec)) v.push_back(e.path());
  }
  std::sort(v.begin(), v.end());
  return v;
}

// Appends documents to a JSONL file until `budget` bytes of text are written.
class RawWriter {
 public:
  RawWriter(const fs::path& p, std::string source)
      : f_(p, std::ios::trunc), source_(std::move(source)) {
    LLAMA3_CHECK(f_.good(), "demo: cannot write {}", p.string());
  }
  bool full(int64_t budget) const { return bytes_ >= budget; }
  void add(const std::string& text, const std::string& url, const json& extra = json::object()) {
    if (text.find_first_not_of(" \t\n") == std::string::npos) return;
    json j = extra;
    std::string t = text;
    repair_utf8(t);  // raw files may be Latin-1; curation counts what it normalises
    j["text"] = t;
    j["url"] = url;
    j["source"] = source_;
    f_ << j.dump() << '\n';
    bytes_ += int64_t(t.size());
    docs_++;
  }
  int64_t docs() const { return docs_; }
  int64_t bytes() const { return bytes_; }

 private:
  std::ofstream f_;
  std::string source_;
  int64_t bytes_ = 0, docs_ = 0;
};

// Every k-th of the files, so a byte budget samples the whole tree rather than its first letters.
std::vector<fs::path> spread(std::vector<fs::path> v, size_t want) {
  if (v.size() <= want || want == 0) return v;
  std::vector<fs::path> r;
  double step = double(v.size()) / double(want);
  for (size_t i = 0; i < want; ++i) r.push_back(v[size_t(double(i) * step)]);
  return r;
}

void collect_general(RawWriter& w, int64_t budget) {
  // /usr/share/doc: copyright files (licences repeated across packages, maintainer
  // e-mails), READMEs, HTML pages and Debian changelogs (e-mails in every entry).
  std::vector<fs::path> docs;
  for (auto& p : sorted_files("/usr/share/doc", true)) {
    std::string n = p.filename().string();
    if (n == "copyright" || n.starts_with("README") || n.ends_with(".html") ||
        n == "changelog.Debian.gz" || n.ends_with(".txt") || n.ends_with(".md"))
      docs.push_back(p);
  }
  std::vector<fs::path> man;
  for (const char* sec : {"man1", "man5", "man7", "man8"})
    for (auto& p : sorted_files(fs::path("/usr/share/man") / sec, false)) man.push_back(p);
  docs = spread(docs, 500);
  man = spread(man, 400);
  size_t i = 0, j = 0;
  while (!w.full(budget) && (i < docs.size() || j < man.size())) {
    if (i < docs.size()) {
      auto& p = docs[i++];
      std::string t = read_maybe_gz(p, p.filename() == "changelog.Debian.gz" ? 3000 : 12000);
      w.add(t, "file://" + p.string());
    }
    if (j < man.size() && !w.full(budget)) {
      auto& p = man[j++];
      std::string src = read_maybe_gz(p, 16000);
      if (src.starts_with(".so ")) continue;  // a link to another page
      w.add(roff_to_text(src), "file://" + p.string());
    }
  }
}

void collect_code(RawWriter& w, int64_t budget) {
  std::vector<fs::path> files;
  for (auto& p : sorted_files("/usr/include", false))
    if (p.extension() == ".h") files.push_back(p);
  std::vector<fs::path> py;
  for (auto& p : sorted_files("/usr/lib/python3.11", false))
    if (p.extension() == ".py") py.push_back(p);
  if (py.empty())
    for (auto& p : sorted_files("/usr/lib/python3/dist-packages", true))
      if (p.extension() == ".py") py.push_back(p);
  files = spread(files, 150);
  py = spread(py, 150);
  size_t i = 0, j = 0;
  while (!w.full(budget) && (i < files.size() || j < py.size())) {
    if (i < files.size()) w.add(read_maybe_gz(files[i], 8000), "file://" + files[i].string()), ++i;
    if (j < py.size() && !w.full(budget))
      w.add(read_maybe_gz(py[j], 8000), "file://" + py[j].string()), ++j;
  }
}

void collect_multilingual(RawWriter& w, int64_t budget, std::vector<LabelledText>* lang_examples) {
  std::vector<std::pair<std::string, fs::path>> pages;
  for (const char* lang :
       {"de", "fr", "ru", "es", "it", "pt", "pl", "nl", "sv", "ja", "ko", "cs"}) {
    std::vector<fs::path> v;
    for (const char* sec : {"man1", "man5", "man8"})
      for (auto& p : sorted_files(fs::path("/usr/share/man") / lang / sec, false)) v.push_back(p);
    for (auto& p : spread(v, 40)) pages.emplace_back(lang, p);
  }
  // Interleave languages so the budget covers all of them.
  std::map<std::string, std::vector<fs::path>> by_lang;
  for (auto& [l, p] : pages) by_lang[l].push_back(p);
  for (size_t k = 0; !w.full(budget); ++k) {
    bool any = false;
    for (auto& [lang, v] : by_lang) {
      if (k >= v.size() || w.full(budget)) continue;
      any = true;
      std::string src = read_maybe_gz(v[k], 12000);
      if (src.starts_with(".so ")) continue;
      std::string t = roff_to_text(src);
      repair_utf8(t);
      w.add(t, "file://" + v[k].string(), {{"lang_hint", lang}});
      if (lang_examples && k % 2 == 0) lang_examples->push_back({t.substr(0, 3000), lang});
    }
    if (!any) break;
  }
}

// Arithmetic word problems with verifiable answers (also saved as {"question","answer"}
// for rejection sampling / DPO rewards later in the recipe).
void generate_math(RawWriter& w, int64_t n, uint64_t seed, const fs::path& problems_path) {
  std::ofstream pf(problems_path, std::ios::trunc);
  static const char* kNames[] = {"Ava",   "Ben",  "Chloe", "Dev",   "Elena", "Farid",
                                 "Grace", "Hiro", "Ines",  "Jonas", "Kemi",  "Liam",
                                 "Mara",  "Noah", "Omar",  "Priya"};
  static const char* kItems[] = {"apples",  "marbles", "books", "stamps",
                                 "pencils", "coins",   "cards", "shells"};
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  auto rnd = [&](int lo, int hi) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return lo + int((s >> 33) % uint64_t(hi - lo + 1));
  };
  for (int64_t i = 0; i < n; ++i) {
    std::string name = kNames[rnd(0, 15)], item = kItems[rnd(0, 7)];
    int a = rnd(2, 99), b = rnd(2, 60), c = rnd(1, 40), kind = rnd(0, 4);
    std::string q, sol;
    long ans = 0;
    switch (kind) {
      case 0:
        c = std::min(c, a + b);
        q = fmt::format(
            "{} has {} {}. {} gets {} more and then gives away {}. How many {} does {} have now?",
            name, a, item, name, b, c, item, name);
        ans = a + b - c;
        sol = fmt::format(
            "Start with {}. After getting {} more: {} + {} = {}. After giving away {}: {} - {} = "
            "{}.",
            a, b, a, b, a + b, c, a + b, c, ans);
        break;
      case 1:
        q = fmt::format("A box holds {} {}. How many {} are in {} boxes?", a, item, item, b);
        ans = long(a) * b;
        sol = fmt::format("Each box holds {}, so {} boxes hold {} x {} = {}.", a, b, a, b, ans);
        break;
      case 2:
        q = fmt::format(
            "{} shares {} {} equally among {} friends. How many {} does each friend get?", name,
            long(a) * b, item, b, item);
        ans = a;
        sol = fmt::format("Divide {} by {}: {} / {} = {}.", long(a) * b, b, long(a) * b, b, ans);
        break;
      case 3:
        q = fmt::format("What is {} + {} x {}?", a, b, c);
        ans = a + long(b) * c;
        sol = fmt::format("Multiplication comes first: {} x {} = {}. Then {} + {} = {}.", b, c,
                          long(b) * c, a, long(b) * c, ans);
        break;
      default:
        q = fmt::format(
            "{} reads {} pages a day for {} days and then {} more pages. How many pages in total?",
            name, b, c % 12 + 2, a);
        ans = long(b) * (c % 12 + 2) + a;
        sol = fmt::format(
            "{} pages a day for {} days is {} x {} = {}. Adding {} gives {} + {} = {}.", b,
            c % 12 + 2, b, c % 12 + 2, long(b) * (c % 12 + 2), a, long(b) * (c % 12 + 2), a, ans);
    }
    w.add(fmt::format("Question: {}\nSolution: {}\nAnswer: {}", q, sol, ans),
          fmt::format("generated://math/{}", i));
    pf << json({{"question", q}, {"answer", std::to_string(ans)}}).dump() << '\n';
  }
}

// Low-quality examples for the quality classifier: the kinds of text the paper's filters
// remove (navigation boilerplate, keyword spam, word salad).
std::vector<std::string> junk(int n, uint64_t seed) {
  static const char* kMenu[] = {"Home",  "About",      "Contact",   "Login",   "Sign up", "Cart",
                                "FAQ",   "Privacy",    "Terms",     "Careers", "Blog",    "Shop",
                                "Deals", "Click here", "Subscribe", "Share"};
  static const char* kSpam[] = {"cheap",  "best",    "free",  "buy",   "online", "discount",
                                "casino", "win",     "now",   "offer", "deal",   "top",
                                "sale",   "limited", "bonus", "click"};
  uint64_t s = seed;
  auto rnd = [&](int n) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return int((s >> 33) % uint64_t(n));
  };
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    std::string t;
    int len = 20 + rnd(80);
    for (int k = 0; k < len; ++k) {
      if (i % 2 == 0)
        t += std::string(kMenu[rnd(16)]) + (rnd(3) ? " | " : "\n");
      else
        t += std::string(kSpam[rnd(16)]) + (rnd(8) ? " " : "!!! ");
    }
    out.push_back(t);
  }
  return out;
}

void write_examples(const fs::path& p, const std::vector<LabelledText>& ex) {
  std::ofstream f(p, std::ios::trunc);
  for (const auto& e : ex) {
    std::string t = e.text;
    repair_utf8(t);
    f << json({{"text", t}, {"label", e.label}}).dump() << '\n';
  }
}

std::vector<LabelledText> sample_examples(const fs::path& jsonl, const std::string& label,
                                          int every, size_t max_chars) {
  std::vector<LabelledText> out;
  std::ifstream f(jsonl);
  std::string line;
  for (int n = 0; std::getline(f, line); ++n) {
    if (n % every) continue;
    auto j = json::parse(line);
    out.push_back({j["text"].get<std::string>().substr(0, max_chars), label});
  }
  return out;
}

}  // namespace

std::string build_demo(const DemoOptions& o) {
  auto t0 = std::chrono::steady_clock::now();
  auto secs = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  fs::path dir = o.out_dir;
  fs::create_directories(dir / "raw");
  fs::create_directories(dir / "classifiers");
  fs::create_directories(dir / "shards");
  fs::create_directories(dir / "text");

  // 1. Raw documents per source.
  std::vector<LabelledText> lang_ex;
  {
    RawWriter g(dir / "raw/general.jsonl", "general");
    collect_general(g, o.general_bytes);
    RawWriter c(dir / "raw/code.jsonl", "code");
    collect_code(c, o.code_bytes);
    RawWriter m(dir / "raw/math.jsonl", "math");
    generate_math(m, o.math_problems, o.seed, dir / "math_problems.jsonl");
    RawWriter l(dir / "raw/multilingual.jsonl", "multilingual");
    collect_multilingual(l, o.multilingual_bytes, &lang_ex);
    for (auto* w : {&g, &c, &m, &l})
      if (w->docs() == 0)
        fail(
            "demo: a source found no documents on this machine (general needs /usr/share/doc or "
            "man pages, "
            "code /usr/include, multilingual translated man pages: see scripts/setup.sh)");
    fmt::print(
        "demo: raw general {} docs {} B, code {} docs {} B, math {} docs, multilingual {} docs {} "
        "B ({:.1f} s)\n",
        g.docs(), g.bytes(), c.docs(), c.bytes(), m.docs(), l.docs(), l.bytes(), secs());
  }

  // 2. Classifier training sets: domain (by source), language (by man page directory),
  // quality (prose vs generated junk).
  std::vector<LabelledText> dom;
  for (const char* s : {"general", "code", "math", "multilingual"}) {
    auto ex = sample_examples(dir / "raw" / (std::string(s) + ".jsonl"), s, 3, 3000);
    dom.insert(dom.end(), ex.begin(), ex.end());
  }
  write_examples(dir / "classifiers/domain_train.jsonl", dom);
  for (auto& e : sample_examples(dir / "raw/general.jsonl", "en", 4, 3000)) lang_ex.push_back(e);
  for (auto& e : sample_examples(dir / "raw/math.jsonl", "en", 20, 3000)) lang_ex.push_back(e);
  write_examples(dir / "classifiers/language_train.jsonl", lang_ex);
  std::vector<LabelledText> qual;
  for (auto& e : sample_examples(dir / "raw/general.jsonl", "hq", 2, 3000)) qual.push_back(e);
  for (auto& t : junk(int(qual.size()), o.seed)) qual.push_back({t, "lq"});
  write_examples(dir / "classifiers/quality_train.jsonl", qual);

  // 3. Curation.
  json cfg = {{"inputs",
               json::array({{{"path", (dir / "raw/general.jsonl").string()}, {"source", "general"}},
                            {{"path", (dir / "raw/code.jsonl").string()}, {"source", "code"}},
                            {{"path", (dir / "raw/math.jsonl").string()}, {"source", "math"}},
                            {{"path", (dir / "raw/multilingual.jsonl").string()},
                             {"source", "multilingual"}}})},
              {"output", (dir / "curated.jsonl").string()},
              {"report", (dir / "curate_report.json").string()},
              {"rejected", (dir / "rejected.jsonl").string()},
              {"line_dedup",
               {{"bucket_docs", 1000},
                {"max_count", 6},
                {"min_chars", 20},
                {"only_sources", {"general", "multilingual"}}}},
              {"pii", {{"action", "redact"}}},
              {"minhash", {{"shingle", 5}, {"bands", 16}, {"rows", 8}, {"threshold", 0.8}}},
              {"blocklist", {{"domains", {"example-spam.test"}}, {"keywords", {"casino bonus"}}}},
              {"heuristics",
               {{"min_chars", 80},
                {"min_words", 10},
                {"max_dup_ngram_fraction", 0.6},
                {"dirty_words", {"porn", "xxx", "viagra", "casino"}},
                {"max_dirty_words", 2},
                {"max_kl", 4.5},
                // The multilingual slice is far from the (English) corpus distribution by design.
                {"only_sources", {"general"}}}},
              {"quality",
               {{"train", (dir / "classifiers/quality_train.jsonl").string()},
                {"model", (dir / "classifiers/quality.bin").string()},
                {"buckets_log2", 16},
                {"label", "hq"},
                {"min_score", 0.3},
                {"only_sources", {"general"}}}},
              {"language",
               {{"train", (dir / "classifiers/language_train.jsonl").string()},
                {"model", (dir / "classifiers/language.bin").string()},
                {"buckets_log2", 16}}},
              {"domain",
               {{"train", (dir / "classifiers/domain_train.jsonl").string()},
                {"model", (dir / "classifiers/domain.bin").string()},
                {"buckets_log2", 16}}}};
  {
    std::ofstream f(dir / "curate.json", std::ios::trunc);
    f << cfg.dump(2) << '\n';
  }
  CurateReport rep = curate(CurateConfig::from_json(cfg, (dir / "curate.json").string()));
  fmt::print("{}", rep.table());

  // 4. Split by source; every eval_every-th document is held out.
  std::map<std::string, std::ofstream> split;
  const std::vector<std::string> sources = {"general", "math", "code", "multilingual"};
  for (const auto& s : sources) split[s].open(dir / "text" / (s + ".jsonl"), std::ios::trunc);
  std::ofstream eval(dir / "text/eval.jsonl", std::ios::trunc);
  std::map<std::string, std::ofstream> plain;  // plain text for tokenizer training
  for (const auto& s : sources) plain[s].open(dir / "text" / (s + ".txt"), std::ios::trunc);
  {
    std::ifstream f(dir / "curated.jsonl");
    std::string line;
    for (int64_t n = 0; std::getline(f, line); ++n) {
      json j = json::parse(line);
      std::string src = j.value("source", "general");
      if (!split.count(src)) src = "general";
      if (o.eval_every > 0 && n % o.eval_every == o.eval_every - 1) {
        eval << line << '\n';
      } else {
        split[src] << line << '\n';
        plain[src] << j["text"].get<std::string>() << "\n\n";
      }
    }
  }
  for (auto& [k, f] : split) f.close();
  for (auto& [k, f] : plain) f.close();
  eval.close();

  // 5. Tokenizer.
  std::vector<std::string> corpus;
  for (const auto& s : sources) corpus.push_back((dir / "text" / (s + ".txt")).string());
  text::BpeTrainOptions bo;
  bo.vocab_size = o.vocab_size;
  bo.max_bytes = 2 << 20;  // keeps BPE training to seconds; the curated text is ~2.5 MB
  std::string tok_path = (dir / "tokenizer.model").string();
  text::train_bpe(corpus, bo, tok_path);
  auto tok = text::Tokenizer::load(tok_path);
  fmt::print("demo: tokenizer {} (vocab {}) ({:.1f} s)\n", tok_path, tok.vocab_size(), secs());

  // 6. Shards and manifest.
  const std::map<std::string, double> weights = {
      {"general", 0.50}, {"math", 0.25}, {"code", 0.17}, {"multilingual", 0.08}};
  json man = {
      {"tokenizer", tok_path}, {"vocab_size", tok.vocab_size()}, {"sources", json::array()}};
  for (const auto& s : sources) {
    std::string shard = (dir / "shards" / (s + ".shard")).string();
    auto st = tokenize_jsonl(tok, (dir / "text" / (s + ".jsonl")).string(), shard);
    man["sources"].push_back({{"name", s},
                              {"shards", {shard}},
                              {"weight", weights.at(s)},
                              {"docs", st.docs},
                              {"tokens", st.tokens}});
    fmt::print("demo: shard {:<13} {:>6} docs {:>9} tokens\n", s, st.docs, st.tokens);
  }
  std::string eval_shard = (dir / "shards/eval.shard").string();
  auto est = tokenize_jsonl(tok, (dir / "text/eval.jsonl").string(), eval_shard);
  man["eval"] = {{"shards", {eval_shard}}, {"docs", est.docs}, {"tokens", est.tokens}};
  man["curation_report"] = (dir / "curate_report.json").string();
  man["math_problems"] = (dir / "math_problems.jsonl").string();
  man["seconds"] = secs();
  std::string text = man.dump(2);
  std::ofstream(dir / "manifest.json", std::ios::trunc) << text << '\n';
  fmt::print("demo: eval shard {} docs {} tokens; wrote {} ({:.1f} s)\n", est.docs, est.tokens,
             (dir / "manifest.json").string(), secs());
  return text;
}

}  // namespace llama3::data
