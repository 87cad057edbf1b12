#include "text/data/text_clean.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <vector>

namespace llama3::data {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 when it is invalid (overlongs,
// surrogates and code points above U+10FFFF are invalid).
size_t utf8_len(std::string_view s, size_t i, uint32_t* cp_out = nullptr) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  size_t n;
  uint32_t cp;
  if (c < 0x80) {
    if (cp_out) *cp_out = c;
    return 1;
  } else if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  if (cp_out) *cp_out = cp;
  return n;
}

void put_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

std::string lower(std::string_view s) {
  std::string r(s);
  for (auto& c : r)
    if (c >= 'A' && c <= 'Z') c = char(c + 32);
  return r;
}

bool ieq_prefix(std::string_view s, size_t i, std::string_view p) {
  if (i + p.size() > s.size()) return false;
  for (size_t k = 0; k < p.size(); ++k) {
    char c = s[i + k];
    if (c >= 'A' && c <= 'Z') c = char(c + 32);
    if (c != p[k]) return false;
  }
  return true;
}

// Decodes the entity starting at s[i] == '&'; returns its length (0 if not an entity).
size_t decode_entity(std::string_view s, size_t i, std::string& out) {
  size_t semi = s.find(';', i);
  if (semi == std::string_view::npos || semi - i > 10) return 0;
  std::string_view name = s.substr(i + 1, semi - i - 1);
  uint32_t cp = 0;
  if (!name.empty() && name[0] == '#') {
    bool hex = name.size() > 1 && (name[1] == 'x' || name[1] == 'X');
    std::string_view digits = name.substr(hex ? 2 : 1);
    if (digits.empty()) return 0;
    for (char c : digits) {
      int v = (c >= '0' && c <= '9')          ? c - '0'
              : hex && (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : hex && (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                              : -1;
      if (v < 0) return 0;
      cp = cp * (hex ? 16 : 10) + uint32_t(v);
      if (cp > 0x10FFFF) return 0;
    }
    if (cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD;
  } else {
    static const std::pair<std::string_view, uint32_t> kNamed[] = {
        {"amp", '&'},      {"lt", '<'},       {"gt", '>'},        {"quot", '"'},
        {"apos", '\''},    {"nbsp", 0xA0},    {"copy", 0xA9},     {"reg", 0xAE},
        {"mdash", 0x2014}, {"ndash", 0x2013}, {"hellip", 0x2026}, {"lsquo", 0x2018},
        {"rsquo", 0x2019}, {"ldquo", 0x201C}, {"rdquo", 0x201D},  {"times", 0xD7},
        {"le", 0x2264},    {"ge", 0x2265},    {"ne", 0x2260},     {"pi", 0x3C0},
        {"minus", 0x2212}, {"middot", 0xB7},  {"deg", 0xB0},      {"euro", 0x20AC},
        {"para", 0xB6},    {"sect", 0xA7},    {"laquo", 0xAB},   {"raquo", 0xBB},
        {"bull", 0x2022},  {"trade", 0x2122}, {"larr", 0x2190},  {"rarr", 0x2192},
        {"plusmn", 0xB1},  {"divide", 0xF7},  {"micro", 0xB5},   {"eacute", 0xE9},
        {"egrave", 0xE8},  {"agrave", 0xE0},  {"aacute", 0xE1},  {"ccedil", 0xE7},
        {"auml", 0xE4},    {"ouml", 0xF6},    {"uuml", 0xFC},    {"szlig", 0xDF},
        {"ntilde", 0xF1},  {"iacute", 0xED},  {"oacute", 0xF3},  {"uacute", 0xFA},
        {"infin", 0x221E}, {"sum", 0x2211},   {"radic", 0x221A}, {"alpha", 0x3B1},
        {"beta", 0x3B2},   {"gamma", 0x3B3},  {"lambda", 0x3BB}, {"sigma", 0x3C3}};
    for (auto& [n, v] : kNamed)
      if (n == name) cp = v;
    if (!cp) return 0;
  }
  put_utf8(out, cp);
  return semi - i + 1;
}

struct Tag {
  std::string name;  // lower-cased
  bool closing = false, self_closing = false;
  std::string attrs;  // raw attribute text, lower-cased names not separated
};

// Value of attribute `key` in raw attribute text (quoted or bare), or empty.
std::string attr(const std::string& raw, std::string_view key) {
  std::string l = lower(raw);
  size_t p = 0;
  while ((p = l.find(key, p)) != std::string::npos) {
    bool start_ok = p == 0 || l[p - 1] == ' ' || l[p - 1] == '\t' || l[p - 1] == '\n';
    size_t q = p + key.size();
    while (q < l.size() && l[q] == ' ') ++q;
    if (start_ok && q < l.size() && l[q] == '=') {
      ++q;
      while (q < l.size() && l[q] == ' ') ++q;
      if (q < l.size() && (l[q] == '"' || l[q] == '\'')) {
        size_t e = l.find(l[q], q + 1);
        return raw.substr(q + 1, (e == std::string::npos ? l.size() : e) - q - 1);
      }
      size_t e = q;
      while (e < l.size() && l[e] != ' ' && l[e] != '>') ++e;
      return raw.substr(q, e - q);
    }
    p = q;
  }
  return {};
}

bool is_block(std::string_view n) {
  static const std::string_view kBlock[] = {
      "p",  "div",  "br",     "li",         "ul",      "ol",      "h1",         "h2",  "h3", "h4",
      "h5", "h6",   "tr",     "table",      "section", "article", "blockquote", "dd",  "dt", "dl",
      "hr", "main", "figure", "figcaption", "tbody",   "thead",   "title",      "body"};
  return std::find(std::begin(kBlock), std::end(kBlock), n) != std::end(kBlock);
}

bool is_void(std::string_view n) {
  static const std::string_view kVoid[] = {"br",    "img",   "hr",     "meta", "link",
                                           "input", "wbr",   "source", "area", "base",
                                           "col",   "embed", "param"};
  return std::find(std::begin(kVoid), std::end(kVoid), n) != std::end(kVoid);
}

bool is_boilerplate(const Tag& t) {
  static const std::string_view kDrop[] = {"head",   "script",   "style", "nav",
                                           "footer", "header",   "aside", "noscript",
                                           "form",   "template", "svg",   "iframe"};
  if (std::find(std::begin(kDrop), std::end(kDrop), t.name) != std::end(kDrop)) return true;
  std::string cls = lower(attr(t.attrs, "class") + " " + attr(t.attrs, "id"));
  for (std::string_view w :
       {"nav", "menu", "footer", "header", "sidebar", "cookie", "breadcrumb", "banner"})
    if (cls.find(w) != std::string::npos) return true;
  return false;
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_len(s, i);
    if (!n) return i;
    i += n;
  }
  return std::string_view::npos;
}

size_t repair_utf8(std::string& s) {
  if (find_invalid_utf8(s) == std::string::npos) return 0;
  std::string out;
  out.reserve(s.size() + 16);
  size_t bad = 0;
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_len(s, i);
    if (n) {
      out.append(s, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      ++bad;
      ++i;
      while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) ++i;
    }
  }
  s = std::move(out);
  return bad;
}

bool looks_like_html(std::string_view s) {
  std::string head = lower(s.substr(0, 2048));
  return head.find("<!doctype html") != std::string::npos ||
         head.find("<html") != std::string::npos || head.find("<body") != std::string::npos;
}

std::string html_to_text(std::string_view s, const HtmlOptions& opts) {
  std::string out;
  out.reserve(s.size() / 2);
  std::string skip_tag;  // inside a dropped element: its name, and how deeply it nests
  int skip_depth = 0;
  int pre_depth = 0;  // inside <pre>: whitespace is kept
  bool space_pending = false;
  auto newline = [&] {
    while (!out.empty() && out.back() == ' ') out.pop_back();
    if (!out.empty() && out.back() != '\n') out.push_back('\n');
    space_pending = false;
  };
  auto emit_text = [&](std::string_view t) {
    for (size_t i = 0; i < t.size(); ++i) {
      char c = t[i];
      if (c == '&') {
        std::string dec;
        size_t n = decode_entity(t, i, dec);
        if (n) {
          if (space_pending && !out.empty() && out.back() != '\n') out.push_back(' ');
          space_pending = false;
          out += dec;
          i += n - 1;
          continue;
        }
      }
      if (pre_depth > 0) {
        out.push_back(c);
      } else if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
        space_pending = true;
      } else {
        if (space_pending && !out.empty() && out.back() != '\n') out.push_back(' ');
        space_pending = false;
        out.push_back(c);
      }
    }
  };
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '<') {
      size_t e = s.find('<', i);
      if (e == std::string_view::npos) e = s.size();
      if (skip_depth == 0) emit_text(s.substr(i, e - i));
      i = e;
      continue;
    }
    if (s.compare(i, 4, "<!--") == 0) {
      size_t e = s.find("-->", i + 4);
      i = e == std::string_view::npos ? s.size() : e + 3;
      continue;
    }
    if (i + 1 < s.size() && (s[i + 1] == '!' || s[i + 1] == '?')) {  // doctype, CDATA, PI
      size_t e = s.find('>', i);
      i = e == std::string_view::npos ? s.size() : e + 1;
      continue;
    }
    // Parse a tag; a '<' that does not start one is text.
    size_t j = i + 1;
    Tag t;
    if (j < s.size() && s[j] == '/') t.closing = true, ++j;
    size_t ns = j;
    while (j < s.size() &&
           (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '-' || s[j] == ':'))
      ++j;
    if (j == ns) {
      if (skip_depth == 0) emit_text("<");
      ++i;
      continue;
    }
    t.name = lower(s.substr(ns, j - ns));
    size_t e = j;
    char quote = 0;
    for (; e < s.size(); ++e) {
      if (quote) {
        if (s[e] == quote) quote = 0;
      } else if (s[e] == '"' || s[e] == '\'') {
        quote = s[e];
      } else if (s[e] == '>') {
        break;
      }
    }
    t.attrs = std::string(s.substr(j, e - j));
    t.self_closing = !t.attrs.empty() && t.attrs.back() == '/';
    i = e < s.size() ? e + 1 : s.size();

    if (skip_depth > 0) {
      if (t.name == skip_tag && !is_void(t.name) && !t.self_closing)
        skip_depth += t.closing ? -1 : 1;
      continue;
    }
    // Raw-text elements: their content is not HTML, so find the close tag directly.
    if (!t.closing && (t.name == "script" || t.name == "style")) {
      std::string close = "</" + t.name;
      size_t k = i;
      while (k < s.size() && !ieq_prefix(s, k, close)) ++k;
      std::string_view body = s.substr(i, k - i);
      std::string type = lower(attr(t.attrs, "type"));
      if (opts.keep_math && t.name == "script" && type.find("math/tex") != std::string::npos) {
        if (space_pending && !out.empty() && out.back() != '\n') out.push_back(' ');
        out += "$" + std::string(body) + "$";
      }
      size_t gt = s.find('>', k);
      i = gt == std::string_view::npos ? s.size() : gt + 1;
      continue;
    }
    if (opts.keep_math && !t.closing && t.name == "math") {
      std::string alt = attr(t.attrs, "alttext");
      if (!alt.empty()) {
        if (space_pending && !out.empty() && out.back() != '\n') out.push_back(' ');
        out += "$" + alt + "$";
        skip_tag = "math";
        skip_depth = 1;
        continue;
      }
    }
    if (opts.keep_math && !t.closing && t.name == "img") {
      std::string cls = lower(attr(t.attrs, "class"));
      if (cls.find("math") != std::string::npos || cls.find("tex") != std::string::npos) {
        out += " $" + attr(t.attrs, "alt") + "$";
      }
      continue;
    }
    const bool code = t.name == "pre" || t.name == "code";
    if (!t.closing && ((code && !opts.keep_code) || (!code && is_boilerplate(t)))) {
      if (!is_void(t.name) && !t.self_closing) {
        skip_tag = t.name;
        skip_depth = 1;
      }
      continue;
    }
    if (t.name == "pre") {
      newline();
      if (t.closing) {
        pre_depth = std::max(0, pre_depth - 1);
        if (!out.empty() && out.back() != '\n') out.push_back('\n');
      } else {
        ++pre_depth;
      }
      continue;
    }
    if (t.name == "li" && !t.closing) {
      newline();
      out += "- ";
      continue;
    }
    if (is_block(t.name)) newline();
  }
  return normalize_text(out);
}

std::string normalize_text(std::string_view s, NormalizeStats* stats) {
  NormalizeStats st;
  // Pass 1: character mapping.
  std::string a;
  a.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = 0;
    size_t n = utf8_len(s, i, &cp);
    if (!n) {  // callers repair first; keep the byte rather than lose text
      a.push_back(s[i++]);
      continue;
    }
    i += n;
    if (cp == '\r') {
      if (i < s.size() && s[i] == '\n') continue;
      a.push_back('\n');
      continue;
    }
    if ((cp < 0x20 && cp != '\n' && cp != '\t') || cp == 0x7F || (cp >= 0x80 && cp < 0xA0) ||
        (cp >= 0x200B && cp <= 0x200F) || cp == 0xFEFF || cp == 0xAD || cp == 0x2060) {
      ++st.chars_removed;
      continue;
    }
    if (cp == 0xA0 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x202F || cp == 0x205F ||
        cp == 0x3000) {
      a.push_back(' ');
      ++st.chars_mapped;
    } else if (cp >= 0xFF01 && cp <= 0xFF5E) {
      a.push_back(char(cp - 0xFF01 + 0x21));
      ++st.chars_mapped;
    } else if (cp == 0xFB01 || cp == 0xFB02) {
      a += cp == 0xFB01 ? "fi" : "fl";
      ++st.chars_mapped;
    } else {
      put_utf8(a, cp);
    }
  }
  // Pass 2: whitespace per line.
  std::string out;
  out.reserve(a.size());
  int blank_run = 0;
  size_t pos = 0;
  while (pos <= a.size()) {
    size_t e = a.find('\n', pos);
    if (e == std::string::npos) e = a.size();
    std::string_view line(a.data() + pos, e - pos);
    size_t lead = 0;
    while (lead < line.size() && (line[lead] == ' ' || line[lead] == '\t')) ++lead;
    std::string l(line.substr(0, lead));
    bool sp = false;
    for (size_t k = lead; k < line.size(); ++k) {
      if (line[k] == ' ' || line[k] == '\t') {
        sp = true;
      } else {
        if (sp) l.push_back(' ');
        sp = false;
        l.push_back(line[k]);
      }
    }
    if (l.size() == lead) {
      if (!out.empty()) ++blank_run;
    } else {
      if (!out.empty()) out += blank_run > 0 ? "\n\n" : "\n";
      blank_run = 0;
      out += l;
    }
    pos = e + 1;
  }
  if (stats) *stats = st;
  return out;
}

}  // namespace llama3::data
