#include "text/tokenizer/pretokenize.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>
#include <string>

#include "runtime/core/error.h"
#include "text/tokenizer/utf8.h"

namespace llama3::text {
namespace {

// Unicode White_Space (what Rust's regex, and so tiktoken, means by \s). PCRE2's \s under
// UCP omits U+0085, so the class is written out.
#define LLAMA3_WS \
  R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})"

constexpr const char* kPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^)" LLAMA3_WS
    R"(\p{L}\p{N}]+[\r\n]*|[)" LLAMA3_WS R"(]*[\r\n]+|[)" LLAMA3_WS R"(]+(?![^)" LLAMA3_WS
    R"(])|[)" LLAMA3_WS R"(]+)";

#undef LLAMA3_WS

// Per-thread match state: match data and a JIT stack large enough for 25,000-character runs.
struct MatchState {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchState() {
    md = pcre2_match_data_create(1, nullptr);
    mctx = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(64 * 1024, 16 * 1024 * 1024, nullptr);
    if (!md || !mctx || !stack) fail("pretokenize: out of memory creating PCRE2 match state");
    pcre2_jit_stack_assign(mctx, nullptr, stack);
  }
  ~MatchState() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(mctx);
    pcre2_match_data_free(md);
  }
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

}  // namespace

Pretokenizer::Pretokenizer() {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                    PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &err_off, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail("pretokenize: PCRE2 cannot compile the Llama 3 pattern at offset {}: {}", err_off,
         reinterpret_cast<const char*>(msg));
  }
  const int jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  if (jit != 0) {
    pcre2_code_free(code);
    fail("pretokenize: PCRE2 JIT compilation failed (error {}); this build needs JIT support", jit);
  }
  code_ = code;
}

Pretokenizer::~Pretokenizer() {
  pcre2_code_free(static_cast<pcre2_code*>(code_));
}

void Pretokenizer::split(std::string_view text, std::vector<std::string_view>& out) const {
  auto* code = static_cast<pcre2_code*>(code_);
  MatchState& st = match_state();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t offset = 0;
  while (offset < text.size()) {
    // The input is validated UTF-8 (NO_UTF_CHECK); pcre2_jit_match skips option checks.
    const int rc =
        pcre2_jit_match(code, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, st.md, st.mctx);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      fail("pretokenize: PCRE2 match failed at byte {}: {}", offset,
           reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md);
    if (ov[1] == ov[0]) {  // cannot happen with this pattern; guards against a loop
      offset = ov[1] + 1;
      continue;
    }
    out.emplace_back(text.data() + ov[0], ov[1] - ov[0]);
    offset = ov[1];
  }
}

void split_llama3_limits(std::string_view text, std::vector<std::string_view>& out,
                         size_t max_chars, size_t max_consecutive) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    // One chunk of at most max_chars code points, split by whitespace/non-whitespace runs.
    // Mirrors Meta's _split_whitespaces_or_nonwhitespaces: the run state starts from the
    // chunk's first character and restarts in every chunk.
    size_t chunk_chars = 0;
    size_t slice_start = i;
    size_t run_len = 0;
    bool run_is_space = false;
    while (i < n && chunk_chars < max_chars) {
      char32_t cp;
      const size_t len = utf8::decode(text, i, cp);
      const bool is_space = utf8::python_isspace(cp);
      if (chunk_chars == 0) run_is_space = is_space;
      if (run_is_space != is_space) {
        run_len = 1;
        run_is_space = is_space;
      } else if (++run_len > max_consecutive) {
        out.emplace_back(text.data() + slice_start, i - slice_start);
        slice_start = i;
        run_len = 1;
      }
      i += len;
      ++chunk_chars;
    }
    out.emplace_back(text.data() + slice_start, i - slice_start);
  }
}

}  // namespace llama3::text
