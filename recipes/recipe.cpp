#include "recipes/recipe.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "recipes/post_stages.h"
#include "runtime/core/error.h"
#include "text/model/config.h"

namespace llama3::recipes {

namespace pb = google::protobuf;
using Tree = pb::TextFormat::ParseInfoTree;

namespace {

class Collector : public pb::io::ErrorCollector {
 public:
  explicit Collector(std::string file) : file_(std::move(file)) {}
  void AddError(int line, pb::io::ColumnNumber col, const std::string& msg) override {
    if (first_.empty()) first_ = fmt::format("{}:{}:{}: {}", file_, line + 1, col + 1, msg);
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}
  const std::string& first() const { return first_; }

 private:
  std::string file_, first_;
};

// "ramp[1]" -> ("ramp", 1); "ramp" -> ("ramp", -1).
std::pair<std::string, int> split_index(const std::string& part, const std::string& path) {
  auto lb = part.find('[');
  if (lb == std::string::npos) return {part, -1};
  LLAMA3_CHECK(part.back() == ']', "--set {}: bad index in '{}' (expected name[N])", path, part);
  const std::string idx = part.substr(lb + 1, part.size() - lb - 2);
  LLAMA3_CHECK(!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos,
               "--set {}: bad index in '{}' (expected name[N])", path, part);
  return {part.substr(0, lb), std::stoi(idx)};
}

std::vector<std::string> split(const std::string& s, char c) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == c) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  out.push_back(cur);
  return out;
}

std::string field_names(const pb::Descriptor* d) {
  std::string s;
  for (int i = 0; i < d->field_count(); ++i) s += (i ? ", " : "") + d->field(i)->name();
  return s;
}

const char* kImplemented =
    "DATA, PRETRAIN, LONG_CONTEXT, ANNEAL, AVERAGE, EVAL, POST_DATA, SFT, REWARD_MODEL, REJECTION_SAMPLING, DPO";

double lc_weight(const Stage& s) { return s.long_context().synthetic_niah_weight(); }

bool produces_model(StageKind k) {
  return k == PRETRAIN || k == LONG_CONTEXT || k == ANNEAL || k == AVERAGE || post_produces_model(k);
}

// TextFormat's value parser, with its error log silenced (the caller reports the error).
bool parse_value(const std::string& value, const pb::FieldDescriptor* f, pb::Message* m) {
  Collector quiet("--set");
  pb::TextFormat::Parser p;
  p.RecordErrorsTo(&quiet);
  return p.ParseFieldValueFromString(value, f, m);
}

}  // namespace

bool is_training(StageKind k) { return k == PRETRAIN || k == LONG_CONTEXT || k == ANNEAL; }

Layout layout_of(const Stage& s) {
  auto d = [](int32_t v) { return int64_t(v > 0 ? v : 1); };
  const auto& p = s.parallel();
  return {d(p.dp_shard()), d(p.tp()), d(p.pp()), d(p.cp()), d(p.dp_replicate())};
}

std::string to_text(const Recipe& r) {
  std::string out;
  pb::TextFormat::PrintToString(r, &out);
  return out;
}

LoadedRecipe LoadedRecipe::parse(const std::string& text, const std::string& file) {
  LoadedRecipe lr;
  lr.file_ = file;
  auto tree = std::make_shared<Tree>();
  Collector errors(file);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(tree.get());
  if (!parser.ParseFromString(text, &lr.recipe_))
    fail("{}", errors.first().empty() ? file + ": cannot parse recipe" : errors.first());
  lr.tree_ = tree;
  return lr;
}

LoadedRecipe LoadedRecipe::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("recipe {}: cannot open", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

int LoadedRecipe::stage_index(const std::string& name) const {
  for (int i = 0; i < recipe_.stage_size(); ++i)
    if (recipe_.stage(i).name() == name) return i;
  return -1;
}

std::string LoadedRecipe::where(int stage, const std::string& path) const {
  const Tree* t = static_cast<const Tree*>(tree_.get());
  const pb::Descriptor* d = Recipe::descriptor();
  std::vector<std::string> parts;
  if (stage >= 0) parts.push_back("stage[" + std::to_string(stage) + "]");
  if (!path.empty())
    for (auto& p : split(path, '.')) parts.push_back(p);
  std::string best = file_;
  std::string full;
  for (size_t k = 0; k < parts.size() && t && d; ++k) {
    auto [name, idx] = split_index(parts[k], path);
    const pb::FieldDescriptor* f = d->FindFieldByName(name);
    if (!f) break;
    const int index = f->is_repeated() ? std::max(idx, 0) : -1;
    auto loc = t->GetLocation(f, index);
    if (loc.line < 0) break;
    best = fmt::format("{}:{}:{}", file_, loc.line + 1, loc.column + 1);
    if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) break;
    t = t->GetTreeForNested(f, index);
    d = f->message_type();
  }
  const std::string set_path = (stage >= 0 ? recipe_.stage(stage).name() + "." : "") + path;
  if (overridden_.count(set_path)) return best + " (value from --set " + set_path + ")";
  if (best == file_) {
    const std::string stage_name = stage >= 0 ? recipe_.stage(stage).name() : "";
    return file_ + " (" + (stage >= 0 ? "stage '" + stage_name + "'" : "recipe") +
           (overridden_.empty() ? "" : ", possibly set by --set") + ")";
  }
  return best;
}

void LoadedRecipe::apply_override(const std::string& assignment) {
  const auto eq = assignment.find('=');
  LLAMA3_CHECK(eq != std::string::npos && eq > 0, "--set {}: expected stage.field=value", assignment);
  const std::string path = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  std::vector<std::string> parts = split(path, '.');
  pb::Message* msg = &recipe_;
  size_t k = 0;
  // The first component names a stage, unless it is a top-level scalar field of Recipe.
  if (parts.size() >= 2 || Recipe::descriptor()->FindFieldByName(parts[0]) == nullptr) {
    const int si = stage_index(parts[0]);
    if (si < 0) {
      std::string names;
      for (auto& s : recipe_.stage()) names += (names.empty() ? "" : ", ") + s.name();
      fail("--set {}: no stage '{}' (stages: {}; top-level fields: name, out_dir, seed)", path, parts[0],
           names);
    }
    msg = recipe_.mutable_stage(si);
    k = 1;
    LLAMA3_CHECK(parts.size() > 1, "--set {}: name a field of stage '{}' ({})", path, parts[0],
                 field_names(Stage::descriptor()));
  }
  for (; k < parts.size(); ++k) {
    const pb::Descriptor* d = msg->GetDescriptor();
    const pb::Reflection* r = msg->GetReflection();
    auto [name, idx] = split_index(parts[k], path);
    const pb::FieldDescriptor* f = d->FindFieldByName(name);
    if (!f)
      fail("--set {}: {} has no field '{}' (fields: {})", path, d->name(), name, field_names(d));
    const bool last = k + 1 == parts.size();
    if (f->is_map()) {
      // A map entry is addressed by its key as the next path component: mix[0].weights.math.
      LLAMA3_CHECK(idx < 0 && !last, "--set {}: '{}' is a map; address an entry by its key as {}.KEY", path, name,
                   name);
      const pb::FieldDescriptor* kf = f->message_type()->map_key();
      const pb::FieldDescriptor* vf = f->message_type()->map_value();
      const std::string& key = parts[++k];
      const bool value_is_msg = vf->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE;
      LLAMA3_CHECK(value_is_msg || k + 1 == parts.size(), "--set {}: '{}.{}' is a {}, it has no field '{}'", path,
                   name, key, vf->type_name(), k + 1 < parts.size() ? parts[k + 1] : "");
      LLAMA3_CHECK(!value_is_msg || k + 1 < parts.size(), "--set {}: '{}.{}' is a message; set one of its fields ({})",
                   path, name, key, field_names(vf->message_type()));
      // Build the entry in a scratch message first, so a bad key or value leaves the map untouched.
      std::unique_ptr<pb::Message> entry(r->GetMessageFactory()->GetPrototype(f->message_type())->New());
      if (kf->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING)
        entry->GetReflection()->SetString(entry.get(), kf, key);  // unquoted in the path
      else if (!parse_value(key, kf, entry.get()))
        fail("--set {}: '{}' is not a valid {} key for map '{}'", path, key, kf->type_name(), name);
      if (!value_is_msg && !parse_value(value, vf, entry.get()))
        fail("--set {}: '{}' is not a valid {} for '{}.{}'", path, value, vf->type_name(), name, key);
      std::string want, have;
      pb::TextFormat::PrintFieldValueToString(*entry, kf, -1, &want);
      pb::Message* slot = nullptr;
      for (int i = 0; i < r->FieldSize(*msg, f) && !slot; ++i) {
        pb::Message* e = r->MutableRepeatedMessage(msg, f, i);
        have.clear();
        pb::TextFormat::PrintFieldValueToString(*e, kf, -1, &have);
        if (have == want) slot = e;
      }
      if (!slot) {
        slot = r->AddMessage(msg, f);  // a new key
        slot->CopyFrom(*entry);
      } else if (!value_is_msg) {
        slot->CopyFrom(*entry);
      }
      if (!value_is_msg) {
        overridden_.insert(path);
        return;
      }
      msg = slot->GetReflection()->MutableMessage(slot, vf);
      continue;
    }
    if (f->is_repeated()) {
      LLAMA3_CHECK(idx >= 0, "--set {}: '{}' is repeated; address an element as {}[N]", path, name, name);
      const int size = r->FieldSize(*msg, f);
      LLAMA3_CHECK(idx <= size, "--set {}: index {} of '{}' is out of range (size {}; {} appends)", path, idx,
                   name, size, size);
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
        pb::Message* sub = idx == size ? r->AddMessage(msg, f) : r->MutableRepeatedMessage(msg, f, idx);
        LLAMA3_CHECK(!last, "--set {}: '{}' is a message; set one of its fields ({})", path, name,
                     field_names(f->message_type()));
        msg = sub;
        continue;
      }
      LLAMA3_CHECK(last, "--set {}: '{}' is not a message", path, name);
      // Parse into a scratch copy, then splice the one element in.
      std::unique_ptr<pb::Message> tmp(msg->New());
      if (!parse_value(value, f, tmp.get()))
        fail("--set {}: '{}' is not a valid {} for '{}'", path, value, f->type_name(), name);
      const pb::Reflection* tr = tmp->GetReflection();
      if (idx == size) {
        msg->MergeFrom(*tmp);  // tmp holds just this one element: appends it
      } else {
        switch (f->cpp_type()) {
#define L3_CASE(T, N) \
  case pb::FieldDescriptor::CPPTYPE_##T: r->SetRepeated##N(msg, f, idx, tr->GetRepeated##N(*tmp, f, 0)); break;
          L3_CASE(INT32, Int32) L3_CASE(INT64, Int64) L3_CASE(UINT32, UInt32) L3_CASE(UINT64, UInt64)
          L3_CASE(DOUBLE, Double) L3_CASE(FLOAT, Float) L3_CASE(BOOL, Bool) L3_CASE(ENUM, EnumValue)
          L3_CASE(STRING, String)
#undef L3_CASE
          default: fail("--set {}: unsupported field type", path);
        }
      }
      overridden_.insert(path);
      return;
    }
    LLAMA3_CHECK(idx < 0, "--set {}: '{}' is not repeated; drop the index", path, name);
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      LLAMA3_CHECK(!last, "--set {}: '{}' is a message; set one of its fields ({})", path, name,
                   field_names(f->message_type()));
      msg = r->MutableMessage(msg, f);
      continue;
    }
    LLAMA3_CHECK(last, "--set {}: '{}' is a {}, it has no field '{}'", path, name, f->type_name(), parts[k + 1]);
    if (!parse_value(value, f, msg)) {
      std::string hint;
      if (f->enum_type()) {
        hint = " (one of:";
        for (int i = 0; i < f->enum_type()->value_count(); ++i) hint += " " + f->enum_type()->value(i)->name();
        hint += ")";
      }
      fail("--set {}: '{}' is not a valid {} for '{}'{}", path, value, f->type_name(), name, hint);
    }
    overridden_.insert(path);
    return;
  }
}

namespace {
struct Checker {
  const LoadedRecipe& lr;
  int stage;
  template <typename... Args>
  [[noreturn]] void error(const std::string& field, fmt::format_string<Args...> f, Args&&... args) const {
    const Stage& s = lr.recipe().stage(stage);
    throw Error(fmt::format("{}: stage '{}' field {}: {}", lr.where(stage, field), s.name(), field,
                            fmt::format(f, std::forward<Args>(args)...)));
  }
};
}  // namespace

void LoadedRecipe::validate(bool runnable, int world_size) const {
  const Recipe& r = recipe_;
  LLAMA3_CHECK(r.stage_size() > 0, "{}: recipe has no stages", file_);
  std::map<std::string, int> seen;
  static const std::regex name_re("[a-z0-9_]+");
  for (int i = 0; i < r.stage_size(); ++i) {
    const Stage& s = r.stage(i);
    Checker c{*this, i};
    if (!std::regex_match(s.name(), name_re)) c.error("name", "'{}' must match [a-z0-9_]+", s.name());
    if (seen.count(s.name())) c.error("name", "'{}' is already the name of stage {}", s.name(), seen[s.name()]);
    seen[s.name()] = i;
    const StageKind k = s.kind();
    if (k == KIND_UNSPECIFIED) c.error("kind", "missing (implemented: {})", kImplemented);
    if (k > EVAL && !is_post_kind(k))
      c.error("kind", "{} is not implemented in this build (implemented: {})", StageKind_Name(k), kImplemented);
    if (is_post_kind(k)) {  // their own inputs and options (recipes/post_stages.cpp)
      validate_post_stage(*this, i);
      continue;
    }

    auto earlier = [&](const std::string& field, const std::string& ref, bool want_model) {
      auto it = seen.find(ref);
      if (it == seen.end() || it->second == i) {
        const int later = stage_index(ref);
        if (later > i) c.error(field, "'{}' is a later stage (stage {}); inputs must come from earlier stages", ref, later);
        c.error(field, "no stage named '{}' before this one", ref);
      }
      const StageKind rk = r.stage(it->second).kind();
      if (want_model && !produces_model(rk))
        c.error(field, "stage '{}' is a {} stage and produces no model", ref, StageKind_Name(rk));
      if (!want_model && rk != DATA)
        c.error(field, "stage '{}' is a {} stage, not DATA", ref, StageKind_Name(rk));
    };
    if (!s.init_from().empty()) earlier("init_from", s.init_from(), true);
    if (!s.data_from().empty()) earlier("data_from", s.data_from(), false);
    if (!s.data_from().empty() && !s.data_dir().empty())
      c.error("data_dir", "give data_from or data_dir, not both");
    const bool needs_data = is_training(k) || k == EVAL;
    if (needs_data && s.data_from().empty() && s.data_dir().empty())
      c.error("data_from", "a {} stage needs data: data_from (a DATA stage) or data_dir", StageKind_Name(k));
    if ((k == LONG_CONTEXT || k == ANNEAL || k == EVAL) && s.init_from().empty())
      c.error("init_from", "a {} stage starts from an earlier stage's model", StageKind_Name(k));

    // Model shape (training stages build one; others take the input's).
    text::LlamaConfig cfg;
    if (is_training(k)) {
      if (!s.init_from().empty() && s.has_model() && !s.model().flavour().empty())
        c.error("model.flavour", "the model comes from init_from '{}'; drop the flavour", s.init_from());
      if (s.init_from().empty()) {
        if (s.model().flavour().empty()) c.error("model.flavour", "missing (one of: debug, tiny, 125M, 1B, 8B, 70B, 405B)");
        try {
          cfg = text::llama3_flavour(s.model().flavour());
        } catch (const Error& e) {
          c.error("model.flavour", "{}", e.what());
        }
        const auto& m = s.model();
        if (m.dim()) cfg.dim = m.dim();
        if (m.n_layers()) cfg.n_layers = m.n_layers();
        if (m.n_heads()) cfg.n_heads = m.n_heads();
        if (m.n_kv_heads()) cfg.n_kv_heads = m.n_kv_heads();
        if (m.vocab_size()) cfg.vocab_size = m.vocab_size();
        try {
          cfg.validate();
        } catch (const Error& e) {
          c.error("model", "{}", e.what());
        }
      }
      const std::string& p = s.model().precision();
      if (!p.empty() && p != "f32" && p != "bf16") c.error("model.precision", "'{}' (supported: f32, bf16)", p);

      if (!(s.optimizer().lr() > 0)) c.error("optimizer.lr", "must be > 0 (got {})", s.optimizer().lr());
      if (s.lr().min_lr() < 0 || s.lr().min_lr() > s.optimizer().lr())
        c.error("lr.min_lr", "{} must lie in [0, optimizer.lr = {}]", s.lr().min_lr(), s.optimizer().lr());
      if (k != LONG_CONTEXT && s.total_tokens() <= 0)
        c.error("total_tokens", "must be > 0 (got {})", s.total_tokens());
      const int64_t horizon = s.lr().decay_tokens() > 0 ? s.lr().decay_tokens() : s.total_tokens();
      if (s.lr().warmup_tokens() < 0 || (k != LONG_CONTEXT && s.lr().warmup_tokens() > horizon))
        c.error("lr.warmup_tokens", "{} must lie in [0, {}] (the decay horizon)", s.lr().warmup_tokens(), horizon);
      if (k == ANNEAL) {
        if (s.lr().min_lr() != 0) c.error("lr.min_lr", "annealing decays linearly to exactly 0; drop min_lr");
        if (s.lr().warmup_tokens() != 0) c.error("lr.warmup_tokens", "annealing has no warm-up");
        if (s.lr().decay_tokens() != 0) c.error("lr.decay_tokens", "annealing decays over total_tokens");
      }

      // Batch arithmetic.
      const Layout L = layout_of(s);
      const auto& b = s.batch();
      const int64_t seq = b.seq_len();
      if (seq <= 0) c.error("batch.seq_len", "must be > 0 (got {})", seq);
      if (b.batch_tokens() <= 0) c.error("batch.batch_tokens", "must be > 0 (got {})", b.batch_tokens());
      const int64_t micro = b.micro_batch_tokens() > 0 ? b.micro_batch_tokens() : b.batch_tokens() / L.dp();
      auto check_batch = [&](const std::string& field, int64_t bt, int64_t sl) {
        if (bt % sl != 0)
          c.error(field, "batch of {} tokens is not a multiple of seq_len {} ({} = {} x {} + {})", bt, sl, bt, sl,
                  bt / sl, bt % sl);
        if (micro % sl != 0)
          c.error("batch.micro_batch_tokens", "micro-batch of {} tokens is not a multiple of seq_len {}", micro, sl);
        if (bt % (micro * L.dp()) != 0)
          c.error(field, "batch of {} tokens is not divisible by dp {} x micro-batch {} tokens = {}", bt, L.dp(),
                  micro, micro * L.dp());
        if (sl % (2 * L.cp) != 0 && L.cp > 1)
          c.error(field, "seq_len {} is not divisible by 2 x cp = {}", sl, 2 * L.cp);
      };
      check_batch("batch.batch_tokens", b.batch_tokens(), seq);
      int64_t prev = 0, cur_seq = seq;
      for (int j = 0; j < b.ramp_size(); ++j) {
        const auto& pnt = b.ramp(j);
        const std::string f = fmt::format("batch.ramp[{}]", j);
        if (pnt.at_tokens() <= prev)
          c.error(f + ".at_tokens", "{} must be greater than the previous point ({})", pnt.at_tokens(), prev);
        if (k != LONG_CONTEXT && pnt.at_tokens() >= s.total_tokens())
          c.error(f + ".at_tokens", "{} is not before total_tokens {}", pnt.at_tokens(), s.total_tokens());
        prev = pnt.at_tokens();
        if (pnt.seq_len() > 0) cur_seq = pnt.seq_len();
        check_batch(f + ".batch_tokens", pnt.batch_tokens(), cur_seq);
      }
      prev = -1;
      for (int j = 0; j < s.mix_size(); ++j) {
        const auto& m = s.mix(j);
        const std::string f = fmt::format("mix[{}]", j);
        if (m.at_tokens() <= prev) c.error(f + ".at_tokens", "{} must be greater than the previous point", m.at_tokens());
        prev = m.at_tokens();
        double sum = 0;
        for (auto& [name, w] : m.weights()) {
          if (!(w >= 0)) c.error(f + ".weights", "weight of '{}' is {} (must be >= 0)", name, w);
          sum += w;
        }
        if (!(sum > 0)) c.error(f + ".weights", "weights must sum to > 0");
      }

      // Parallel layout: the model must split evenly.
      auto check_deg = [&](const char* f, int32_t v) {
        if (v < 0) c.error(std::string("parallel.") + f, "degree {} must be >= 0 (0 means 1)", v);
      };
      check_deg("dp_shard", s.parallel().dp_shard());
      check_deg("tp", s.parallel().tp());
      check_deg("pp", s.parallel().pp());
      check_deg("cp", s.parallel().cp());
      check_deg("dp_replicate", s.parallel().dp_replicate());
      if (s.init_from().empty()) {
        if (cfg.n_heads % L.tp || cfg.n_kv_heads % L.tp)
          c.error("parallel.tp", "tp {} does not divide n_heads {} and n_kv_heads {}", L.tp, cfg.n_heads,
                  cfg.n_kv_heads);
        if (cfg.n_layers < L.pp) c.error("parallel.pp", "pp {} exceeds n_layers {}", L.pp, cfg.n_layers);
      }
      if (runnable && L.world() != 1 && L.world() != world_size)
        c.error("parallel", "layout dp_shard {} x tp {} x pp {} x cp {} x dp_replicate {} needs {} ranks; this run has "
                "{} (launch it with mpirun -np {}; --dry-run checks the plan)",
                L.dp_shard, L.tp, L.pp, L.cp, L.dp_replicate, L.world(), world_size, L.world());

      if (k == LONG_CONTEXT) {
        const auto& lc = s.long_context();
        if (lc.seq_lens_size() == 0) c.error("long_context.seq_lens", "needs at least one increment");
        int64_t last = seq;
        for (int j = 0; j < lc.seq_lens_size(); ++j) {
          const int64_t v = lc.seq_lens(j);
          const std::string f = fmt::format("long_context.seq_lens[{}]", j);
          if (v <= last) c.error(f, "{} must exceed the previous length {}", v, last);
          check_batch(f, b.batch_tokens(), v);
          last = v;
        }
        if (lc.max_tokens_per_increment() <= 0)
          c.error("long_context.max_tokens_per_increment", "must be > 0 (got {})", lc.max_tokens_per_increment());
        if (lc.check_every_tokens() <= 0)
          c.error("long_context.check_every_tokens", "must be > 0 (got {})", lc.check_every_tokens());
        if (lc.min_tokens_per_increment() > lc.max_tokens_per_increment())
          c.error("long_context.min_tokens_per_increment", "{} exceeds max_tokens_per_increment {}",
                  lc.min_tokens_per_increment(), lc.max_tokens_per_increment());
        if (lc.niah_threshold() < 0 || lc.niah_threshold() > 1)
          c.error("long_context.niah_threshold", "{} must lie in [0, 1]", lc.niah_threshold());
        if (b.ramp_size() > 0) c.error("batch.ramp", "long-context stages change seq_len via long_context.seq_lens");
      }
      const auto& sn = s.synthetic_niah();
      if (sn.weight() < 0 || sn.weight() >= 1) c.error("synthetic_niah.weight", "{} must lie in [0, 1)", sn.weight());
      if ((sn.weight() > 0 || sn.micro_batches() > 0) && k != PRETRAIN)
        c.error("synthetic_niah", "only PRETRAIN stages take it (long context: long_context.synthetic_niah_weight)");
      if (sn.min_len() < 0 || sn.max_len() < sn.min_len() || (sn.min_len() > 0 && sn.min_len() < 32))
        c.error("synthetic_niah", "lengths must satisfy 32 <= min_len <= max_len (got {}, {})", sn.min_len(), sn.max_len());
      if (sn.only_tokens() < 0) c.error("synthetic_niah.only_tokens", "must be >= 0 (got {})", sn.only_tokens());
      if (sn.micro_batches() < 0) c.error("synthetic_niah.micro_batches", "must be >= 0 (got {})", sn.micro_batches());
      if (k == LONG_CONTEXT && s.long_context().synthetic_niah_micro_batches() < 0)
        c.error("long_context.synthetic_niah_micro_batches", "must be >= 0 (got {})",
                s.long_context().synthetic_niah_micro_batches());
      if (sn.only_tokens() > 0 && sn.weight() <= 0 && sn.micro_batches() <= 0)
        c.error("synthetic_niah.only_tokens",
                "needs synthetic_niah.weight > 0 or micro_batches > 0 (the documents of the warm-up)");
      if (k == LONG_CONTEXT && (lc_weight(s) < 0 || lc_weight(s) >= 1))
        c.error("long_context.synthetic_niah_weight", "{} must lie in [0, 1)", lc_weight(s));
      if (k == ANNEAL && s.anneal().average_every_tokens() < 0)
        c.error("anneal.average_every_tokens", "must be >= 0");
    }
    if (k == AVERAGE) {
      const auto& a = s.average();
      const int n = a.stages_size() + a.checkpoints_size();
      if (n == 0) c.error("average", "needs inputs: stages and/or checkpoints");
      for (int j = 0; j < a.stages_size(); ++j) earlier(fmt::format("average.stages[{}]", j), a.stages(j), true);
      if (a.weights_size() != 0 && a.weights_size() != n)
        c.error("average.weights", "{} weights for {} inputs", a.weights_size(), n);
      double sum = 0;
      for (double w : a.weights()) {
        if (!(w >= 0)) c.error("average.weights", "weight {} must be >= 0", w);
        sum += w;
      }
      if (a.weights_size() && !(sum > 0)) c.error("average.weights", "weights must sum to > 0");
    }
    if (s.has_eval()) {
      const auto& e = s.eval();
      if (e.batches() < 0 || e.every_tokens() < 0) c.error("eval", "batches and every_tokens must be >= 0");
      for (int j = 0; j < e.niah().lengths_size(); ++j)
        if (e.niah().lengths(j) < 64) c.error(fmt::format("eval.niah.lengths[{}]", j), "{} is below 64 tokens", e.niah().lengths(j));
      if (e.niah().candidates() == 1 || e.niah().candidates() < 0)
        c.error("eval.niah.candidates", "needs >= 2 candidates (got {})", e.niah().candidates());
      if (e.niah().key_digits() < 0 || e.niah().key_digits() > 6)
        c.error("eval.niah.key_digits", "{} must lie in [0, 6] (0: 1 digit)", e.niah().key_digits());
      else if (e.niah().key_digits() <= 1 && e.niah().candidates() > 10)
        c.error("eval.niah.candidates", "{} candidates need more than the 10 one-digit keys (raise key_digits)",
                e.niah().candidates());
    }
    if (s.checkpoint_every_steps() < 0) c.error("checkpoint_every_steps", "must be >= 0");
  }
}

}  // namespace llama3::recipes
