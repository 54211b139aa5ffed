// q3vl pack: messages-format JSON / JSON lines -> packed HDF5 shards + manifest.json (io/packer.h), with
// progress and a summary (samples in, packed, skipped by reason with file:line, tokens, images, video
// frames, padding ratio, throughput). Several processes can share the work: each runs with --rank R
// --world W and writes its shards and part-R.json; then one `--merge --world W` writes the manifest.
#include <iostream>
#include <string>
#include <vector>

#include "core/check.h"
#include "io/image.h"
#include "io/image_resize.h"
#include "io/packer.h"
#include "io/shard_format.h"
#include "io/tokenizer.h"

namespace q3vl::app {

namespace {

constexpr const char* kUsage =
    "usage: q3vl pack --input FILE.json[l] [--input ...] --tokenizer tokenizer.json --out DIR\n"
    "                 [--mode chat|caption] [--max-len TOKENS (8192)] [--shard-mb MB (256)]\n"
    "                 [--min-pixels N (65536)] [--max-pixels N (16777216)] [--open-sequences N (64)]\n"
    "                 [--rank R --world W] [--merge --world W] [--quiet]";

int64_t parse_int(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    const long long v = std::stoll(value, &used);
    Q3VL_CHECK(used == value.size(), "pack: ", flag, " takes an integer, got '", value, "'");
    return v;
  } catch (const std::logic_error&) {
    Q3VL_FAIL("pack: ", flag, " takes an integer, got '", value, "'");
  }
}

}  // namespace

int run_pack(const std::vector<std::string>& args) {
  io::PackOptions options;
  std::string tokenizer_path;
  io::ImageSizeOptions image_size;
  bool merge = false, quiet = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      Q3VL_CHECK(i + 1 < args.size(), "pack: ", a, " needs a value\n", kUsage);
      return args[++i];
    };
    if (a == "--input") options.inputs.push_back(value());
    else if (a == "--tokenizer") tokenizer_path = value();
    else if (a == "--out") options.out_dir = value();
    else if (a == "--mode") {
      const std::string& m = value();
      Q3VL_CHECK(m == "chat" || m == "caption", "pack: --mode is chat or caption, got '", m, "'");
      options.mode = m == "chat" ? io::PackMode::chat : io::PackMode::caption;
    } else if (a == "--max-len") options.token_budget = parse_int(a, value());
    else if (a == "--shard-mb") options.shard_bytes = parse_int(a, value()) << 20;
    else if (a == "--min-pixels") image_size.min_pixels = parse_int(a, value());
    else if (a == "--max-pixels") image_size.max_pixels = parse_int(a, value());
    else if (a == "--open-sequences") options.open_sequences = static_cast<int>(parse_int(a, value()));
    else if (a == "--rank") options.rank = static_cast<int>(parse_int(a, value()));
    else if (a == "--world") options.world = static_cast<int>(parse_int(a, value()));
    else if (a == "--merge") merge = true;
    else if (a == "--quiet") quiet = true;
    else if (a == "--help" || a == "-h") {
      std::cout << kUsage << "\n";
      return 0;
    } else {
      std::cerr << "pack: unexpected argument '" << a << "'\n" << kUsage << "\n";
      return 2;
    }
  }
  if (options.inputs.empty() || tokenizer_path.empty() || options.out_dir.empty()) {
    std::cerr << "pack: --input, --tokenizer and --out are required\n" << kUsage << "\n";
    return 2;
  }
  const std::string tokenizer_hash = io::tokenizer_file_hash(tokenizer_path);
  if (merge) {
    std::vector<io::RankResult> parts;
    for (int r = 0; r < options.world; ++r) parts.push_back(io::read_rank_result(io::rank_result_path(options.out_dir, r)));
    std::cout << io::write_pack_manifest(options, tokenizer_hash, parts).report();
    return 0;
  }
  if (!quiet) options.progress = &std::cerr;
  const io::Tokenizer tokenizer = io::Tokenizer::load(tokenizer_path);
  io::MediaDecoder media;
  media.image = [image_size](const std::string& path) {
    const io::Image resized = io::resize_for_model(io::decode_image(path), image_size);
    return io::DecodedMedia{1, static_cast<int32_t>(resized.height), static_cast<int32_t>(resized.width),
                            resized.pixels, {}};
  };
  if (options.world == 1) {
    std::cout << io::pack(options, tokenizer, tokenizer_hash, media).report();
    return 0;
  }
  const io::RankResult result = io::pack_rank(options, tokenizer, tokenizer_hash, media);
  io::write_rank_result(io::rank_result_path(options.out_dir, options.rank), result);
  std::cout << "rank " << options.rank << " of " << options.world << ":\n" << result.summary.report();
  return 0;
}

}  // namespace q3vl::app
