// q3vl tokenize: encodes the text on standard input with a Hugging Face tokenizer.json and prints the ids as
// a JSON array; with --decode, reads a JSON array of ids and prints their text exactly (no newline added).
#include <cctype>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "app/cli.h"
#include "app/commands.h"
#include "core/check.h"
#include "io/tokenizer.h"
#include "io/tokenizer_path.h"

namespace q3vl::app {

namespace {

std::string read_stdin() {
  std::ostringstream text;
  text << std::cin.rdbuf();
  return text.str();
}

// A JSON array of integers, e.g. "[151644, 872, 198]"; anything else is an error naming the offset.
std::vector<int32_t> parse_id_array(const std::string& text) {
  size_t i = 0;
  const auto skip_space = [&] {
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  };
  const auto expect = [&](char c) {
    skip_space();
    Q3VL_CHECK(i < text.size() && text[i] == c, "tokenize --decode: expected '", c, "' at offset ", i,
               " of the JSON id array on stdin");
    ++i;
  };
  std::vector<int32_t> ids;
  expect('[');
  skip_space();
  if (i < text.size() && text[i] == ']') {
    ++i;
  } else {
    for (;;) {
      skip_space();
      const size_t start = i;
      if (i < text.size() && text[i] == '-') ++i;
      while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
      Q3VL_CHECK(i > start && std::isdigit(static_cast<unsigned char>(text[i - 1])) && i - start <= 11,
                 "tokenize --decode: expected an integer id at offset ", start, " of the JSON id array on stdin");
      const long long id = std::stoll(text.substr(start, i - start));
      Q3VL_CHECK(id >= INT32_MIN && id <= INT32_MAX, "tokenize --decode: id ", id, " is out of range");
      ids.push_back(static_cast<int32_t>(id));
      skip_space();
      if (i < text.size() && text[i] == ',') {
        ++i;
        continue;
      }
      expect(']');
      break;
    }
  }
  skip_space();
  Q3VL_CHECK(i == text.size(), "tokenize --decode: unexpected text after the JSON id array at offset ", i);
  return ids;
}

}  // namespace

int run_tokenize(const std::vector<std::string>& args) {
  auto cli = make_command("tokenize", "Encodes the text on standard input and prints its ids as a JSON array; with "
                                     "--decode, reads a JSON array of ids and prints their text exactly.");
  std::string tokenizer_path;
  bool decode = false;
  cli->add_option("--tokenizer", tokenizer_path, "tokenizer.json or the folder holding it")->required();
  cli->add_flag("--decode", decode, "ids on stdin -> text");
  if (const auto done = parse_command(*cli, args)) return *done;
  const io::Tokenizer tokenizer = io::Tokenizer::load(io::resolve_tokenizer_file(tokenizer_path, "--tokenizer"));
  const std::string input = read_stdin();
  if (decode) {
    const std::string text = tokenizer.decode(parse_id_array(input));
    std::cout.write(text.data(), static_cast<std::streamsize>(text.size()));
  } else {
    const std::vector<int32_t> ids = tokenizer.encode(input);
    std::string out = "[";
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ", ";
      out += std::to_string(ids[i]);
    }
    out += "]\n";
    std::cout << out;
  }
  std::cout.flush();
  return std::cout ? 0 : 1;
}

}  // namespace q3vl::app
