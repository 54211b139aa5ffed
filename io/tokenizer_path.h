// Where a tokenizer is: every command and config key that takes one accepts the tokenizer.json file or the
// folder holding it (a Hugging Face model folder), resolved here in one place.
#pragma once

#include <string>

namespace q3vl::io {

// The tokenizer.json file that `path` names: the file itself, or `path`/tokenizer.json for a folder. Fails naming
// `what` (the option or key it came from) and the path when neither exists.
std::string resolve_tokenizer_file(const std::string& path, const std::string& what = "tokenizer");

// The folder holding the tokenizer files that `path` names (the file's folder, or the folder itself), for the
// commands that copy the tokenizer files beside a model.
std::string resolve_tokenizer_dir(const std::string& path, const std::string& what = "tokenizer");

}  // namespace q3vl::io
