// Curation: text cleaning, PII, MinHash, the hashed classifier and the pipeline end to end.
#include <gtest/gtest.h>
#include <omp.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "text/data/classifier.h"
#include "text/data/curate.h"
#include "text/data/minhash.h"
#include "text/data/pii.h"
#include "text/data/text_clean.h"

#include "scratch.h"

namespace fs = std::filesystem;
using namespace llama3::data;
using json = nlohmann::json;

namespace {

fs::path tmpdir() { return llama3::testing::scratch_dir("curate"); }

std::string write_file(const std::string& name, const std::string& content) {
  return llama3::testing::write_scratch_file("curate", name, content);
}

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const llama3::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A deterministic English-like paragraph of n words; different seeds give different text.
std::string prose(int n, int seed) {
  static const char* kWords[] = {
      "the",    "system", "reads",   "files",  "from",  "disk",   "and",    "writes",
      "small",  "blocks", "to",      "memory", "when",  "a",      "user",   "asks",
      "for",    "data",   "quickly", "every",  "line",  "counts", "twice",  "before",
      "output", "ends",   "with",    "clear",  "notes", "about",  "errors", "found"};
  std::string s;
  uint64_t x = uint64_t(seed) * 2654435761u + 1;
  for (int i = 0; i < n; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    s += kWords[(x >> 33) % 32];
    s += (i % 12 == 11) ? ".\n" : " ";
  }
  return s;
}

std::string jsonl(const std::vector<json>& docs) {
  std::string s;
  for (const auto& d : docs) s += d.dump() + "\n";
  return s;
}

std::vector<json> read_jsonl(const std::string& p) {
  std::vector<json> v;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) v.push_back(json::parse(line));
  return v;
}

}  // namespace

// ------------------------------------------------------------------ text cleaning

TEST(HtmlToText, DropsBoilerplateKeepsCodeAndMath) {
  std::string html =
      R"HTML(<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style></head>
<body><nav><a href="/">Home</a> | <a>About</a></nav>
<div class="cookie-banner">We use cookies</div>
<h1>Sorting &amp; searching</h1>
<p>Binary   search
 halves the range.</p>
<pre><code>int mid = lo + (hi - lo) / 2;
    return mid;</code></pre>
<p>Cost is <math alttext="O(\log n)"><mi>O</mi></math> and <script type="math/tex">n^2</script> worst.</p>
<script>var tracking = 1;</script>
<ul><li>one</li><li>two</li></ul>
<footer>Copyright 2024 Example Corp</footer></body></html>)HTML";
  ASSERT_TRUE(looks_like_html(html));
  std::string t = html_to_text(html);
  EXPECT_EQ(t,
            "Sorting & searching\n"
            "Binary search halves the range.\n"
            "int mid = lo + (hi - lo) / 2;\n"
            "    return mid;\n"
            "Cost is $O(\\log n)$ and $n^2$ worst.\n"
            "- one\n"
            "- two");
}

TEST(HtmlToText, CodeBlocksCanBeDropped) {
  HtmlOptions o;
  o.keep_code = false;
  EXPECT_EQ(html_to_text("<p>Before</p><pre>x = 1</pre><p>after <code>y</code> end</p>", o),
            "Before\nafter end");
}

TEST(HtmlToText, DecodesNumericAndNamedEntities) {
  // Unknown or unterminated entities stay as written.
  EXPECT_EQ(html_to_text("<p>a&lt;b &#65;&#x42; caf&eacute; x&nbsp;y &bogus; &amp</p>"),
            "a<b AB caf\u00e9 x y &bogus; &amp");
}

TEST(NormalizeText, MapsUnicodeSpacesAndCollapsesWhitespaceKeepingIndentation) {
  NormalizeStats st;
  std::string in =
      "  def f():\r\n      return  1\u00a0+\u200b 2   \n\n\n\nＡＢＣ \xef\xac\x81nd\t\n";
  EXPECT_EQ(normalize_text(in, &st), "  def f():\n      return 1 + 2\n\nABC find");
  EXPECT_EQ(st.chars_removed, 1u);  // the zero-width space
  EXPECT_EQ(st.chars_mapped, 5u);   // NBSP, three fullwidth letters, the fi ligature
}

TEST(Utf8, FindsAndRepairsInvalidSequences) {
  std::string ok = "caf\xc3\xa9 \xe2\x82\xac";
  EXPECT_EQ(find_invalid_utf8(ok), std::string::npos);
  std::string bad =
      "ab\xff"
      "cd\xc3";  // a stray byte and a truncated sequence
  EXPECT_EQ(find_invalid_utf8(bad), 2u);
  EXPECT_EQ(find_invalid_utf8("\xc0\xaf"), 0u);      // overlong '/'
  EXPECT_EQ(find_invalid_utf8("\xed\xa0\x80"), 0u);  // surrogate
  EXPECT_EQ(repair_utf8(bad), 2u);
  EXPECT_EQ(bad,
            "ab\xef\xbf\xbd"
            "cd\xef\xbf\xbd");
}

// ------------------------------------------------------------------ PII

TEST(Pii, RedactsEmailsPhonesIpsAndLuhnValidCards) {
  PiiScanner scan;
  std::string t =
      "Mail jane.doe+x@mail.example.org or call +1 415-555-0132 / (212) 555-0199. "
      "Server 192.168.10.20, card 4111 1111 1111 1111, not a card 4111 1111 1111 1112, "
      "version 4.5.0.1, year 2023-10-12.";
  PiiCounts n = scan.redact(t);
  EXPECT_EQ(n.email, 1);
  EXPECT_EQ(n.phone, 2);
  EXPECT_EQ(n.ip, 1);
  EXPECT_EQ(n.credit_card, 1);
  EXPECT_EQ(t,
            "Mail [EMAIL] or call [PHONE] / [PHONE]. Server [IP], card [CARD], not a card "
            "4111 1111 1111 1112, version 4.5.0.1, year 2023-10-12.");
}

TEST(Pii, LuhnChecksum) {
  EXPECT_TRUE(luhn_valid("4111111111111111"));
  EXPECT_TRUE(luhn_valid("5500-0000-0000-0004"));
  EXPECT_FALSE(luhn_valid("4111111111111112"));
  EXPECT_FALSE(luhn_valid("0000"));  // too short to be a card
}

TEST(Pii, KindsCanBeSwitchedOff) {
  PiiKinds k;
  k.email = false;
  PiiScanner scan(k);
  std::string t = "a@b.com 10.0.0.1";
  PiiCounts n = scan.redact(t);
  EXPECT_EQ(n.email, 0);
  EXPECT_EQ(t, "a@b.com [IP]");
}

// ------------------------------------------------------------------ MinHash

TEST(MinHash, FlagsNearDuplicatesKeepsDistinctDocuments) {
  MinHashDedup mh({.shingle = 5, .bands = 16, .rows = 8, .threshold = 0.8});
  std::string a = prose(400, 1), b = prose(400, 2);
  std::string a2 = a;
  a2.replace(a2.find("the"), 3, "one");  // a single-word edit
  bool kept = false;
  EXPECT_EQ(mh.check_and_insert(a, &kept), 0.0);
  EXPECT_TRUE(kept);
  mh.check_and_insert(b, &kept);
  EXPECT_TRUE(kept);
  double sim = mh.check_and_insert(a2, &kept);
  EXPECT_FALSE(kept);
  EXPECT_GT(sim, 0.9);
  EXPECT_EQ(mh.check_and_insert(b, &kept), 1.0);
  EXPECT_FALSE(kept);
  EXPECT_EQ(mh.size(), 2u);
  // Signature agreement estimates Jaccard: unrelated texts agree on few rows.
  auto sa = mh.signature(a), sb = mh.signature(b);
  EXPECT_LT(MinHashDedup::similarity(sa, sb.data()), 0.3);
}

// ------------------------------------------------------------------ classifier

TEST(HashedClassifier, LearnsLanguagesAndRoundTripsThroughAFile) {
  std::vector<LabelledText> data;
  const char* en[] = {"the cat sits on the mat and looks at the door",
                      "we read the book in the evening", "this program prints the list of files",
                      "open the window when it is warm"};
  const char* de[] = {"die Katze sitzt auf der Matte und schaut zur Tür",
                      "wir lesen das Buch am Abend", "dieses Programm zeigt die Liste der Dateien",
                      "öffne das Fenster, wenn es warm ist"};
  for (int rep = 0; rep < 5; ++rep)
    for (int i = 0; i < 4; ++i) data.push_back({en[i], "en"}), data.push_back({de[i], "de"});
  auto c = HashedClassifier::train(data, {.buckets_log2 = 14, .epochs = 10});
  EXPECT_EQ(c.labels(), (std::vector<std::string>{"en", "de"}));
  EXPECT_EQ(c.accuracy(data), 1.0);
  EXPECT_EQ(c.top("the list of the files in the window").first, "en");
  EXPECT_EQ(c.top("die Liste der Dateien im Fenster").first, "de");
  std::string path = (tmpdir() / "lang.bin").string();
  c.save(path);
  auto d = HashedClassifier::load(path);
  EXPECT_EQ(d.predict("wir lesen"), c.predict("wir lesen"));
  std::string bytes = read_file(path);
  write_file("lang_trunc.bin", bytes.substr(0, bytes.size() / 2));
  EXPECT_NE(error_of([&] {
              HashedClassifier::load((tmpdir() / "lang_trunc.bin").string());
            }).find("truncated"),
            std::string::npos);
  write_file("not_a_model.bin", "hello world, not a model at all");
  EXPECT_NE(error_of([&] {
              HashedClassifier::load((tmpdir() / "not_a_model.bin").string());
            }).find("bad magic"),
            std::string::npos);
}

TEST(HashedClassifier, ExampleFileErrorsNameTheLine) {
  std::string p =
      write_file("ex.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n");
  std::string e = error_of([&] { HashedClassifier::read_examples(p); });
  EXPECT_NE(e.find("ex.jsonl:2"), std::string::npos) << e;
}

// ------------------------------------------------------------------ the pipeline

namespace {

// A small corpus exercising every stage; returns the config.
CurateConfig small_corpus(const std::string& tag) {
  std::string boiler = "Subscribe to our newsletter for weekly updates on every topic";
  std::vector<json> docs;
  for (int i = 0; i < 10; ++i) {
    docs.push_back({{"text", prose(150, 100 + i) + "\n" + boiler},
                    {"url", "https://site.test/" + std::to_string(i)},
                    {"source", "general"},
                    {"id", i}});
  }
  docs.push_back({{"text", prose(150, 100)}, {"url", "https://site.test/0"}});  // same URL as doc 0
  docs.push_back(
      {{"text", prose(150, 105) + "\n" + boiler}, {"url", "https://b.test/5"}});  // exact copy of 5
  std::string near = prose(150, 106);
  near.replace(near.find("the"), 3, "one");
  docs.push_back({{"text", near + "\n" + boiler}, {"url", "https://b.test/6"}});  // near copy of 6
  docs.push_back({{"text", "Contact me at someone@example.com. " + prose(60, 200)},
                  {"url", "https://c.test/1"}});
  docs.push_back({{"text", "too short"}, {"url", "https://c.test/2"}});
  docs.push_back({{"text", prose(60, 300)}, {"url", "https://spam.test/x"}});  // blocked domain
  docs.push_back(
      {{"text", "buy casino chips " + prose(60, 301)}, {"url", "https://c.test/3"}});  // keyword
  std::string rep;
  for (int i = 0; i < 20; ++i) rep += "buy now and save more today ";
  docs.push_back({{"text", rep}, {"url", "https://c.test/4"}});  // duplicated n-grams
  docs.push_back(
      {{"text", "<html><body><nav>Menu</nav><p>" + prose(60, 400) + "</p></body></html>"},
       {"url", "https://c.test/5"}});
  std::string in = write_file(tag + ".jsonl", jsonl(docs));
  json cfg = {
      {"inputs", {{{"path", in}, {"source", "general"}}}},
      {"output", (tmpdir() / (tag + "_out.jsonl")).string()},
      {"line_dedup", {{"bucket_docs", 100}, {"max_count", 6}}},
      {"blocklist", {{"domains", {"spam.test"}}, {"keywords", {"casino"}}}},
      {"minhash", {{"shingle", 5}, {"bands", 16}, {"rows", 8}, {"threshold", 0.8}}},
      {"heuristics", {{"min_chars", 50}, {"min_words", 5}, {"max_dup_ngram_fraction", 0.5}}}};
  return CurateConfig::from_json(cfg, "test");
}

}  // namespace

TEST(Curate, EveryStageReportsWhatItDroppedAndWhy) {
  CurateConfig cfg = small_corpus("corpus");
  CurateReport rep = curate(cfg);
  EXPECT_EQ(rep.docs_in, 19);
  EXPECT_EQ(rep.stage("extract")->found.at("html_documents"), 1);
  EXPECT_EQ(rep.stage("blocklist")->dropped_by.at("blocked_domain"), 1);
  EXPECT_EQ(rep.stage("blocklist")->dropped_by.at("blocked_keyword"), 1);
  EXPECT_EQ(rep.stage("url_dedup")->dropped_by.at("duplicate_url"), 1);
  // The newsletter line is in 12 documents (> 6): removed from every one of them.
  EXPECT_EQ(rep.stage("line_dedup")->found.at("lines_removed"), 12);
  EXPECT_EQ(rep.stage("pii")->found.at("email"), 1);
  EXPECT_EQ(rep.stage("minhash")->dropped_by.at("exact_duplicate"), 1);
  EXPECT_EQ(rep.stage("minhash")->dropped_by.at("near_duplicate"), 1);
  EXPECT_EQ(rep.stage("heuristics")->dropped_by.at("too_short"), 1);
  EXPECT_EQ(rep.stage("heuristics")->dropped_by.at("duplicated_ngrams"), 1);
  EXPECT_EQ(rep.docs_out, 19 - 7);

  auto out = read_jsonl(cfg.output);
  ASSERT_EQ(int64_t(out.size()), rep.docs_out);
  for (const auto& d : out) {
    std::string t = d["text"];
    EXPECT_EQ(t.find("Subscribe to our newsletter"), std::string::npos);
    EXPECT_EQ(t.find("someone@example.com"), std::string::npos);
    EXPECT_EQ(d["source"], "general");
  }
  EXPECT_EQ(out[0]["id"], 0);  // other fields pass through
  EXPECT_FALSE(fs::exists(cfg.output + ".tmp"));
  json r = json::parse(read_file(cfg.report));
  EXPECT_EQ(r["docs_out"], rep.docs_out);
  EXPECT_NE(rep.table().find("near_duplicate=1"), std::string::npos);
}

TEST(Curate, RerunAfterAnInterruptionGivesTheSameOutput) {
  CurateConfig cfg = small_corpus("rerun");
  curate(cfg);
  std::string first = read_file(cfg.output);
  // An interrupted run leaves only a stale temp file; the rerun replaces it and the output
  // is byte-identical (no duplicated or lost documents).
  write_file("rerun_out.jsonl.tmp", "{\"text\": \"half a line");
  curate(cfg);
  EXPECT_EQ(read_file(cfg.output), first);
  EXPECT_FALSE(fs::exists(cfg.output + ".tmp"));
}

TEST(Curate, PiiCanDropInsteadOfRedact) {
  CurateConfig cfg = small_corpus("piidrop");
  cfg.pii.action = "drop";
  auto rep = curate(cfg);
  EXPECT_EQ(rep.stage("pii")->dropped_by.at("pii"), 1);
}

TEST(Curate, KlOutliersAreDropped) {
  std::vector<json> docs;
  for (int i = 0; i < 30; ++i) docs.push_back({{"text", prose(120, i)}});
  std::string odd;
  for (int i = 0; i < 120; ++i) odd += "zq" + std::to_string(i * 7919 % 1000) + " ";
  docs.push_back({{"text", odd}});
  json cfg = {
      {"inputs", {{{"path", write_file("kl.jsonl", jsonl(docs))}}}},
      {"output", (tmpdir() / "kl_out.jsonl").string()},
      {"minhash", {{"enabled", false}}},
      {"heuristics", {{"max_kl", 2.0}, {"kl_min_words", 50}, {"max_dup_ngram_fraction", 1.0}}}};
  auto rep = curate(CurateConfig::from_json(cfg, "test"));
  EXPECT_EQ(rep.stage("heuristics")->dropped_by.at("kl_outlier"), 1);
  EXPECT_EQ(rep.docs_out, 30);
}

TEST(Curate, ClassifierStagesLabelAndFilter) {
  std::vector<json> ex;
  for (int i = 0; i < 20; ++i) {
    ex.push_back({{"text", prose(40, i)}, {"label", "hq"}});
    std::string spam;
    for (int k = 0; k < 30; ++k) spam += (k % 3 ? "cheap deal " : "click here ");
    ex.push_back({{"text", spam}, {"label", "lq"}});
  }
  std::string train = write_file("q_train.jsonl", jsonl(ex));
  std::vector<json> docs = {
      {{"text", prose(80, 999)}},
      {{"text", std::string(200, ' ') +
                    "cheap deal click here cheap deal click here cheap deal now click here"}}};
  json cfg = {
      {"inputs", {{{"path", write_file("q_in.jsonl", jsonl(docs))}}}},
      {"output", (tmpdir() / "q_out.jsonl").string()},
      {"heuristics", {{"min_chars", 10}, {"max_dup_ngram_fraction", 1.0}}},
      {"quality", {{"train", train}, {"model", (tmpdir() / "q.bin").string()}, {"min_score", 0.5}}},
      {"domain", {{"model", (tmpdir() / "q.bin").string()}}}};
  auto rep = curate(CurateConfig::from_json(cfg, "test"));
  EXPECT_EQ(rep.stage("quality")->dropped_by.at("low_quality"), 1);
  auto out = read_jsonl((tmpdir() / "q_out.jsonl").string());
  ASSERT_EQ(out.size(), 1u);
  EXPECT_GT(out[0]["quality"].get<double>(), 0.5);
  EXPECT_EQ(out[0]["domain"], "hq");  // the saved model reloaded as a labeller
}

TEST(Curate, BadInputsGiveErrorsNamingFileAndLine) {
  auto cfg_for = [](const std::string& in, const std::string& format = "jsonl") {
    json j = {{"inputs", {{{"path", in}, {"format", format}}}},
              {"output", (tmpdir() / "bad_out.jsonl").string()}};
    return CurateConfig::from_json(j, "test");
  };
  std::string good = json({{"text", prose(30, 1)}}).dump();
  std::string p = write_file("badjson.jsonl", good + "\n{\"text\": \"unterminated\n" + good + "\n");
  std::string e = error_of([&] { curate(cfg_for(p)); });
  EXPECT_NE(e.find("badjson.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find("invalid JSONL"), std::string::npos) << e;

  p = write_file("notext.jsonl", good + "\n" + good + "\n{\"url\": \"x\"}\n");
  e = error_of([&] { curate(cfg_for(p)); });
  EXPECT_NE(e.find("notext.jsonl:3"), std::string::npos) << e;
  EXPECT_NE(e.find("\"text\""), std::string::npos) << e;

  auto skip = cfg_for(write_file("skip.jsonl", good + "\nnot json\n"));
  skip.invalid_json = "skip";
  EXPECT_EQ(curate(skip).stage("read")->dropped_by.at("invalid_json"), 1);

  p = write_file("badutf8.jsonl", good + "\n{\"text\": \"ab\xff\"}\n");
  auto c = cfg_for(p);
  c.invalid_utf8 = "fail";
  e = error_of([&] { curate(c); });
  EXPECT_NE(e.find("badutf8.jsonl:2: invalid UTF-8 at byte offset 12"), std::string::npos) << e;
  c.invalid_utf8 = "replace";
  EXPECT_EQ(curate(c).stage("read")->found.at("invalid_utf8_replaced"), 1);

  auto drop_all = cfg_for(write_file("allbad.jsonl", "{\"text\": \"ab\xff\"}\n"));
  drop_all.invalid_utf8 = "drop";
  EXPECT_EQ(curate(drop_all).stage("read")->dropped_by.at("invalid_utf8"), 1);  // not "empty"

  p = write_file("empty.txt", " \n");
  e = error_of([&] { curate(cfg_for(p, "text")); });
  EXPECT_NE(e.find("empty.txt: empty source"), std::string::npos) << e;

  p = write_file("empty.jsonl", "\n\n");
  e = error_of([&] { curate(cfg_for(p)); });
  EXPECT_NE(e.find("empty.jsonl: empty source"), std::string::npos) << e;

  e = error_of([&] { curate(cfg_for((tmpdir() / "nope.jsonl").string())); });
  EXPECT_NE(e.find("nope.jsonl: cannot open"), std::string::npos) << e;
}

TEST(CurateConfig, RejectsUnknownFieldsAndBadValues) {
  std::string e = error_of([] {
    CurateConfig::from_json({{"inputs", {{{"path", "a"}}}}, {"output", "o"}, {"minhsh", {}}},
                            "cfg.json");
  });
  EXPECT_NE(e.find("cfg.json: unknown field 'minhsh'"), std::string::npos) << e;
  e = error_of([] {
    CurateConfig::from_json(
        {{"inputs", {{{"path", "a"}}}}, {"output", "o"}, {"pii", {{"action", "mask"}}}},
        "cfg.json");
  });
  EXPECT_NE(e.find("cfg.json.pii.action: 'mask' is not one of redact | drop"), std::string::npos)
      << e;
  e = error_of([] {
    CurateConfig::from_json(
        {{"inputs", {{{"path", "a"}}}}, {"output", "o"}, {"minhash", {{"bands", "x"}}}},
        "cfg.json");
  });
  EXPECT_NE(e.find("cfg.json.minhash.bands"), std::string::npos) << e;
  std::string p = write_file("broken.json", "{\"inputs\": [");
  e = error_of([&] { CurateConfig::load(p); });
  EXPECT_NE(e.find("broken.json: invalid JSON"), std::string::npos) << e;
}

TEST(Curate, HtmlAndTextFilesAreOneDocumentEach) {
  std::string h = write_file(
      "page.html", "<html><body><p>" + prose(40, 5) + "</p><footer>f</footer></body></html>");
  std::string t = write_file("plain.txt", prose(40, 6));
  json cfg = {{"inputs",
               {{{"path", h}, {"format", "html"}, {"source", "web"}},
                {{"path", t}, {"format", "text"}, {"source", "books"}}}},
              {"output", (tmpdir() / "files_out.jsonl").string()}};
  auto rep = curate(CurateConfig::from_json(cfg, "test"));
  EXPECT_EQ(rep.docs_out, 2);
  auto out = read_jsonl((tmpdir() / "files_out.jsonl").string());
  EXPECT_EQ(out[0]["source"], "web");
  EXPECT_EQ(out[0]["url"], "file://" + h);
  EXPECT_EQ(out[1]["source"], "books");
}

TEST(Curate, ThreadCountDoesNotChangeOutputOrReport) {
  CurateConfig cfg = small_corpus("threads");
  // More documents than one batch, so batches and threads both come into play.
  std::string big;
  for (int i = 0; i < 700; ++i) {
    json d = {{"text", prose(80, i % 500) + (i % 3 ? "\nShared footer line for many pages" : "")},
              {"url", "https://t.test/" + std::to_string(i % 650)}};
    big += d.dump() + "\n";
  }
  cfg.inputs.push_back({{write_file("threads_big.jsonl", big)}, "jsonl", "general"});
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  CurateReport one = curate(cfg);
  std::string out1 = read_file(cfg.output);
  omp_set_num_threads(2);
  CurateReport two = curate(cfg);
  omp_set_num_threads(saved);
  EXPECT_EQ(read_file(cfg.output), out1);
  json a = one.to_json(), b = two.to_json();
  a.erase("seconds");
  b.erase("seconds");
  EXPECT_EQ(a, b);
  EXPECT_GT(one.stage("url_dedup")->dropped, 0);
  EXPECT_GT(one.stage("minhash")->dropped, 0);
}
