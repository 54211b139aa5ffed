// Tokenizer: loading tokenizer.json, added-token splitting, NFC (ICU), regex pre-tokenization (PCRE2 JIT),
// rank-ordered BPE with a per-word cache, and the ByteLevel decoder. The behaviour mirrors Hugging Face
// `tokenizers` (AddedVocabulary::find_matches, Split/ByteLevel pre-tokenizers, bpe::Word::merge_all,
// decoders::ByteLevel); tests/io/test_tokenizer.cpp holds it to ids the package produced.
#include "io/tokenizer.h"
#include "io/tokenizer_path.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "core/check.h"

namespace q3vl::io {

namespace {

using Json = nlohmann::json;

// ---- UTF-8 -------------------------------------------------------------------------------------------

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 if ill-formed there; *valid_prefix gets
// how many bytes (>= 1) belong to the maximal ill-formed subpart, the unit one U+FFFD replaces.
size_t utf8_sequence(std::string_view s, size_t i, size_t* valid_prefix) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned c = b(i);
  if (c < 0x80) return 1;
  size_t need = 0;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    need = 2;
  } else if (c == 0xED) {
    need = 2, hi = 0x9F;  // excludes UTF-16 surrogates
  } else if (c == 0xF0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xF1 && c <= 0xF3) {
    need = 3;
  } else if (c == 0xF4) {
    need = 3, hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *valid_prefix = 1;
    return 0;
  }
  size_t k = 0;
  for (; k < need && i + 1 + k < s.size(); ++k) {
    const unsigned d = b(i + 1 + k);
    if (k == 0 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) break;
  }
  *valid_prefix = 1 + k;
  return k == need ? 1 + need : 0;
}

void check_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t prefix = 0;
    const size_t len = utf8_sequence(s, i, &prefix);
    Q3VL_CHECK(len != 0, "tokenizer: input text is not valid UTF-8 at byte offset ", i);
    i += len;
  }
}

// Decodes the code point at s[i] (well-formed) and advances i past it.
char32_t next_code_point(std::string_view s, size_t& i) {
  const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[k])); };
  const char32_t c = b(i);
  if (c < 0x80) return i += 1, c;
  if (c < 0xE0) return i += 2, ((c & 0x1F) << 6) | (b(i - 1) & 0x3F);
  if (c < 0xF0) return i += 3, ((c & 0x0F) << 12) | ((b(i - 2) & 0x3F) << 6) | (b(i - 1) & 0x3F);
  return i += 4, ((c & 0x07) << 18) | ((b(i - 3) & 0x3F) << 12) | ((b(i - 2) & 0x3F) << 6) | (b(i - 1) & 0x3F);
}

// Decodes the code point that ends at s[i - 1] (well-formed) and moves i back to its first byte.
char32_t prev_code_point(std::string_view s, size_t& i) {
  size_t start = i - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t k = start;
  const char32_t c = next_code_point(s, k);
  i = start;
  return c;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Rust's String::from_utf8_lossy: well-formed sequences copied, each maximal ill-formed subpart -> U+FFFD.
std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    size_t prefix = 0;
    const size_t len = utf8_sequence(bytes, i, &prefix);
    if (len != 0) {
      out.append(bytes.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

// Unicode White_Space: Rust regex `\s`, which the package's lstrip/rstrip use.
bool is_white_space(char32_t c) { return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_WHITE_SPACE); }

// Rust regex `\w` (UTS #18): Alphabetic, marks, decimal numbers, connector punctuation, Join_Control.
bool is_word_char(char32_t c) {
  const auto cp = static_cast<UChar32>(c);
  return u_hasBinaryProperty(cp, UCHAR_ALPHABETIC) || u_hasBinaryProperty(cp, UCHAR_JOIN_CONTROL) ||
         (U_GET_GC_MASK(cp) & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) != 0;
}

// ---- the GPT-2 byte-level alphabet ---------------------------------------------------------------------

// Printable bytes stand for themselves; the other 68 are moved to U+0100.. in byte order, so every byte has
// a visible, whitespace-free symbol.
struct ByteAlphabet {
  static constexpr size_t kCharLimit = 256 + 68;
  std::array<char32_t, 256> byte_to_char{};
  std::array<int16_t, kCharLimit> char_to_byte{};

  ByteAlphabet() {
    char_to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_char[b] = printable ? static_cast<char32_t>(b) : next++;
      char_to_byte[byte_to_char[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// The byte-level spelling of raw bytes (what the vocabulary keys look like).
std::string byte_level_spelling(std::string_view bytes) {
  std::string out;
  for (const char b : bytes) append_utf8(out, byte_alphabet().byte_to_char[static_cast<unsigned char>(b)]);
  return out;
}

// decoders::ByteLevel for one token: its symbols' bytes, or the spelling's own UTF-8 bytes when any symbol is
// outside the alphabet (the package's fallback, hit by added tokens containing e.g. a space).
std::string byte_level_bytes(std::string_view spelling) {
  std::string out;
  for (size_t i = 0; i < spelling.size();) {
    const char32_t c = next_code_point(spelling, i);
    const int b = c < ByteAlphabet::kCharLimit ? byte_alphabet().char_to_byte[c] : -1;
    if (b < 0) return std::string(spelling);
    out += static_cast<char>(b);
  }
  return out;
}

// ---- PCRE2 -----------------------------------------------------------------------------------------------

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buf{};
  pcre2_get_error_message(code, buf.data(), buf.size());
  return reinterpret_cast<const char*>(buf.data());
}

// The package's regex engine (Oniguruma) has Unicode 16.0 tables; PCRE2 10.42 has 14.0. The letters and numbers
// assigned between the two (CJK extensions H and I, Egyptian hieroglyphs extension A, Kawi, Garay, ...; no
// character left either class) are added to \p{L} and \p{N} by hand. Derived with Python's unicodedata (14.0)
// and unicodedata2==16.0.0: code points whose general category is L* (N*) in 16.0 and not in 14.0.
constexpr std::string_view kLettersSince14 =
    "\\x{1c89}-\\x{1c8a}\\x{a7cb}-\\x{a7cd}\\x{a7da}-\\x{a7dc}\\x{105c0}-\\x{105f3}\\x{10d4a}-\\x{10d65}"
    "\\x{10d6f}-\\x{10d85}\\x{10ec2}-\\x{10ec4}\\x{1123f}-\\x{11240}\\x{11380}-\\x{11389}\\x{1138b}\\x{1138e}"
    "\\x{11390}-\\x{113b5}\\x{113b7}\\x{113d1}\\x{113d3}\\x{11bc0}-\\x{11be0}\\x{11f02}\\x{11f04}-\\x{11f10}"
    "\\x{11f12}-\\x{11f33}\\x{1342f}\\x{13441}-\\x{13446}\\x{13460}-\\x{143fa}\\x{16100}-\\x{1611d}"
    "\\x{16d40}-\\x{16d6c}\\x{18cff}\\x{1b132}\\x{1b155}\\x{1df25}-\\x{1df2a}\\x{1e030}-\\x{1e06d}"
    "\\x{1e4d0}-\\x{1e4eb}\\x{1e5d0}-\\x{1e5ed}\\x{1e5f0}\\x{2b739}\\x{2ebf0}-\\x{2ee5d}\\x{31350}-\\x{323af}";
constexpr std::string_view kNumbersSince14 =
    "\\x{10d40}-\\x{10d49}\\x{116d0}-\\x{116e3}\\x{11bf0}-\\x{11bf9}\\x{11f50}-\\x{11f59}\\x{16130}-\\x{16139}"
    "\\x{16d70}-\\x{16d79}\\x{1ccf0}-\\x{1ccf9}\\x{1d2c0}-\\x{1d2d3}\\x{1e4f0}-\\x{1e4f9}\\x{1e5f1}-\\x{1e5fa}";

// Unicode White_Space, which Oniguruma's `\s` matches. PCRE2's UCP `\s` also matches U+180E (Mongolian vowel
// separator, a format character since Unicode 6.3).
constexpr std::string_view kWhiteSpace =
    "\\t-\\r\\x20\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}";

// Rewrites a pattern written for Oniguruma so PCRE2 matches the same characters: `\s`, `\S` spelled out, and
// `\p{L}`, `\p{N}` extended as above, inside and outside character classes.
std::string to_pcre2_pattern(std::string_view pattern) {
  const auto class_body = [](std::string_view escape) -> std::string {
    if (escape == "\\s") return std::string(kWhiteSpace);
    if (escape == "\\p{L}") return "\\p{L}" + std::string(kLettersSince14);
    if (escape == "\\p{N}") return "\\p{N}" + std::string(kNumbersSince14);
    return std::string(escape);
  };
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      size_t len = 2;
      if (pattern.substr(i).starts_with("\\p{L}") || pattern.substr(i).starts_with("\\p{N}")) len = 5;
      const std::string_view escape = pattern.substr(i, len);
      i += len - 1;
      if (escape == "\\S") {
        Q3VL_CHECK(!in_class, "tokenizer: \\S inside a character class is not supported in pattern ", pattern);
        out.append("[^").append(kWhiteSpace).append("]");
      } else if (len == 5 || escape == "\\s") {
        if (!in_class) out += '[';
        out += class_body(escape);
        if (!in_class) out += ']';
      } else {
        out += escape;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

struct Pcre2CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct Pcre2MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using MatchData = std::unique_ptr<pcre2_match_data, Pcre2MatchDataDeleter>;

// One regex split stage with the Isolated behaviour: every match becomes a piece, and so does every gap.
class SplitRegex {
 public:
  SplitRegex(std::string_view pattern, const std::string& source) : pattern_(pattern) {
    const std::string compiled = to_pcre2_pattern(pattern);
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(compiled.data()), compiled.size(), PCRE2_UTF | PCRE2_UCP,
                              &error, &error_offset, nullptr));
    Q3VL_CHECK(code_, source, ": pre-tokenizer regex ", pattern, " does not compile (PCRE2: ", pcre2_message(error),
               " at offset ", error_offset, ")");
    // Without JIT support PCRE2 interprets the pattern: slower, same matches.
    pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);
  }

  // Calls piece(std::string_view) for each piece of `text` (valid UTF-8) in order. Empty matches split nothing
  // (the package drops empty pieces) and the search moves on by one character, as find_iter does.
  template <class PieceFn>
  void split(std::string_view text, pcre2_match_data* data, PieceFn&& piece) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t search = 0, piece_start = 0;
    while (search < text.size()) {
      const int rc = pcre2_match(code_.get(), subject, text.size(), search, PCRE2_NO_UTF_CHECK, data, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      // rc == 0: a match whose capture groups did not fit; only the whole match is used.
      Q3VL_CHECK(rc >= 0, "tokenizer: regex ", pattern_, " failed on a text piece of ", text.size(),
                 " bytes (PCRE2: ", pcre2_message(rc), ")");
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
      const size_t begin = ovector[0], end = ovector[1];
      if (begin == end) {
        size_t next = begin;
        next_code_point(text, next);
        search = next;
        continue;
      }
      if (begin > piece_start) piece(text.substr(piece_start, begin - piece_start));
      piece(text.substr(begin, end - begin));
      piece_start = search = end;
    }
    if (piece_start < text.size()) piece(text.substr(piece_start));
  }

 private:
  std::string pattern_;
  std::unique_ptr<pcre2_code, Pcre2CodeDeleter> code_;
};

// pre_tokenizers::ByteLevel's regex when use_regex is true (GPT-2's).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- added tokens --------------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// A piece of text after added-token splitting: an added token's id, or text (id < 0).
struct Segment {
  size_t begin = 0, end = 0;
  int32_t id = -1;
};

// AddedVocabulary's matcher for one set of patterns: leftmost-longest, non-overlapping, then the token's
// single_word / lstrip / rstrip rules applied to each match exactly as find_matches does.
class AddedTokenMatcher {
 public:
  void add(std::string pattern, const AddedToken* token) { patterns_.push_back({std::move(pattern), token}); }

  void finish() {
    for (auto& list : by_first_byte_) list.clear();
    for (size_t i = 0; i < patterns_.size(); ++i)
      by_first_byte_[static_cast<unsigned char>(patterns_[i].text[0])].push_back(i);
    for (auto& list : by_first_byte_)
      std::stable_sort(list.begin(), list.end(),
                       [&](size_t a, size_t b) { return patterns_[a].text.size() > patterns_[b].text.size(); });
  }

  bool empty() const { return patterns_.empty(); }

  void split(std::string_view text, std::vector<Segment>& out) const {
    size_t text_start = 0;  // end of the last accepted split
    size_t search = 0;      // the automaton resumes after each match, accepted or not
    while (search < text.size()) {
      size_t start = search;
      const Pattern* found = nullptr;
      for (; start < text.size() && !(found = longest_at(text, start)); ++start) {
      }
      if (!found) break;
      size_t stop = start + found->text.size();
      search = stop;
      const AddedToken& token = *found->token;
      if (token.single_word) {
        size_t before = start, after = stop;
        const bool word_before = start > 0 && is_word_char(prev_code_point(text, before));
        const bool word_after = stop < text.size() && is_word_char(next_code_point(text, after));
        if (word_before || word_after) continue;
      }
      if (token.lstrip) {
        size_t new_start = start;
        for (size_t i = start; i > 0;) {
          if (!is_white_space(prev_code_point(text, i))) break;
          new_start = i;
        }
        start = std::max(new_start, text_start);
      }
      if (token.rstrip) {
        for (size_t i = stop; i < text.size();) {
          if (!is_white_space(next_code_point(text, i))) break;
          stop = i;
        }
      }
      if (text_start < start) out.push_back({text_start, start, -1});
      out.push_back({start, stop, token.id});
      text_start = stop;
    }
    if (text_start < text.size()) out.push_back({text_start, text.size(), -1});
  }

 private:
  struct Pattern {
    std::string text;
    const AddedToken* token;
  };

  // The longest pattern that starts at text[at], if any (lists are sorted longest first).
  const Pattern* longest_at(std::string_view text, size_t at) const {
    for (const size_t p : by_first_byte_[static_cast<unsigned char>(text[at])])
      if (text.substr(at).starts_with(patterns_[p].text)) return &patterns_[p];
    return nullptr;
  }

  std::vector<Pattern> patterns_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

// ---- BPE merges ----------------------------------------------------------------------------------------

// (left id, right id) -> (rank, merged id), open addressing: the merge loop's hot lookup.
class MergeTable {
 public:
  struct Merge {
    uint32_t rank;
    int32_t merged;
  };

  explicit MergeTable(size_t count) {
    size_t capacity = 16;
    while (capacity < 2 * count) capacity *= 2;
    slots_.assign(capacity, Slot{kEmpty, {0, 0}});
    mask_ = capacity - 1;
  }

  // A pair listed twice keeps its last rank, like the package's HashMap built from the list.
  void insert_or_assign(int32_t left, int32_t right, Merge merge) {
    const uint64_t key = pack(left, right);
    size_t i = slot_of(key);
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    slots_[i] = {key, merge};
  }

  const Merge* find(int32_t left, int32_t right) const {
    const uint64_t key = pack(left, right);
    for (size_t i = slot_of(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].merge;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key;
    Merge merge;
  };
  static uint64_t pack(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  size_t slot_of(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// Merged words by their bytes, shared by all threads. 64 shards picked by hash, each behind its own mutex so
// concurrent encoders rarely meet. Short words (the bulk of text) live inline in 32-byte open-addressing slots,
// so a hit costs one lock and about one cache line; longer ones, up to the package's 256-byte cut-off, in a
// hash map. Past a shard's capacity new words are not cached.
class WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 256;

  // Appends the ids of `word` if cached.
  bool find(std::string_view word, std::vector<int32_t>& out) const {
    const uint64_t hash = hash_of(word);
    const Shard& shard = shards_[hash % kShards];
    std::lock_guard lock(shard.mutex);
    if (const Slot* slot = shard.find_slot(word, hash); slot && slot->word_size != 0) {
      out.insert(out.end(), slot->ids, slot->ids + slot->id_count);
      return true;
    }
    if (word.size() > kInlineWordBytes) {
      const auto it = shard.long_words.find(word);
      if (it != shard.long_words.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return true;
      }
    }
    return false;
  }

  void insert(std::string_view word, std::span<const int32_t> ids) {
    const uint64_t hash = hash_of(word);
    Shard& shard = shards_[hash % kShards];
    std::lock_guard lock(shard.mutex);
    if (word.size() <= kInlineWordBytes && ids.size() <= kInlineIds) {
      if (shard.slots.empty()) shard.slots.assign(kSlotsPerShard, Slot{});
      Slot* slot = shard.find_slot(word, hash);
      if (!slot || slot->word_size != 0 || shard.used_slots >= kSlotsPerShard * 3 / 4) return;
      slot->tag = static_cast<uint32_t>(hash >> 32);
      slot->word_size = static_cast<uint8_t>(word.size());
      slot->id_count = static_cast<uint8_t>(ids.size());
      std::copy(word.begin(), word.end(), slot->word);
      std::copy(ids.begin(), ids.end(), slot->ids);
      ++shard.used_slots;
    } else if (shard.long_words.size() < kLongWordsPerShard) {
      shard.long_words.try_emplace(std::string(word), ids.begin(), ids.end());
    }
  }

 private:
  static constexpr size_t kShards = 64, kSlotsPerShard = 4096, kLongWordsPerShard = 1024;
  static constexpr size_t kInlineWordBytes = 14, kInlineIds = 3;

  struct Slot {
    uint32_t tag = 0;  // high half of the word's hash
    uint8_t word_size = 0;  // 0: empty (words are never empty)
    uint8_t id_count = 0;
    char word[kInlineWordBytes] = {};
    int32_t ids[kInlineIds] = {};
  };
  static_assert(sizeof(Slot) == 32);

  struct Shard {
    mutable std::mutex mutex;
    std::vector<Slot> slots;  // allocated on the first insert
    size_t used_slots = 0;
    StringMap<std::vector<int32_t>> long_words;

    // The slot holding `word`, or the empty slot where it would go; null when it cannot be inline or the shard
    // has no slots yet. The probe starts at the hash's low bits above the shard index.
    const Slot* find_slot(std::string_view word, uint64_t hash) const {
      if (word.size() > kInlineWordBytes || slots.empty()) return nullptr;
      const auto tag = static_cast<uint32_t>(hash >> 32);
      for (size_t i = (hash / kShards) % kSlotsPerShard;; i = (i + 1) % kSlotsPerShard) {
        const Slot& slot = slots[i];
        if (slot.word_size == 0) return &slot;
        if (slot.tag == tag && slot.word_size == word.size() && std::equal(word.begin(), word.end(), slot.word))
          return &slot;
      }
    }
    Slot* find_slot(std::string_view word, uint64_t hash) {
      return const_cast<Slot*>(std::as_const(*this).find_slot(word, hash));
    }
  };

  static uint64_t hash_of(std::string_view word) { return std::hash<std::string_view>{}(word); }

  std::array<Shard, kShards> shards_;
};


// ---- reading tokenizer.json -----------------------------------------------------------------------------

// model.vocab and model.merges as read, before validation.
struct StreamedModel {
  struct Merge {
    std::string left, right;  // for the "left right" spelling: the whole line in `left`
    bool is_pair;
  };
  bool has_vocab = false, has_merges = false;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<Merge> merges;
};

// A SAX consumer that builds a DOM of tokenizer.json except model.vocab and model.merges, which it streams into
// a StreamedModel: as DOM nodes (std::map entries, one allocation each) their 150k entries cost more than all
// the rest of loading.
class TokenizerJsonReader {
 public:
  Json root;
  StreamedModel model;
  std::string error;  // why parsing stopped, when it did

  bool null() { return value(Json(nullptr)); }
  bool boolean(bool v) { return value(Json(v)); }
  bool number_integer(Json::number_integer_t v) { return value(Json(v)); }
  bool number_unsigned(Json::number_unsigned_t v) { return value(Json(v)); }
  bool number_float(Json::number_float_t v, const std::string&) { return value(Json(v)); }
  bool string(std::string& v) { return value(Json(std::move(v))); }
  bool binary(Json::binary_t&) { return fail("binary values are not JSON"); }

  bool key(std::string& k) {
    key_ = std::move(k);
    return true;
  }

  bool start_object(size_t) {
    if (top_mode() == Mode::dom && stack_.size() == 2 && stack_.back().is_model && key_ == "vocab") {
      model.has_vocab = true;
      stack_.push_back({nullptr, Mode::vocab, false});
      return true;
    }
    if (top_mode() != Mode::dom) return fail(where() + " holds an object where a token was expected");
    const bool is_model = stack_.size() == 1 && key_ == "model";
    Json* node = add(Json::object());
    stack_.push_back({node, Mode::dom, is_model});
    return true;
  }

  bool start_array(size_t) {
    if (top_mode() == Mode::dom && stack_.size() == 2 && stack_.back().is_model && key_ == "merges") {
      model.has_merges = true;
      stack_.push_back({nullptr, Mode::merges, false});
      return true;
    }
    if (top_mode() == Mode::merges) {
      model.merges.push_back({"", "", true});
      stack_.push_back({nullptr, Mode::merge_pair, false});
      pair_size_ = 0;
      return true;
    }
    if (top_mode() != Mode::dom) return fail(where() + " holds an array where a token was expected");
    Json* node = add(Json::array());
    stack_.push_back({node, Mode::dom, false});
    return true;
  }

  bool end_object() { return end(); }
  bool end_array() {
    if (top_mode() == Mode::merge_pair && pair_size_ != 2) return fail(where() + " is not a pair of tokens");
    return end();
  }

  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) {
    return fail(std::string("malformed tokenizer JSON: ") + e.what());
  }

 private:
  enum class Mode { dom, vocab, merges, merge_pair };
  struct Frame {
    Json* node;
    Mode mode;
    bool is_model;  // the top-level "model" object
  };

  Mode top_mode() const { return stack_.empty() ? Mode::dom : stack_.back().mode; }

  std::string where() const {
    switch (top_mode()) {
      case Mode::vocab:
        return "model.vocab[\"" + key_ + "\"]";
      case Mode::merges:
        return "model.merges[" + std::to_string(model.merges.size()) + "]";
      case Mode::merge_pair:
        return "model.merges[" + std::to_string(model.merges.size() - 1) + "]";
      case Mode::dom:
        break;
    }
    return "a value";
  }

  bool fail(std::string message) {
    error = std::move(message);
    return false;
  }

  bool end() {
    stack_.pop_back();
    return true;
  }

  // Places a value in the DOM under the open container; the returned node stays valid while it is open (map
  // nodes do not move, and nothing is appended to an array while its last element is open).
  Json* add(Json v) {
    if (stack_.empty()) {
      root = std::move(v);
      return &root;
    }
    Json& parent = *stack_.back().node;
    if (parent.is_object()) return &(parent[key_] = std::move(v));
    parent.push_back(std::move(v));
    return &parent.back();
  }

  bool value(Json v) {
    switch (top_mode()) {
      case Mode::vocab:
        if (!v.is_number_integer()) return fail(where() + " has id " + v.dump() + ", expected an integer in [0, 2^24)");
        model.vocab.emplace_back(key_, v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX ? -1 : v.get<int64_t>());
        return true;
      case Mode::merges:
        if (!v.is_string()) return fail(where() + " is neither \"a b\" nor [\"a\", \"b\"]");
        model.merges.push_back({v.get<std::string>(), "", false});
        return true;
      case Mode::merge_pair:
        if (!v.is_string() || pair_size_ == 2) return fail(where() + " is not a pair of tokens");
        (pair_size_++ == 0 ? model.merges.back().left : model.merges.back().right) = v.get<std::string>();
        return true;
      case Mode::dom:
        add(std::move(v));
        return true;
    }
    return true;
  }

  std::vector<Frame> stack_;
  std::string key_;
  int pair_size_ = 0;
};

// ---- JSON helpers --------------------------------------------------------------------------------------

const Json& member(const Json& object, const char* key, const std::string& where, const std::string& source) {
  Q3VL_CHECK(object.is_object(), source, ": ", where, " is not a JSON object");
  const auto it = object.find(key);
  Q3VL_CHECK(it != object.end(), source, ": ", where, " has no \"", key, "\"");
  return *it;
}

bool flag(const Json& object, const char* key, bool fallback) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? fallback : it->get<bool>();
}

std::string type_of(const Json& object, const std::string& where, const std::string& source) {
  const Json& type = member(object, "type", where, source);
  Q3VL_CHECK(type.is_string(), source, ": ", where, ".type is not a string");
  return type.get<std::string>();
}

bool empty_or_null_string(const Json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty());
}

// ---- the tokenizer -------------------------------------------------------------------------------------

// Everything a loaded tokenizer holds (Tokenizer::Impl is this; the loaders below fill it in).
struct TokenizerModel {
  enum class Kind : uint8_t { none, model, added, special };

  std::string source;
  const icu::Normalizer2* nfc = nullptr;  // null when the file declares no normalizer
  std::vector<SplitRegex> split_stages;
  bool ignore_merges = false;

  StringMap<int32_t> vocab;  // the BPE model's vocabulary, by byte-level spelling
  std::vector<AddedToken> added;
  StringMap<int32_t> added_ids;  // added tokens by content
  AddedTokenMatcher raw_matcher, normalized_matcher;

  std::array<int32_t, 256> byte_ids{};
  MergeTable merges{0};

  std::vector<Kind> kinds;          // by id
  std::vector<std::string> spelling;  // by id, as in tokenizer.json
  std::vector<std::string> bytes;     // by id, through the ByteLevel decoder

  mutable WordCache cache;

  void check_id(int32_t id) const {
    Q3VL_CHECK(id >= 0 && static_cast<size_t>(id) < kinds.size() && kinds[id] != Kind::none, source,
               ": token id ", id, " is not in the vocabulary (size ", kinds.size(), ")");
  }

  // bpe::Word::merge_all: repeatedly merge the adjacent pair of lowest rank (leftmost on ties), keeping
  // stale queue entries and skipping them when their pair has changed.
  void merge_word(std::string_view word, std::vector<int32_t>& out) const {
    struct Symbol {
      int32_t id;
      int32_t prev, next;
      bool alive;
    };
    struct Candidate {
      uint32_t rank;
      int32_t pos;
      int32_t merged;
    };
    // Max-heap order reversed: the top is the lowest rank, then the leftmost position.
    const auto after = [](const Candidate& a, const Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    };
    thread_local std::vector<Symbol> symbols;
    thread_local std::vector<Candidate> queue;
    const auto push = [&](uint32_t rank, int32_t pos, int32_t merged) {
      queue.push_back({rank, pos, merged});
      std::push_heap(queue.begin(), queue.end(), after);
    };
    const int32_t n = static_cast<int32_t>(word.size());
    symbols.resize(n);
    for (int32_t i = 0; i < n; ++i)
      symbols[i] = {byte_ids[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1, true};
    queue.clear();
    for (int32_t i = 0; i + 1 < n; ++i)
      if (const auto* m = merges.find(symbols[i].id, symbols[i + 1].id)) push(m->rank, i, m->merged);
    while (!queue.empty()) {
      std::pop_heap(queue.begin(), queue.end(), after);
      const Candidate top = queue.back();
      queue.pop_back();
      Symbol& left = symbols[top.pos];
      if (!left.alive || left.next < 0) continue;
      Symbol& right = symbols[left.next];
      const auto* current = merges.find(left.id, right.id);
      if (!current || current->merged != top.merged) continue;
      left.id = top.merged;
      right.alive = false;
      left.next = right.next;
      if (left.next >= 0) symbols[left.next].prev = top.pos;
      if (left.prev >= 0)
        if (const auto* m = merges.find(symbols[left.prev].id, left.id)) push(m->rank, left.prev, m->merged);
      if (left.next >= 0)
        if (const auto* m = merges.find(left.id, symbols[left.next].id)) push(m->rank, top.pos, m->merged);
    }
    for (int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.size() == 1) {
      out.push_back(byte_ids[static_cast<unsigned char>(word[0])]);
      return;
    }
    if (ignore_merges) {
      const auto it = vocab.find(byte_level_spelling(word));
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const bool cacheable = word.size() <= WordCache::kMaxWordBytes;
    if (cacheable && cache.find(word, out)) return;
    const size_t first = out.size();
    merge_word(word, out);
    if (cacheable) cache.insert(word, std::span<const int32_t>(out).subspan(first));
  }

  // Splits `text` by the pre-tokenizer stages from `stage` on and encodes the resulting words, streaming (a
  // long document never holds its list of words).
  void encode_text(std::string_view text, size_t stage, pcre2_match_data* data, std::vector<int32_t>& out) const {
    if (stage == split_stages.size()) {
      if (!text.empty()) encode_word(text, out);
      return;
    }
    split_stages[stage].split(text, data, [&](std::string_view piece) { encode_text(piece, stage + 1, data, out); });
  }

  void encode(std::string_view text, std::vector<int32_t>& out) const {
    check_utf8(text);
    const MatchData data(pcre2_match_data_create(1, nullptr));
    Q3VL_CHECK(data, "tokenizer: out of memory for PCRE2 match data");
    std::vector<Segment> raw_segments, normalized_segments;
    std::string normalized;
    raw_matcher.split(text, raw_segments);
    for (const Segment& raw : raw_segments) {
      if (raw.id >= 0) {
        out.push_back(raw.id);
        continue;
      }
      std::string_view piece = text.substr(raw.begin, raw.end - raw.begin);
      if (nfc) {
        Q3VL_CHECK(piece.size() <= INT32_MAX, "tokenizer: a ", piece.size(),
                   "-byte text piece is over ICU's 2 GiB limit");
        UErrorCode status = U_ZERO_ERROR;
        const icu::StringPiece input(piece.data(), static_cast<int32_t>(piece.size()));
        if (!nfc->isNormalizedUTF8(input, status)) {
          normalized.clear();
          icu::StringByteSink<std::string> sink(&normalized, static_cast<int32_t>(piece.size()));
          status = U_ZERO_ERROR;
          nfc->normalizeUTF8(0, input, sink, nullptr, status);
          piece = normalized;
        }
        Q3VL_CHECK(U_SUCCESS(status), "tokenizer: NFC normalisation failed: ", u_errorName(status));
      }
      if (normalized_matcher.empty()) {
        encode_text(piece, 0, data.get(), out);
        continue;
      }
      normalized_segments.clear();
      normalized_matcher.split(piece, normalized_segments);
      for (const Segment& segment : normalized_segments) {
        if (segment.id >= 0)
          out.push_back(segment.id);
        else
          encode_text(piece.substr(segment.begin, segment.end - segment.begin), 0, data.get(), out);
      }
    }
  }
};

// The package's NFC (crate unicode-normalization-alignments) has Unicode 9.0 data; ICU's is newer. Characters
// assigned after 9.0 are left out of normalisation, where to the package they are unassigned: starters that
// neither decompose nor compose (ICU's own Unicode 3.2 NFC is built the same way).
const icu::Normalizer2* nfc_unicode_9() {
  static const icu::Normalizer2* const normalizer = [] {
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
    Q3VL_CHECK(U_SUCCESS(status), "tokenizer: ICU NFC normaliser unavailable: ", u_errorName(status));
    static icu::UnicodeSet assigned_by_9(icu::UnicodeString(u"[:age=9.0:]"), status);
    Q3VL_CHECK(U_SUCCESS(status), "tokenizer: ICU set [:age=9.0:] unavailable: ", u_errorName(status));
    assigned_by_9.freeze();
    static const icu::FilteredNormalizer2 filtered(*nfc, assigned_by_9);
    return &filtered;
  }();
  return normalizer;
}

void load_normalizer(const Json& root, TokenizerModel& t) {
  const Json& normalizer = member(root, "normalizer", "the top level", t.source);
  if (normalizer.is_null()) return;
  const std::string type = type_of(normalizer, "normalizer", t.source);
  Q3VL_CHECK(type == "NFC", t.source, ": normalizer type \"", type, "\" is not supported (only none or NFC)");
  t.nfc = nfc_unicode_9();
}

void load_byte_level(const Json& byte_level, const std::string& where, TokenizerModel& t) {
  Q3VL_CHECK(!flag(byte_level, "add_prefix_space", true), t.source, ": ", where,
             " ByteLevel with add_prefix_space=true is not supported");
  if (flag(byte_level, "use_regex", true)) t.split_stages.emplace_back(kGpt2Pattern, t.source);
}

void load_pre_tokenizer(const Json& root, TokenizerModel& t) {
  const Json& pre = member(root, "pre_tokenizer", "the top level", t.source);
  Q3VL_CHECK(!pre.is_null(), t.source, ": a byte-level BPE needs a ByteLevel pre_tokenizer, found null");
  const std::string type = type_of(pre, "pre_tokenizer", t.source);
  if (type == "ByteLevel") {
    load_byte_level(pre, "pre_tokenizer", t);
    return;
  }
  Q3VL_CHECK(type == "Sequence", t.source, ": pre_tokenizer type \"", type,
             "\" is not supported (ByteLevel, or a Sequence of Split stages ending in ByteLevel)");
  const Json& stages = member(pre, "pretokenizers", "pre_tokenizer", t.source);
  Q3VL_CHECK(stages.is_array() && !stages.empty(), t.source, ": pre_tokenizer.pretokenizers is not a non-empty array");
  for (size_t i = 0; i < stages.size(); ++i) {
    const std::string where = "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]";
    const std::string stage_type = type_of(stages[i], where, t.source);
    const bool last = i + 1 == stages.size();
    if (stage_type == "ByteLevel") {
      Q3VL_CHECK(last, t.source, ": ", where, " ByteLevel must be the last pre-tokenizer");
      load_byte_level(stages[i], where, t);
      continue;
    }
    Q3VL_CHECK(stage_type == "Split" && !last, t.source, ": ", where, " type \"", stage_type,
               "\" is not supported (Split stages, then ByteLevel last)");
    const Json& pattern = member(stages[i], "pattern", where, t.source);
    Q3VL_CHECK(pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string(), t.source, ": ",
               where, ".pattern must be {\"Regex\": \"...\"}");
    const std::string behavior = member(stages[i], "behavior", where, t.source).get<std::string>();
    Q3VL_CHECK(behavior == "Isolated", t.source, ": ", where, " behavior \"", behavior,
               "\" is not supported (only Isolated)");
    Q3VL_CHECK(!flag(stages[i], "invert", false), t.source, ": ", where, " invert=true is not supported");
    t.split_stages.emplace_back(pattern["Regex"].get<std::string>(), t.source);
  }
}

// Token ids index dense tables (kinds, spelling, bytes): an id of 2^31-1 would allocate 2^31 entries. 2^24 is
// 64 times the largest published vocabularies (~262k).
constexpr int64_t kMaxTokenIds = int64_t{1} << 24;

void set_token(TokenizerModel& t, int32_t id, std::string spelling, TokenizerModel::Kind kind) {
  if (static_cast<size_t>(id) >= t.kinds.size()) {
    t.kinds.resize(id + 1, TokenizerModel::Kind::none);
    t.spelling.resize(id + 1);
    t.bytes.resize(id + 1);
  }
  t.bytes[id] = byte_level_bytes(spelling);
  t.spelling[id] = std::move(spelling);
  t.kinds[id] = kind;
}

int32_t token_id_value(const Json& value, const std::string& where, const std::string& source) {
  Q3VL_CHECK(value.is_number_integer() && value.get<int64_t>() >= 0 && value.get<int64_t>() < kMaxTokenIds,
             source, ": ", where, " has id ", value.dump(), ", expected an integer in [0, 2^24)");
  return value.get<int32_t>();
}

void load_model(const Json& root, const StreamedModel& streamed, TokenizerModel& t) {
  const Json& model = member(root, "model", "the top level", t.source);
  const std::string type = type_of(model, "model", t.source);
  Q3VL_CHECK(type == "BPE", t.source, ": model type \"", type, "\" is not supported (only BPE)");
  const auto dropout = model.find("dropout");
  Q3VL_CHECK(dropout == model.end() || dropout->is_null() || dropout->get<double>() == 0.0, t.source,
             ": BPE dropout is not supported");
  Q3VL_CHECK(empty_or_null_string(model, "continuing_subword_prefix") &&
                 empty_or_null_string(model, "end_of_word_suffix"),
             t.source, ": BPE continuing_subword_prefix/end_of_word_suffix are not supported");
  t.ignore_merges = flag(model, "ignore_merges", false);

  Q3VL_CHECK(streamed.has_vocab, t.source, ": model.vocab is missing or not an object");
  t.vocab.reserve(streamed.vocab.size());
  for (const auto& [spelling, id_value] : streamed.vocab) {
    Q3VL_CHECK(id_value >= 0 && id_value < kMaxTokenIds, t.source, ": model.vocab[\"", spelling, "\"] has id ",
               id_value, ", expected an integer in [0, 2^24)");
    const auto id = static_cast<int32_t>(id_value);
    // Two spellings with one id would make encode produce an id that decodes to the other spelling.
    Q3VL_CHECK(static_cast<size_t>(id) >= t.kinds.size() || t.kinds[id] == TokenizerModel::Kind::none, t.source,
               ": model.vocab[\"", t.spelling[id], "\"] and model.vocab[\"", spelling, "\"] share id ", id);
    t.vocab[spelling] = id;
    set_token(t, id, spelling, TokenizerModel::Kind::model);
  }
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    append_utf8(symbol, byte_alphabet().byte_to_char[b]);
    const auto it = t.vocab.find(symbol);
    Q3VL_CHECK(it != t.vocab.end(), t.source, ": model.vocab has no token for byte ", b, " (\"", symbol,
               "\"); a byte-level BPE needs all 256");
    t.byte_ids[b] = it->second;
  }

  Q3VL_CHECK(streamed.has_merges, t.source, ": model.merges is missing or not an array");
  t.merges = MergeTable(streamed.merges.size());
  for (size_t rank = 0; rank < streamed.merges.size(); ++rank) {
    StreamedModel::Merge merge = streamed.merges[rank];
    if (!merge.is_pair) {  // the older "left right" spelling
      const std::string line = std::move(merge.left);
      const size_t space = line.find(' ');
      Q3VL_CHECK(space != std::string::npos && line.find(' ', space + 1) == std::string::npos, t.source,
                 ": model.merges[", rank, "] \"", line, "\" is not two tokens separated by one space");
      merge.left = line.substr(0, space);
      merge.right = line.substr(space + 1);
    }
    const auto find = [&](const std::string& spelling) {
      const auto it = t.vocab.find(spelling);
      Q3VL_CHECK(it != t.vocab.end(), t.source, ": model.merges[", rank, "] uses \"", spelling,
                 "\", which is not in model.vocab");
      return it->second;
    };
    const int32_t left_id = find(merge.left), right_id = find(merge.right), merged_id = find(merge.left + merge.right);
    t.merges.insert_or_assign(left_id, right_id, {static_cast<uint32_t>(rank), merged_id});
  }
}

void load_added_tokens(const Json& root, TokenizerModel& t) {
  const auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return;
  Q3VL_CHECK(it->is_array(), t.source, ": added_tokens is not an array");
  t.added.reserve(it->size());  // the matchers point into this vector
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& entry = (*it)[i];
    const std::string where = "added_tokens[" + std::to_string(i) + "]";
    AddedToken token;
    token.id = token_id_value(member(entry, "id", where, t.source), where, t.source);
    const Json& content = member(entry, "content", where, t.source);
    Q3VL_CHECK(content.is_string() && !content.get<std::string>().empty(), t.source, ": ", where,
               ".content is not a non-empty string");
    token.content = content.get<std::string>();
    token.special = flag(entry, "special", false);
    token.single_word = flag(entry, "single_word", false);
    token.lstrip = flag(entry, "lstrip", false);
    token.rstrip = flag(entry, "rstrip", false);
    token.normalized = flag(entry, "normalized", !token.special);
    Q3VL_CHECK(!t.added_ids.contains(token.content), t.source, ": ", where, " repeats the content \"",
               token.content, "\"");
    // An added token may name a vocabulary entry by its id (the same bytes, as HF's "<unk>" often does), but
    // may not give the id of another token: encode would then produce ids that decode to something else.
    if (static_cast<size_t>(token.id) < t.kinds.size() && t.kinds[token.id] != TokenizerModel::Kind::none) {
      Q3VL_CHECK(t.kinds[token.id] == TokenizerModel::Kind::model, t.source, ": ", where, " (\"", token.content,
                 "\") has id ", token.id, ", which an earlier added token (\"", t.spelling[token.id], "\") has");
      Q3VL_CHECK(t.bytes[token.id] == token.content, t.source, ": ", where, " (\"", token.content, "\") has id ",
                 token.id, ", which model.vocab[\"", t.spelling[token.id], "\"] has");
    }
    t.added_ids[token.content] = token.id;
    set_token(t, token.id, token.content,
              token.special ? TokenizerModel::Kind::special : TokenizerModel::Kind::added);
    t.added.push_back(std::move(token));
  }
  // The package builds its matchers from special tokens first, then the others; leftmost-longest makes the
  // order matter only between equal patterns, which contents cannot be.
  for (const AddedToken& token : t.added) {
    if (!token.normalized) {
      t.raw_matcher.add(token.content, &token);
      continue;
    }
    std::string pattern = token.content;
    if (t.nfc) {
      pattern.clear();
      icu::StringByteSink<std::string> sink(&pattern);
      UErrorCode status = U_ZERO_ERROR;
      t.nfc->normalizeUTF8(0, icu::StringPiece(token.content.data(), static_cast<int32_t>(token.content.size())), sink,
                           nullptr, status);
      Q3VL_CHECK(U_SUCCESS(status), t.source, ": NFC of added token \"", token.content, "\" failed");
    }
    t.normalized_matcher.add(std::move(pattern), &token);
  }
  t.raw_matcher.finish();
  t.normalized_matcher.finish();
}

void load_decoder(const Json& root, TokenizerModel& t) {
  const Json& decoder = member(root, "decoder", "the top level", t.source);
  Q3VL_CHECK(!decoder.is_null() && type_of(decoder, "decoder", t.source) == "ByteLevel", t.source,
             ": decoder must be ByteLevel, found ", decoder.dump());
}

}  // namespace

struct Tokenizer::Impl : TokenizerModel {};

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source) {
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  TokenizerJsonReader reader;
  const bool parsed = Json::sax_parse(json_text, &reader);
  Q3VL_CHECK(parsed, source, ": ", reader.error);
  const Json& root = reader.root;
  try {
    Q3VL_CHECK(root.is_object(), source, ": the top level is not a JSON object");
    load_normalizer(root, *impl);
    load_pre_tokenizer(root, *impl);
    load_model(root, reader.model, *impl);
    load_added_tokens(root, *impl);
    load_decoder(root, *impl);
  } catch (const Json::exception& e) {
    Q3VL_FAIL(source, ": unexpected value in tokenizer JSON: ", e.what());
  }
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::string& where) {
  const std::string path = resolve_tokenizer_file(where);
  std::ifstream in(path, std::ios::binary);
  Q3VL_CHECK(in, path, ": cannot open tokenizer file");
  std::ostringstream text;
  text << in.rdbuf();
  Q3VL_CHECK(!in.bad(), path, ": read error");
  return from_json(text.str(), path);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  impl_->encode(text, ids);
  return ids;
}

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& ids) const { impl_->encode(text, ids); }

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (const int32_t id : ids) {
    impl_->check_id(id);
    if (skip_special_tokens && impl_->kinds[id] == TokenizerModel::Kind::special) continue;
    bytes += impl_->bytes[id];
  }
  return utf8_lossy(bytes);
}

std::optional<int32_t> Tokenizer::find_token_id(std::string_view token) const {
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (const auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::token_id(std::string_view token) const {
  const auto id = find_token_id(token);
  Q3VL_CHECK(id, impl_->source, ": no token \"", token, "\"");
  return *id;
}

const std::string& Tokenizer::token(int32_t id) const {
  impl_->check_id(id);
  return impl_->spelling[id];
}

bool Tokenizer::is_special(int32_t id) const {
  impl_->check_id(id);
  return impl_->kinds[id] == TokenizerModel::Kind::special;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->kinds.size()); }

const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace q3vl::io
