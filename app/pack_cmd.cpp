// q3vl pack: messages-format JSON / JSON lines -> packed HDF5 shards + manifest.json (io/packer.h), with
// progress and a summary (samples in, packed, skipped by reason with file:line, tokens, images, video
// frames, padding ratio, throughput). Several processes can share the work:
// - under mpirun/srun with more than one rank, each rank packs its slice, rank 0 gathers the ranks' results
//   and writes the manifest and prints the summary (other ranks print only errors; an error on any rank
//   ends the whole job with its rank and reason);
// - without MPI, each process runs with --rank R --world W and writes its shards and part-R.json; then one
//   `--merge --world W` writes the manifest. MPI is never started for a process mpirun did not launch.
// Output goes to a staging folder beside --out that is renamed to --out once the manifest is written
// (io::check_pack_output): an existing pack is replaced only with --overwrite, a failed run leaves --out as it was.
#include <cstdint>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "core/check.h"
#include "io/image_resize.h"
#include "io/media_decoder.h"
#include "io/packer.h"
#include "io/shard_format.h"
#include "io/tokenizer.h"
#include "io/video.h"
#include "parallel/mpi_comm.h"

#include <unistd.h>

namespace q3vl::app {

namespace {

constexpr const char* kUsage =
    "usage: q3vl pack --input FILE.json[l] [--input ...] --tokenizer tokenizer.json --out DIR\n"
    "                 [--mode chat|caption] [--max-len TOKENS (8192)] [--shard-mb MB (256)]\n"
    "                 [--min-pixels N (65536)] [--max-pixels N (16777216)] [--open-sequences N (64)]\n"
    "                 [--fps F (2)] [--video-max-pixels N (25165824, over all frames of a video)]\n"
    "                 [--rank R --world W] [--merge --world W] [--overwrite] [--quiet]\n"
    "       --out must be absent or empty unless --overwrite (which replaces only an earlier pack)\n"
    "       under mpirun/srun the ranks share the work and rank 0 writes the manifest (no --rank/--world/--merge)";

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

double parse_double(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    const double v = std::stod(value, &used);
    Q3VL_CHECK(used == value.size(), "pack: ", flag, " takes a number, got '", value, "'");
    return v;
  } catch (const std::logic_error&) {
    Q3VL_FAIL("pack: ", flag, " takes a number, got '", value, "'");
  }
}

// Rank 0 checks --out and creates the staging folder named after its process id, which it broadcasts; every
// rank packs its slice into that folder; rank 0 gathers the ranks' results, writes the manifest, renames the
// folder to --out and prints the summary. Any error ends every rank (abort_all): the others would otherwise
// wait forever in the gather. The failing rank first removes the staging folder (the ranks share it).
int pack_with_mpi(parallel::Comm& world, io::PackOptions options, const std::string& tokenizer_path,
                  const io::MediaDecoder& media, bool quiet) {
  const std::string out_dir = options.out_dir;
  std::string staging;
  try {
    options.rank = world.rank();
    options.world = world.size();
    int64_t tag = ::getpid();
    if (world.rank() == 0) {
      io::check_pack_output(out_dir, options.overwrite);
      std::filesystem::remove_all(io::pack_staging_dir(out_dir, std::to_string(tag)));
      std::filesystem::create_directories(io::pack_staging_dir(out_dir, std::to_string(tag)));
    }
    world.broadcast(&tag, sizeof(tag), 0);
    staging = options.out_dir = io::pack_staging_dir(out_dir, std::to_string(tag));
    if (!quiet && world.rank() == 0) options.progress = &std::cerr;
    const std::string tokenizer_hash = io::tokenizer_file_hash(tokenizer_path);
    const io::Tokenizer tokenizer = io::Tokenizer::load(tokenizer_path);
    const io::RankResult mine = io::pack_rank(options, tokenizer, tokenizer_hash, media);
    // Ranks that finish early wait here without spinning, leaving the CPU to ranks still packing.
    world.barrier();
    const std::vector<std::string> texts = world.gather_strings(io::rank_result_to_json(mine), 0);
    if (world.rank() == 0) {
      std::vector<io::RankResult> results;
      for (const std::string& text : texts) results.push_back(io::rank_result_from_json(text));
      const io::PackSummary total = io::write_pack_manifest(options, tokenizer_hash, results);
      io::publish_pack_output(staging, out_dir);
      std::cout << total.report();
    }
  } catch (const std::exception& e) {
    std::error_code ignored;
    if (!staging.empty()) std::filesystem::remove_all(staging, ignored);
    parallel::abort_all(std::string("q3vl pack: ") + e.what());
  }
  return 0;
}

}  // namespace

int run_pack(const std::vector<std::string>& args) {
  io::PackOptions options;
  std::string tokenizer_path;
  io::ImageSizeOptions image_size;
  io::VideoOptions video;
  bool merge = false, quiet = false, manual_ranks = false;
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
    else if (a == "--fps") video.fps = parse_double(a, value());
    else if (a == "--video-max-pixels") video.max_pixels = parse_int(a, value());
    else if (a == "--open-sequences") options.open_sequences = static_cast<int>(parse_int(a, value()));
    else if (a == "--rank" || a == "--world") {
      (a == "--rank" ? options.rank : options.world) = static_cast<int>(parse_int(a, value()));
      manual_ranks = true;
    } else if (a == "--merge") merge = manual_ranks = true;
    else if (a == "--overwrite") options.overwrite = true;
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
  Q3VL_CHECK(video.fps > 0, "pack: --fps must be positive, got ", video.fps);
  const io::MediaDecoder media = io::default_media_decoder(image_size, video);
  std::optional<parallel::MpiSession> mpi;
  if (parallel::MpiSession::launched_by_mpirun()) mpi.emplace();
  if (mpi && mpi->world().size() > 1) {
    Q3VL_CHECK(!manual_ranks, "pack: --rank, --world and --merge are for runs without MPI; under mpirun the ",
               mpi->world().size(), " ranks share the work and rank 0 writes the manifest");
    return pack_with_mpi(mpi->world(), options, tokenizer_path, media, quiet);
  }
  const std::string tokenizer_hash = io::tokenizer_file_hash(tokenizer_path);
  if (merge || options.world > 1) {
    // Separate processes share no process id: their staging folder has a fixed name, renamed by the merge.
    io::check_pack_output(options.out_dir, options.overwrite);
    const std::string out_dir = options.out_dir;
    options.out_dir = io::pack_staging_dir(out_dir, "ranks");
    if (merge) {
      std::vector<io::RankResult> parts;
      for (int r = 0; r < options.world; ++r)
        parts.push_back(io::read_rank_result(io::rank_result_path(options.out_dir, r)));
      const io::PackSummary total = io::write_pack_manifest(options, tokenizer_hash, parts);
      io::publish_pack_output(options.out_dir, out_dir);
      std::cout << total.report();
      return 0;
    }
  }
  if (!quiet) options.progress = &std::cerr;
  const io::Tokenizer tokenizer = io::Tokenizer::load(tokenizer_path);
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
