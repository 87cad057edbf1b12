#include "text/post/chat.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "runtime/core/error.h"

namespace llama3::text::post {

Role parse_role(const std::string& s) {
  if (s == "system") return Role::kSystem;
  if (s == "user") return Role::kUser;
  if (s == "assistant") return Role::kAssistant;
  if (s == "ipython" || s == "tool") return Role::kIpython;
  fail("unknown role '{}' (known: system, user, assistant, ipython, tool)", s);
}

const char* role_name(Role r) {
  switch (r) {
    case Role::kSystem: return "system";
    case Role::kUser: return "user";
    case Role::kAssistant: return "assistant";
    case Role::kIpython: return "ipython";
  }
  return "?";
}

namespace {
void push(Rendered& r, const std::vector<int32_t>& ids, TokenKind k) {
  r.ids.insert(r.ids.end(), ids.begin(), ids.end());
  r.kinds.insert(r.kinds.end(), ids.size(), k);
}
void push(Rendered& r, int32_t id, TokenKind k) {
  r.ids.push_back(id);
  r.kinds.push_back(k);
}
void header(const Tokenizer& tok, Role role, Rendered& r) {
  push(r, tok.special_id("<|start_header_id|>"), TokenKind::kFormat);
  push(r, tok.encode(role_name(role)), TokenKind::kFormat);
  push(r, tok.special_id("<|end_header_id|>"), TokenKind::kFormat);
  push(r, tok.encode("\n\n"), TokenKind::kFormat);
}
}  // namespace

void append_message(const Tokenizer& tok, const Message& m, Rendered& r) {
  header(tok, m.role, r);
  const bool asst = m.role == Role::kAssistant;
  // Content is data: special-token text inside it stays ordinary text.
  push(r, tok.encode(m.content), asst ? TokenKind::kAssistant : TokenKind::kPrompt);
  const int32_t end = tok.special_id(asst && m.tool_call ? "<|eom_id|>" : "<|eot_id|>");
  push(r, end, asst ? TokenKind::kAssistantEnd : TokenKind::kPromptEnd);
}

void append_assistant_header(const Tokenizer& tok, Rendered& r) { header(tok, Role::kAssistant, r); }

Rendered render(const Tokenizer& tok, const Dialog& d, bool add_generation_prompt) {
  Rendered r;
  push(r, tok.bos_id(), TokenKind::kFormat);
  for (const Message& m : d) append_message(tok, m, r);
  if (add_generation_prompt) append_assistant_header(tok, r);
  return r;
}

Rendered render_response(const Tokenizer& tok, const Dialog& prompt, const std::string& response) {
  Rendered r = render(tok, prompt, false);
  append_message(tok, Message{Role::kAssistant, response, false}, r);
  return r;
}

std::vector<int32_t> stop_ids(const Tokenizer& tok) {
  return {tok.special_id("<|eot_id|>"), tok.special_id("<|eom_id|>"), tok.eos_id()};
}

BadInput parse_bad_input(const std::string& s) {
  if (s == "skip") return BadInput::kSkip;
  if (s == "fail") return BadInput::kFail;
  fail("bad-input policy must be skip or fail, got '{}'", s);
}

int64_t LoadReport::skipped_total() const {
  int64_t n = 0;
  for (auto& [k, v] : skipped) n += v;
  return n;
}

namespace {

// A bad record: its reason (the skip counter's key) and a message.
struct BadRecord {
  std::string reason, message;
};

Dialog parse_messages(const nlohmann::json& j) {
  if (!j.is_array()) throw BadRecord{"malformed", "'messages' must be an array"};
  Dialog d;
  for (const auto& m : j) {
    if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() ||
        !m["content"].is_string())
      throw BadRecord{"malformed", "each message needs string 'role' and 'content'"};
    Message msg;
    try {
      msg.role = parse_role(m["role"].get<std::string>());
    } catch (const Error& e) {
      throw BadRecord{"unknown_role", e.what()};
    }
    msg.content = m["content"].get<std::string>();
    msg.tool_call = m.value("tool_call", false);
    d.push_back(std::move(msg));
  }
  return d;
}

Dialog parse_prompt(const nlohmann::json& j) {
  if (j.is_string()) return Dialog{Message{Role::kUser, j.get<std::string>(), false}};
  return parse_messages(j);
}

std::string get_str(const nlohmann::json& j, const char* k, bool required) {
  if (!j.contains(k)) {
    if (required) throw BadRecord{"malformed", fmt::format("missing field '{}'", k)};
    return "";
  }
  if (!j[k].is_string()) throw BadRecord{"malformed", fmt::format("field '{}' must be a string", k)};
  return j[k].get<std::string>();
}

// Reads a JSONL file, calling parse(json) per non-empty line; bad records are skipped and
// counted or fail with file:line.
template <typename T, typename F>
std::vector<T> read_jsonl(const std::string& path, const LoadOptions& opt, LoadReport* report, F parse) {
  std::ifstream in(path);
  LLAMA3_CHECK(in.good(), "{}: cannot open", path);
  LoadReport local;
  LoadReport& rep = report ? *report : local;
  std::vector<T> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    ++rep.read;
    try {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw BadRecord{"malformed", fmt::format("invalid JSON: {}", e.what())};
      }
      if (!j.is_object()) throw BadRecord{"malformed", "a record must be a JSON object"};
      out.push_back(parse(j));
      ++rep.kept;
    } catch (const BadRecord& b) {
      if (opt.bad_input == BadInput::kFail) fail("{}:{}: {}", path, lineno, b.message);
      ++rep.skipped[b.reason];
    }
  }
  return out;
}

void check_length(size_t n, const LoadOptions& opt) {
  if (opt.max_tokens > 0 && int64_t(n) > opt.max_tokens)
    throw BadRecord{"too_long", fmt::format("{} tokens exceed the context of {}", n, opt.max_tokens)};
}

}  // namespace

std::vector<DialogRecord> load_dialogs(const std::string& path, const Tokenizer& tok, const LoadOptions& opt,
                                       LoadReport* report) {
  return read_jsonl<DialogRecord>(path, opt, report, [&](const nlohmann::json& j) {
    if (!j.contains("messages")) throw BadRecord{"malformed", "missing field 'messages'"};
    DialogRecord r;
    r.messages = parse_messages(j["messages"]);
    r.answer = get_str(j, "answer", false);
    bool has_asst = false;
    for (const Message& m : r.messages) {
      if (m.role == Role::kAssistant && m.content.empty())
        throw BadRecord{"empty_response", "an assistant message is empty"};
      has_asst |= m.role == Role::kAssistant;
    }
    if (!has_asst) throw BadRecord{"no_assistant", "the dialog has no assistant message"};
    check_length(render(tok, r.messages).ids.size(), opt);
    return r;
  });
}

std::vector<Preference> load_preferences(const std::string& path, const Tokenizer& tok, const LoadOptions& opt,
                                         LoadReport* report) {
  return read_jsonl<Preference>(path, opt, report, [&](const nlohmann::json& j) {
    if (!j.contains("prompt")) throw BadRecord{"malformed", "missing field 'prompt'"};
    Preference p;
    p.prompt = parse_prompt(j["prompt"]);
    p.chosen = get_str(j, "chosen", true);
    p.rejected = get_str(j, "rejected", true);
    p.edited = get_str(j, "edited", false);
    if (p.chosen.empty() || p.rejected.empty() || (j.contains("edited") && p.edited.empty()))
      throw BadRecord{"empty_response", "a response is empty"};
    if (p.chosen == p.rejected) throw BadRecord{"identical_pair", "chosen and rejected are identical"};
    size_t longest = std::max(p.chosen.size(), p.rejected.size());
    const std::string& lr = p.edited.size() > longest ? p.edited : (p.chosen.size() >= p.rejected.size() ? p.chosen : p.rejected);
    check_length(render_response(tok, p.prompt, lr).ids.size(), opt);
    return p;
  });
}

std::vector<std::pair<std::string, std::string>> ranked_pairs(const Preference& p) {
  std::vector<std::pair<std::string, std::string>> out;
  if (!p.edited.empty() && p.edited != p.chosen) out.emplace_back(p.edited, p.chosen);
  if (!p.edited.empty() && p.edited != p.rejected) out.emplace_back(p.edited, p.rejected);
  out.emplace_back(p.chosen, p.rejected);
  return out;
}

std::vector<DialogRecord> load_prompts(const std::string& path, const Tokenizer& tok, const LoadOptions& opt,
                                       LoadReport* report) {
  return read_jsonl<DialogRecord>(path, opt, report, [&](const nlohmann::json& j) {
    DialogRecord r;
    if (j.contains("prompt")) {
      r.messages = parse_prompt(j["prompt"]);
    } else if (j.contains("messages")) {
      r.messages = parse_messages(j["messages"]);
      while (!r.messages.empty() && r.messages.back().role == Role::kAssistant) r.messages.pop_back();
    } else {
      throw BadRecord{"malformed", "missing field 'prompt' or 'messages'"};
    }
    if (r.messages.empty()) throw BadRecord{"malformed", "empty prompt"};
    r.answer = get_str(j, "answer", false);
    check_length(render(tok, r.messages, true).ids.size(), opt);
    return r;
  });
}

}  // namespace llama3::text::post
