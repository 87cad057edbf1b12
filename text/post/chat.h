// The Llama 3 chat format and post-training data files. A dialog renders as
// `<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\n\n
// {content}<|eot_id|>` (`<|eom_id|>` ends an assistant tool call, which expects an ipython
// reply); a generation prompt ends with the assistant header. Rendering is token-level and
// labels every token, so losses can select assistant content and leave formatting out.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "text/tokenizer/tokenizer.h"

namespace llama3::text::post {

enum class Role : uint8_t { kSystem, kUser, kAssistant, kIpython };
// "system", "user", "assistant", "ipython" ("tool" is accepted as ipython); throws listing
// the known roles otherwise.
Role parse_role(const std::string& s);
const char* role_name(Role r);

struct Message {
  Role role = Role::kUser;
  std::string content;
  bool tool_call = false;  // assistant message that calls a tool: ends with <|eom_id|>
};
using Dialog = std::vector<Message>;

// What each rendered token is, for loss masks.
enum class TokenKind : uint8_t {
  kFormat,        // <|begin_of_text|>, headers (role names and "\n\n" included)
  kPrompt,        // content of system, user and ipython messages
  kAssistant,     // content of assistant messages
  kAssistantEnd,  // the <|eot_id|>/<|eom_id|> that terminates an assistant message
  kPromptEnd,     // the <|eot_id|> of other messages
};

struct Rendered {
  std::vector<int32_t> ids;
  std::vector<TokenKind> kinds;  // one per id
};

// Renders a dialog; with add_generation_prompt the result ends with the assistant header.
Rendered render(const Tokenizer& tok, const Dialog& d, bool add_generation_prompt = false);
// Appends one message (header, content, terminator) to r.
void append_message(const Tokenizer& tok, const Message& m, Rendered& r);
// Appends the assistant header (what a prompt ends with).
void append_assistant_header(const Tokenizer& tok, Rendered& r);

// Token ids that end a generated turn: <|eot_id|>, <|eom_id|>, <|end_of_text|>.
std::vector<int32_t> stop_ids(const Tokenizer& tok);

// ---- data files ----

// What loaders do with a bad record: fail naming file:line, or skip it and count why.
enum class BadInput : uint8_t { kSkip, kFail };
BadInput parse_bad_input(const std::string& s);  // "skip" | "fail"

struct LoadReport {
  int64_t read = 0, kept = 0;
  std::map<std::string, int64_t> skipped;  // reason -> count
  int64_t skipped_total() const;
};

struct LoadOptions {
  BadInput bad_input = BadInput::kSkip;
  int64_t max_tokens = 0;  // > 0: records whose rendering exceeds this are bad ("too_long")
};

// A dialog with an optional verifiable answer (exact match on the last assistant turn).
struct DialogRecord {
  Dialog messages;
  std::string answer;  // may be empty
};

// JSONL `{"messages": [{"role": ..., "content": ..., "tool_call"?: bool}, ...], "answer"?}`.
// SFT dialogs must contain an assistant message with non-empty content.
std::vector<DialogRecord> load_dialogs(const std::string& path, const Tokenizer& tok,
                                       const LoadOptions& opt, LoadReport* report);

// A prompt (a dialog ending before the assistant turn) with ranked responses:
// edited > chosen > rejected.
struct Preference {
  Dialog prompt;
  std::string chosen, rejected, edited;  // edited may be empty
};
// JSONL `{"prompt": "text" | [messages], "chosen": s, "rejected": s, "edited"?: s}`.
// Bad: unknown roles, empty responses, chosen == rejected, too long.
std::vector<Preference> load_preferences(const std::string& path, const Tokenizer& tok,
                                         const LoadOptions& opt, LoadReport* report);

// Ranked pairs (better, worse) of a preference: (edited, chosen), (edited, rejected),
// (chosen, rejected) - up to three.
std::vector<std::pair<std::string, std::string>> ranked_pairs(const Preference& p);

// Prompts for generation: JSONL with "prompt" or "messages" (the assistant turn is
// dropped) and an optional "answer".
std::vector<DialogRecord> load_prompts(const std::string& path, const Tokenizer& tok,
                                       const LoadOptions& opt, LoadReport* report);

// A prompt dialog + response rendered for scoring/training: prompt tokens, then the
// response as an assistant message (content + <|eot_id|>).
Rendered render_response(const Tokenizer& tok, const Dialog& prompt, const std::string& response);

}  // namespace llama3::text::post
