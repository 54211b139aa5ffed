// Tokenizer: a Hugging Face `tokenizer.json` byte-level BPE tokenizer (Qwen2/Qwen3 and GPT-2 style) that
// encodes and decodes exactly as the `tokenizers` package does (reference ids in tests/io/tokenizer_corpus).
//
// Encoding follows the package's pipeline: added tokens (special or not) are cut out of the raw text first
// (leftmost-longest, honouring lstrip/rstrip/single_word); the pieces between them are NFC-normalised when
// the file declares an NFC normalizer, then cut again by the added tokens whose `normalized` flag is set;
// each remaining piece is split by the pre-tokenizer's regexes (PCRE2, Unicode properties) into words, and
// each word's UTF-8 bytes are merged by BPE rank. encode() never adds BOS/EOS or other template tokens
// (the post-processor is not applied: it is what `add_special_tokens=False` gives).
//
// Unicode data follows the package's, not this machine's: the pre-tokenizer regexes see letters and numbers
// as of Unicode 16.0 (the package's Oniguruma), NFC uses Unicode 9.0 data (its normalisation crate).
//
// Supported files: model BPE over the 256 byte-level symbols (all present in the vocabulary), normalizer
// none or NFC, pre-tokenizer ByteLevel(add_prefix_space=false) alone or after Split(Regex, Isolated)
// stages, decoder ByteLevel. Anything else is refused at load with a message naming the file.
//
// Thread safety: a loaded Tokenizer is immutable apart from an internal, lock-protected cache of merged
// words; encode/decode may be called from several threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace q3vl::io {

class Tokenizer {
 public:
  // Reads and validates a tokenizer.json (the file, or the folder holding it: io/tokenizer_path.h); errors name the
  // file and what is wrong in it.
  static Tokenizer load(const std::string& path);
  // Same from JSON text already in memory; `source` names it in error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`, which must be valid UTF-8 (otherwise throws, giving the byte offset).
  std::vector<int32_t> encode(std::string_view text) const;
  // Appends the ids of `text` to `ids` (lets a packer reuse one buffer).
  void encode(std::string_view text, std::vector<int32_t>& ids) const;

  // Text of `ids`: each token's bytes through the ByteLevel decoder, joined, with ill-formed UTF-8 replaced
  // by U+FFFD per maximal invalid subsequence (as Rust's from_utf8_lossy). Special added tokens are kept
  // unless `skip_special_tokens`. An id that names no token throws (the package would drop it silently).
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // Id of a token given as it is spelled in tokenizer.json (added-token content, or the byte-level
  // spelling of a vocabulary entry such as "Ġthe"); added tokens take precedence as in the package.
  std::optional<int32_t> find_token_id(std::string_view token) const;
  // As find_token_id, but throws naming the token and the file when there is none.
  int32_t token_id(std::string_view token) const;
  // The spelling of token `id` as in tokenizer.json (throws when `id` names no token).
  const std::string& token(int32_t id) const;
  // Whether `id` is an added token marked special (skipped by decode(..., true)).
  bool is_special(int32_t id) const;
  // One past the largest id in the vocabulary and the added tokens.
  int32_t vocab_size() const;
  // The path (or source name) the tokenizer was loaded from.
  const std::string& source() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace q3vl::io
