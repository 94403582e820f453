// Qwen2 byte-level BPE (spec §1.3). The steps follow Hugging Face `tokenizers` (the reference
// the fixtures were made with): added tokens are cut out first (leftmost-longest), the rest is
// NFC-normalized, split with the pre-tokenizer regex, byte-mapped and merged pair by pair,
// lowest rank first and leftmost first among equal ranks.
#include "text/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "core/check.h"

namespace zi {
namespace {

using json = nlohmann::json;

// The Qwen2 pre-tokenizer split (spec §1.3 step 3); used when a file does not carry its own.
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// GPT-2's split, which a ByteLevel pre-tokenizer with use_regex=true applies.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Length (1..4) of the valid UTF-8 character at p, or minus the length of its maximal invalid
// subpart (Unicode §3.9), which is the unit Python and Rust replace by one U+FFFD.
int utf8_char(const unsigned char* p, size_t n) {
  unsigned c = p[0];
  if (c < 0x80) return 1;
  int len;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return -1;
  }
  for (int i = 1; i < len; ++i) {
    if (size_t(i) >= n || p[i] < lo || p[i] > hi) return -i;
    lo = 0x80;
    hi = 0xBF;
  }
  return len;
}

size_t invalid_utf8_at(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    int n = utf8_char(p + i, s.size() - i);
    if (n <= 0) return i;
    i += size_t(n);
  }
  return std::string_view::npos;
}

void check_utf8(std::string_view s) {
  const size_t i = invalid_utf8_at(s);
  ZI_CHECK(i == std::string_view::npos, "[tokenizer] invalid UTF-8 in the text at byte ", i);
}

bool is_ascii(std::string_view s) {
  unsigned char acc = 0;
  for (char c : s) acc |= static_cast<unsigned char>(c);
  return acc < 0x80;
}

// Replaces invalid sequences by U+FFFD, as the reference decoder does (from_utf8_lossy).
std::string to_valid_utf8(std::string raw) {
  const auto* p = reinterpret_cast<const unsigned char*>(raw.data());
  std::string out;
  size_t i = 0, clean = 0;  // raw[clean, i) is valid and not yet copied
  bool changed = false;
  while (i < raw.size()) {
    int n = utf8_char(p + i, raw.size() - i);
    if (n > 0) {
      i += size_t(n);
      continue;
    }
    out.append(raw, clean, i - clean);
    out += "\xEF\xBF\xBD";
    i += size_t(-n);
    clean = i;
    changed = true;
  }
  if (!changed) return raw;
  out.append(raw, clean, std::string::npos);
  return out;
}

// PCRE2's \s also matches U+180E (a space before Unicode 6.3, a format character since);
// Oniguruma, the reference's engine, follows today's White_Space property. Spelling the set
// out makes the two split alike. (\S inside a [...] class is left alone: no known pattern has it.)
std::string onig_compatible_pattern(std::string_view pat) {
  constexpr std::string_view ws =
      R"(\x{09}-\x{0D}\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pat.size(); ++i) {
    const char c = pat[i];
    if (c == '\\' && i + 1 < pat.size()) {
      const char n = pat[++i];
      if (n == 's') {
        out += in_class ? std::string(ws) : str_cat("[", ws, "]");
      } else if (n == 'S' && !in_class) {
        out += str_cat("[^", ws, "]");
      } else {
        out += c;
        out += n;
      }
      continue;
    }
    out += c;
    if (!in_class && c == '[') {
      in_class = true;
      if (i + 1 < pat.size() && pat[i + 1] == '^') out += pat[++i];
      if (i + 1 < pat.size() && pat[i + 1] == ']') out += pat[++i];  // a leading ']' is literal
    } else if (in_class && c == '[' && i + 1 < pat.size() && pat[i + 1] == ':') {
      size_t e = pat.find(":]", i + 2);  // POSIX class such as [:alpha:]
      if (e != std::string_view::npos) {
        out.append(pat.substr(i + 1, e + 1 - i));
        i = e + 1;
      }
    } else if (in_class && c == ']') {
      in_class = false;
    }
  }
  return out;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}

// GPT-2 bytes_to_unicode (spec §1.3 step 4): printable bytes keep their code point, the other
// 68 bytes take U+0100.. in increasing byte order, so every byte becomes a visible character.
struct ByteMap {
  std::array<uint32_t, 256> cp{};
  std::array<int16_t, 0x144> byte_of{};  // inverse, -1 where no byte maps to the code point

  ByteMap() {
    byte_of.fill(-1);
    uint32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      cp[b] = keep ? uint32_t(b) : next++;
      byte_of[cp[b]] = int16_t(b);
    }
  }
  // The raw bytes a vocab token stands for; characters outside the map are kept as UTF-8.
  std::string token_bytes(std::string_view tok) const {
    std::string out;
    const auto* p = reinterpret_cast<const unsigned char*>(tok.data());
    for (size_t i = 0; i < tok.size();) {
      int n = utf8_char(p + i, tok.size() - i);
      if (n <= 0) {  // not reachable for JSON-parsed strings; keep the byte
        out += tok[i++];
        continue;
      }
      uint32_t c = p[i];
      if (n == 2) c = ((p[i] & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
      if (n <= 2 && c < byte_of.size() && byte_of[c] >= 0) {
        out += char(byte_of[c]);
      } else {
        out.append(tok.substr(i, size_t(n)));
      }
      i += size_t(n);
    }
    return out;
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// (left id, right id) → (rank, merged id). Open addressing with linear probing: the BPE loop
// does one lookup per adjacent pair, and a flat table keeps that to about one cache miss.
class PairMap {
 public:
  struct Merge {
    int32_t rank, merged;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap * 3 < n * 5) cap *= 2;  // load factor ≤ 0.6
    slots_.assign(cap, Slot{kEmpty, {0, 0}});
    mask_ = cap - 1;
    size_ = 0;
  }
  // A repeated pair keeps the later rank, like the reference (a dict / HashMap built in order).
  void insert(int32_t a, int32_t b, Merge m) {
    if ((size_ + 1) * 5 > slots_.size() * 3) grow();
    uint64_t k = key(a, b);
    size_t i = hash(k) & mask_;
    while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask_;
    if (slots_[i].key == kEmpty) ++size_;
    slots_[i] = Slot{k, m};
  }
  const Merge* find(int32_t a, int32_t b) const {
    uint64_t k = key(a, b);
    for (size_t i = hash(k) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == k) return &slots_[i].m;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  struct Slot {
    uint64_t key;
    Merge m;
  };
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // ids are ≥ 0, so no real key is all ones
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static size_t hash(uint64_t k) {  // murmur3 finalizer: ids are small and dense
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return size_t(k);
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    reserve(old.size());  // old.size() slots at 0.6 → doubles
    for (const Slot& s : old)
      if (s.key != kEmpty) insert(int32_t(s.key >> 32), int32_t(uint32_t(s.key)), s.m);
  }
  std::vector<Slot> slots_{Slot{kEmpty, {0, 0}}};
  size_t mask_ = 0, size_ = 0;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

struct AddedToken {
  std::string content;
  int32_t id;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  ZI_CHECK(f.good(), path, ": cannot open");
  std::ostringstream ss;
  ss << f.rdbuf();
  ZI_CHECK(!f.bad(), path, ": read error");
  return std::move(ss).str();
}

json parse_json(const std::string& path, const std::string& text, const json::parser_callback_t& cb = nullptr) {
  try {
    return json::parse(text, cb);
  } catch (const json::exception& e) {
    throw Error(str_cat(path, ": invalid JSON: ", e.what()));
  }
}

json read_json(const std::string& path) { return parse_json(path, read_file(path)); }

// Where the two big tables of a tokenizer file are, and who takes their entries.
struct BigTables {
  bool vocab_at_root = false;  // vocab.json: the document is the vocab; else tokenizer.json's model.vocab
  std::function<void(std::string&& token, const json& id)> on_vocab;
  std::function<void(const json& merge)> on_merges;  // model.merges entries: "a b" or ["a", "b"]
};

// read_json, except that the entries of the vocab and merges tables go to callbacks and are
// left out of the returned DOM: they are ~300k values, and building a DOM of them doubled
// the load time.
json read_json_streaming(const std::string& path, const BigTables& t) {
  enum class In { kOther, kModel, kVocab, kMerges } in = t.vocab_at_root ? In::kVocab : In::kOther;
  const int entry_depth = t.vocab_at_root ? 1 : 3;  // containers open around a table entry
  std::string key;
  auto cb = [&](int depth, json::parse_event_t ev, json& v) {
    using E = json::parse_event_t;
    if (ev == E::key && !t.vocab_at_root && depth <= 2) {  // track which table we are in
      const std::string& k = v.get_ref<const std::string&>();
      if (depth == 1) {
        in = k == "model" ? In::kModel : In::kOther;
      } else if (in != In::kOther) {
        in = k == "vocab" ? In::kVocab : k == "merges" ? In::kMerges : In::kModel;
      }
      return true;
    }
    if (depth != entry_depth) return true;
    const bool entry_done = ev == E::value || ev == E::array_end || ev == E::object_end;
    if (in == In::kVocab && ev == E::key) {
      key = std::move(v.get_ref<std::string&>());
      return false;
    }
    if (in == In::kVocab && entry_done) {
      t.on_vocab(std::move(key), v);
      return false;
    }
    if (in == In::kMerges && entry_done) {
      t.on_merges(v);
      return false;
    }
    return true;
  };
  return parse_json(path, read_file(path), cb);
}

int32_t json_id(const json& v, const std::string& path, std::string_view what) {
  ZI_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (int64_t(1) << 24), path, ": ", what,
           ": id must be an integer in [0, 2^24), got ", v.dump());
  return v.get<int32_t>();
}

}  // namespace

struct BpeTokenizer::Impl {
  std::string file;  // named in errors
  TokenMap vocab;
  PairMap pairs;
  std::vector<AddedToken> added;
  TokenMap added_ids;
  std::array<std::vector<uint32_t>, 256> added_by_byte;  // indices into `added`, longest first
  std::array<int32_t, 256> byte_id{};
  std::vector<std::string> id_bytes;  // decode table
  bool nfc = true;
  bool ignore_merges = false;  // a word that is a whole vocab token skips the merges
  std::string pattern{kQwen2Pattern};
  pcre2_code* re = nullptr;
  bool jit = false;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() { pcre2_code_free(re); }

  // Per-call working memory, so a shared tokenizer needs no locks.
  struct Scratch {
    struct Sym {
      int32_t id, prev, next;  // a doubly linked list over the word; id -1 once merged away
    };
    struct Cand {
      int32_t rank, pos, left, right, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<Sym> sym;
    std::vector<Cand> heap;
    std::string norm;
    pcre2_match_data* md = nullptr;
    explicit Scratch(const pcre2_code* re) : md(re ? pcre2_match_data_create_from_pattern(re, nullptr) : nullptr) {
      ZI_CHECK(!re || md, "[tokenizer] out of memory");
    }
    ~Scratch() { pcre2_match_data_free(md); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
  };

  void add_vocab(std::string&& token, int32_t id) { vocab[std::move(token)] = id; }
  // `where` + `where_no` locate the merge in its file for the error message.
  void add_merge(std::string_view a, std::string_view b, size_t rank, std::string& buf, const char* where,
                 size_t where_no);
  void add_added(std::string content, int32_t id);
  void finish();

  const AddedToken* match_added(std::string_view text, size_t i) const;
  void encode_segment(std::string_view seg, Scratch& s, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>& out) const;
  size_t next_match(std::string_view s, size_t from, Scratch& sc, size_t* end) const;
};

void BpeTokenizer::Impl::add_merge(std::string_view a, std::string_view b, size_t rank, std::string& buf,
                                   const char* where, size_t where_no) {
  auto ia = vocab.find(a), ib = vocab.find(b);
  buf.assign(a);
  buf.append(b);
  auto im = vocab.find(std::string_view(buf));
  ZI_CHECK(ia != vocab.end() && ib != vocab.end() && im != vocab.end(), file, ": ", where, where_no, ": merge \"", a,
           " ", b, "\" uses a token that is not in the vocab");
  pairs.insert(ia->second, ib->second, {int32_t(rank), im->second});
}

void BpeTokenizer::Impl::add_added(std::string content, int32_t id) {
  if (content.empty()) return;  // cannot match anything
  added_ids[content] = id;
  added.push_back({std::move(content), id});
}

void BpeTokenizer::Impl::finish() {
  const ByteMap& bm = byte_map();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, bm.cp[b]);
    auto it = vocab.find(ch);
    ZI_CHECK(it != vocab.end(), file, ": the vocab lacks the byte token \"", ch, "\" (byte ", b,
             "); not a byte-level BPE vocab");
    byte_id[b] = it->second;
  }
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab) max_id = std::max(max_id, id);
  for (const AddedToken& t : added) max_id = std::max(max_id, t.id);
  id_bytes.assign(size_t(max_id + 1), std::string());
  for (const auto& [tok, id] : vocab) id_bytes[size_t(id)] = bm.token_bytes(tok);
  for (const AddedToken& t : added) id_bytes[size_t(t.id)] = t.content;  // added tokens decode verbatim

  // Longest first, so the first hit at a position is the leftmost-longest match.
  for (uint32_t i = 0; i < added.size(); ++i) added_by_byte[uint8_t(added[i].content[0])].push_back(i);
  for (auto& v : added_by_byte)
    std::stable_sort(v.begin(), v.end(),
                     [&](uint32_t x, uint32_t y) { return added[x].content.size() > added[y].content.size(); });

  if (pattern.empty()) return;  // no pre-tokenizer: each segment is one word
  int err = 0;
  PCRE2_SIZE off = 0;
  const std::string pcre_pattern = onig_compatible_pattern(pattern);
  re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre_pattern.data()), pcre_pattern.size(), PCRE2_UTF | PCRE2_UCP,
                     &err, &off, nullptr);
  if (!re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw Error(str_cat(file, ": pre-tokenizer regex does not compile at offset ", off, ": ",
                        reinterpret_cast<const char*>(msg)));
  }
  // JIT is several times faster; without it (unsupported CPU) the interpreter gives the same splits.
  jit = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE) == 0;
}

const AddedToken* BpeTokenizer::Impl::match_added(std::string_view text, size_t i) const {
  for (uint32_t k : added_by_byte[uint8_t(text[i])]) {
    const std::string& c = added[k].content;
    if (text.size() - i >= c.size() && std::memcmp(text.data() + i, c.data(), c.size()) == 0) return &added[k];
  }
  return nullptr;
}

// Start of the next regex match at or after `from` (its end in *end), or npos.
size_t BpeTokenizer::Impl::next_match(std::string_view s, size_t from, Scratch& sc, size_t* end) const {
  auto subj = reinterpret_cast<PCRE2_SPTR>(s.data());
  int rc = jit ? pcre2_jit_match(re, subj, s.size(), from, 0, sc.md, nullptr) : PCRE2_ERROR_JIT_BADOPTION;
  // The interpreter keeps its backtracking state on the heap, so it also takes over when a
  // pathological input overflows the small JIT stack.
  if (rc == PCRE2_ERROR_JIT_BADOPTION || rc == PCRE2_ERROR_JIT_STACKLIMIT)
    rc = pcre2_match(re, subj, s.size(), from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, sc.md, nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return std::string_view::npos;
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    throw Error(str_cat("[tokenizer] regex match failed: ", reinterpret_cast<const char*>(msg)));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(sc.md);
  *end = ov[1];
  return ov[0];
}

// One piece of text between added tokens: normalize, split into words, BPE each word.
// Text the regex does not cover becomes a word of its own (the reference "Isolated" split);
// with the Qwen2 pattern that never happens.
void BpeTokenizer::Impl::encode_segment(std::string_view seg, Scratch& s, std::vector<int32_t>& out) const {
  if (seg.empty()) return;
  if (nfc && !is_ascii(seg)) {  // ASCII is already NFC, and is the common case
    utf8proc_uint8_t* dst = nullptr;
    utf8proc_ssize_t n =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(seg.data()), utf8proc_ssize_t(seg.size()), &dst,
                     utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) throw Error(str_cat("[tokenizer] NFC normalization failed: ", utf8proc_errmsg(n)));
    s.norm.assign(reinterpret_cast<const char*>(dst), size_t(n));
    std::free(dst);
    seg = s.norm;
  }
  if (!re) {
    bpe_word(seg, s, out);
    return;
  }
  size_t done = 0, from = 0, end = 0;
  while (from < seg.size()) {
    size_t begin = next_match(seg, from, s, &end);
    if (begin == std::string_view::npos) break;
    if (end == begin) {  // an empty match emits nothing; step over one character
      int n = utf8_char(reinterpret_cast<const unsigned char*>(seg.data()) + begin, seg.size() - begin);
      from = begin + size_t(n > 0 ? n : 1);
      continue;
    }
    if (begin > done) bpe_word(seg.substr(done, begin - done), s, out);
    bpe_word(seg.substr(begin, end - begin), s, out);
    done = from = end;
  }
  if (done < seg.size()) bpe_word(seg.substr(done), s, out);
}

// Byte-level BPE of one word. A min-heap holds candidate pairs ordered by (rank, position);
// a popped candidate is applied only if both symbols are still the ones it was made from.
// This is the reference's own order (tokenizers' word merge queue). For real merge tables,
// where a merge's parts come from earlier merges, it also equals the textbook loop "merge
// every occurrence of the lowest-rank pair, left to right".
void BpeTokenizer::Impl::bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>& out) const {
  const auto* w = reinterpret_cast<const unsigned char*>(word.data());
  const int32_t n = int32_t(word.size());
  if (n == 1) {
    out.push_back(byte_id[w[0]]);
    return;
  }
  if (ignore_merges) {
    std::string mapped;
    for (int32_t i = 0; i < n; ++i) append_utf8(mapped, byte_map().cp[w[i]]);
    if (auto it = vocab.find(mapped); it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  auto& sym = s.sym;
  auto& heap = s.heap;
  sym.resize(size_t(n));
  for (int32_t i = 0; i < n; ++i) sym[size_t(i)] = {byte_id[w[i]], i - 1, i + 1 < n ? i + 1 : -1};
  heap.clear();
  auto push_pair = [&](int32_t i) {
    int32_t j = sym[size_t(i)].next;
    if (const PairMap::Merge* m = pairs.find(sym[size_t(i)].id, sym[size_t(j)].id)) {
      heap.push_back({m->rank, i, sym[size_t(i)].id, sym[size_t(j)].id, m->merged});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Scratch::Cand c = heap.back();
    heap.pop_back();
    Scratch::Sym& a = sym[size_t(c.pos)];
    if (a.id != c.left || a.next < 0 || sym[size_t(a.next)].id != c.right) continue;  // stale
    Scratch::Sym& b = sym[size_t(a.next)];
    a.id = c.merged;
    b.id = -1;
    a.next = b.next;
    if (a.next >= 0) sym[size_t(a.next)].prev = c.pos;
    if (a.prev >= 0) push_pair(a.prev);
    if (a.next >= 0) push_pair(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// The normalizer of a tokenizer.json: only NFC (alone or in a Sequence) or none is supported.
bool parse_normalizer(const json& n, const std::string& path) {
  if (n.is_null()) return false;
  const std::string type = n.value("type", "");
  if (type == "NFC") return true;
  if (type == "Sequence") {
    bool nfc = false;
    for (const json& c : n.at("normalizers")) nfc = parse_normalizer(c, path) || nfc;
    return nfc;
  }
  throw Error(str_cat(path, ": normalizer type \"", type, "\" is not supported (only NFC)"));
}

// The split regex of a tokenizer.json pre_tokenizer ("" = no split).
std::string parse_pre_tokenizer(const json& p, const std::string& path) {
  if (p.is_null()) return "";
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    std::string pat;
    for (const json& c : p.at("pretokenizers")) {
      std::string sub = parse_pre_tokenizer(c, path);
      ZI_CHECK(sub.empty() || pat.empty(), path, ": more than one regex pre-tokenizer is not supported");
      if (!sub.empty()) pat = sub;
    }
    return pat;
  }
  if (type == "ByteLevel") return p.value("use_regex", true) ? std::string(kGpt2Pattern) : "";
  if (type == "Split") {
    ZI_CHECK(p.value("behavior", "") == "Isolated" && !p.value("invert", false), path,
             ": only Split pre-tokenizers with behavior Isolated, invert false are supported");
    const json& pat = p.at("pattern");
    ZI_CHECK(pat.contains("Regex"), path, ": Split pre-tokenizer needs a Regex pattern");
    return pat.at("Regex").get<std::string>();
  }
  throw Error(str_cat(path, ": pre_tokenizer type \"", type, "\" is not supported"));
}

void check_model_options(const json& m, const std::string& path) {
  ZI_CHECK(m.value("type", "BPE") == "BPE", path, ": model type must be BPE");
  auto str_or_null = [&](const char* k) { return m.contains(k) && m[k].is_string() ? m[k].get<std::string>() : ""; };
  ZI_CHECK(str_or_null("continuing_subword_prefix").empty() && str_or_null("end_of_word_suffix").empty(), path,
           ": BPE subword prefixes/suffixes are not supported");
  ZI_CHECK(!(m.contains("byte_fallback") && m["byte_fallback"].is_boolean() && m["byte_fallback"].get<bool>()), path,
           ": byte_fallback is not supported");
  ZI_CHECK(!m.contains("dropout") || m["dropout"].is_null(), path, ": BPE dropout is not supported");
}

std::pair<std::string_view, std::string_view> split_merge(std::string_view line) {
  size_t sp = line.find(' ');
  if (sp == std::string_view::npos || line.find(' ', sp + 1) != std::string_view::npos) return {};
  return {line.substr(0, sp), line.substr(sp + 1)};
}

}  // namespace

BpeTokenizer BpeTokenizer::from_tokenizer_json(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->file = path;
  impl->vocab.reserve(size_t(1) << 17);  // the size is not known before streaming; Qwen has 151k
  // Merges can only be resolved to ids once the whole vocab is known.
  std::vector<std::pair<std::string, std::string>> merges;
  BigTables tables;
  tables.on_vocab = [&](std::string&& tok, const json& id) {
    const int32_t i = json_id(id, path, tok);
    impl->add_vocab(std::move(tok), i);
  };
  tables.on_merges = [&](const json& m) {
    std::pair<std::string_view, std::string_view> ab;
    if (m.is_string()) {
      ab = split_merge(m.get_ref<const std::string&>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      ab = {m[0].get_ref<const std::string&>(), m[1].get_ref<const std::string&>()};
    }
    ZI_CHECK(!ab.first.empty() && !ab.second.empty(), path, ": model.merges[", merges.size(),
             "] must be \"a b\" or [\"a\", \"b\"], got ", m.dump());
    merges.emplace_back(ab.first, ab.second);
  };
  const json j = read_json_streaming(path, tables);
  try {
    const json& model = j.at("model");
    check_model_options(model, path);
    ZI_CHECK(model.contains("vocab") && model.contains("merges"), path, ": model.vocab or model.merges is missing");
    impl->ignore_merges = model.value("ignore_merges", false);
    impl->pairs.reserve(merges.size());
    std::string buf;
    for (size_t r = 0; r < merges.size(); ++r)
      impl->add_merge(merges[r].first, merges[r].second, r, buf, "model.merges #", r);
    if (j.contains("added_tokens") && !j["added_tokens"].is_null())
      for (const json& t : j["added_tokens"])
        impl->add_added(t.at("content").get<std::string>(), json_id(t.at("id"), path, "added_tokens"));
    impl->nfc = parse_normalizer(j.value("normalizer", json()), path);
    impl->pattern = parse_pre_tokenizer(j.value("pre_tokenizer", json()), path);
  } catch (const json::exception& e) {
    throw Error(str_cat(path, ": unexpected tokenizer.json layout: ", e.what()));
  }
  impl->finish();
  return BpeTokenizer(std::move(impl));
}

BpeTokenizer BpeTokenizer::from_vocab_merges(const std::string& vocab_json, const std::string& merges_txt,
                                             const std::string& tokenizer_config_json) {
  auto impl = std::make_shared<Impl>();
  impl->file = vocab_json;
  BigTables tables;
  tables.vocab_at_root = true;
  tables.on_vocab = [&](std::string&& tok, const json& id) {
    const int32_t i = json_id(id, vocab_json, tok);
    impl->add_vocab(std::move(tok), i);
  };
  ZI_CHECK(read_json_streaming(vocab_json, tables).is_object(), vocab_json, ": must be a JSON object token -> id");
  impl->file = merges_txt;
  const std::string text = read_file(merges_txt);
  impl->pairs.reserve(size_t(std::count(text.begin(), text.end(), '\n')) + 1);
  std::string buf;
  size_t rank = 0, line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t eol = std::min(text.find('\n', pos), text.size());
    std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    // Like the reference reader: strip, skip blank lines and a leading "#version:" line.
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.remove_suffix(1);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.front()))) line.remove_prefix(1);
    if (line.empty() || (line_no == 1 && line.starts_with("#version:"))) continue;
    auto [a, b] = split_merge(line);
    ZI_CHECK(!a.empty() && !b.empty(), merges_txt, ":", line_no, ": expected \"a b\", got \"", line, "\"");
    impl->add_merge(a, b, rank++, buf, "line ", line_no);
  }
  if (!tokenizer_config_json.empty()) {
    impl->file = tokenizer_config_json;
    const json c = read_json(tokenizer_config_json);
    try {
      if (c.contains("added_tokens_decoder"))
        for (const auto& [key, t] : c.at("added_tokens_decoder").items()) {
          size_t used = 0;
          long id = -1;
          try {
            id = std::stol(key, &used);
          } catch (const std::exception&) {
          }
          ZI_CHECK(used == key.size() && id >= 0 && id < (1L << 24), tokenizer_config_json,
                   ": added_tokens_decoder key \"", key, "\" is not an id");
          impl->add_added(t.at("content").get<std::string>(), int32_t(id));
        }
    } catch (const json::exception& e) {
      throw Error(str_cat(tokenizer_config_json, ": unexpected layout: ", e.what()));
    }
  }
  impl->file = merges_txt;
  impl->finish();
  return BpeTokenizer(std::move(impl));
}

BpeTokenizer BpeTokenizer::load_dir(const std::string& tokenizer_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(tokenizer_dir);
  std::error_code ec;
  if (fs::exists(dir / "tokenizer.json", ec)) return from_tokenizer_json((dir / "tokenizer.json").string());
  if (fs::exists(dir / "vocab.json", ec) && fs::exists(dir / "merges.txt", ec)) {
    const fs::path cfg = dir / "tokenizer_config.json";
    return from_vocab_merges((dir / "vocab.json").string(), (dir / "merges.txt").string(),
                             fs::exists(cfg, ec) ? cfg.string() : std::string());
  }
  throw Error(str_cat(tokenizer_dir, ": no tokenizer.json, nor vocab.json + merges.txt"));
}

// ---------------------------------------------------------------------------------------------
// Use

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  const Impl& im = *impl_;
  check_utf8(text);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  Impl::Scratch s(im.re);
  size_t seg = 0;  // start of the text not yet encoded
  for (size_t i = 0; i < text.size();) {
    const AddedToken* t = im.added_by_byte[uint8_t(text[i])].empty() ? nullptr : im.match_added(text, i);
    if (!t) {
      ++i;
      continue;
    }
    im.encode_segment(text.substr(seg, i - seg), s, out);
    out.push_back(t->id);
    i += t->content.size();
    seg = i;
  }
  im.encode_segment(text.substr(seg), s, out);
  return out;
}

int32_t BpeTokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return -1;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string raw;
  for (int32_t id : ids) {
    ZI_CHECK(id >= 0 && size_t(id) < impl_->id_bytes.size(), "[tokenizer] decode: id ", id, " is out of range [0, ",
             impl_->id_bytes.size(), ")");
    raw += impl_->id_bytes[size_t(id)];
  }
  return to_valid_utf8(std::move(raw));
}

size_t BpeTokenizer::vocab_size() const { return impl_->id_bytes.size(); }

size_t first_invalid_utf8(std::string_view s) { return invalid_utf8_at(s); }

std::string zimage_chat_prompt(std::string_view prompt) {
  return str_cat("<|im_start|>user\n", prompt, "<|im_end|>\n<|im_start|>assistant\n");
}

std::vector<int32_t> tokenize_zimage_prompt(const BpeTokenizer& tok, std::string_view prompt, int max_length) {
  ZI_CHECK(max_length > 0, "[tokenize_zimage_prompt] max_length must be positive, got ", max_length);
  std::vector<int32_t> ids = tok.encode(zimage_chat_prompt(prompt));
  if (ids.size() > size_t(max_length)) ids.resize(size_t(max_length));
  return ids;
}

}  // namespace zi
