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

#include "app/cli.h"
#include "app/commands.h"
#include "core/check.h"
#include "io/image_resize.h"
#include "io/media_decoder.h"
#include "io/packer.h"
#include "io/shard_format.h"
#include "io/tokenizer.h"
#include "io/tokenizer_path.h"
#include "io/video.h"
#include "parallel/mpi_comm.h"

#include <unistd.h>

namespace q3vl::app {

namespace {

constexpr const char* kNotes =
    "--out must be absent or empty unless --overwrite (which replaces only an earlier pack).\n"
    "Under mpirun/srun the ranks share the work and rank 0 writes the manifest (no --rank/--world/--merge);\n"
    "without MPI, run one process per --rank R --world W, then one --merge --world W.\n";

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
  std::string tokenizer_path, mode = "chat";
  io::ImageSizeOptions image_size;
  io::VideoOptions video;
  bool merge = false, quiet = false;
  int64_t max_len = options.token_budget, shard_mb = options.shard_bytes >> 20, open_sequences = options.open_sequences;
  int64_t rank = options.rank, world = options.world;
  auto cli = make_command("pack", "Packs messages-format JSON / JSON-lines samples into HDF5 shards and a manifest.json "
                                 "(io/shard_format.md), with progress and a summary.");
  cli->footer(kNotes);
  cli->add_option("--input", options.inputs, "samples: a JSON array (.json) or JSON lines (.jsonl); repeatable")
      ->required()->allow_extra_args(false);
  cli->add_option("--tokenizer", tokenizer_path, "tokenizer.json or the folder holding it")->required();
  cli->add_option("--out", options.out_dir, "output folder")->required();
  cli->add_option("--mode", mode, "chat (messages) or caption")->check(CLI::IsMember({"chat", "caption"}))
      ->capture_default_str();
  add_int_option(*cli, "--max-len", max_len, 1, "tokens per packed sequence");
  add_int_option(*cli, "--shard-mb", shard_mb, 1, "shard size in MiB");
  add_int_option(*cli, "--min-pixels", image_size.min_pixels, 1, "smallest image area after resizing");
  add_int_option(*cli, "--max-pixels", image_size.max_pixels, 1, "largest image area after resizing");
  add_int_option(*cli, "--open-sequences", open_sequences, 1, "sequences filled at once");
  add_number_option(*cli, "--fps", video.fps, "video frames sampled per second");
  add_int_option(*cli, "--video-max-pixels", video.max_pixels, 1, "pixels over all frames of a video");
  CLI::Option* rank_opt = add_int_option(*cli, "--rank", rank, 0, "this process's slice (without MPI)");
  CLI::Option* world_opt = add_int_option(*cli, "--world", world, 1, "processes sharing the work (without MPI)");
  CLI::Option* merge_opt = cli->add_flag("--merge", merge, "write the manifest of the --world W parts (without MPI)");
  cli->add_flag("--overwrite", options.overwrite, "replace an earlier pack in --out");
  cli->add_flag("--quiet", quiet, "no progress lines");
  if (const auto done = parse_command(*cli, args)) return *done;
  options.mode = mode == "chat" ? io::PackMode::chat : io::PackMode::caption;
  options.token_budget = max_len;
  options.shard_bytes = shard_mb << 20;
  options.open_sequences = static_cast<int>(open_sequences);
  options.rank = static_cast<int>(rank);
  options.world = static_cast<int>(world);
  const bool manual_ranks = rank_opt->count() + world_opt->count() + merge_opt->count() > 0;
  tokenizer_path = io::resolve_tokenizer_file(tokenizer_path, "--tokenizer");
  if (!(video.fps > 0)) throw UsageError("--fps expects a positive number, got " + std::to_string(video.fps));
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
