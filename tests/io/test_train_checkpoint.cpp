// Training checkpoints on the tiny flavors: bit-identical save/load round trip, keep-last-K pruning, listing
// that ignores incomplete and temporary folders, replacement of a step, the full-disk fault injection (an
// earlier checkpoint stays byte-identical and nothing partial is left), and an error naming the file for
// each kind of bad save or bad checkpoint.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "core/model/param_store.h"
#include "core/rng.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "io/train_checkpoint.h"
#include "tests/io/checkpoint_fixtures.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::read_all;
using test::write_all;
using json = nlohmann::json;
using test_fixtures::complete_steps;
using test_fixtures::dir_entries;
using test_fixtures::small_vocab;

// The flavors of this source tree, wherever the build directory is (an explicit Q3VL_FLAVORS_DIR wins).
const bool kFlavorsFromSourceTree = ::setenv("Q3VL_FLAVORS_DIR", Q3VL_SOURCE_DIR "/jobs/flavors", 0) == 0;

std::string bytes_of(const Tensor& t) {
  return {static_cast<const char*>(t.raw()), static_cast<size_t>(t.numel()) * dtype_size(t.dtype())};
}

// What a trainer checkpoints: weights in a ParamStore and two AdamW moments per parameter. Seed 0 gives
// zeros everywhere (a load destination).
struct TrainState {
  const ModelConfig& config;
  ParamStore weights;
  std::vector<std::vector<float>> moment_data;
  std::vector<NamedTensor> moments;

  TrainState(const ModelConfig& c, uint64_t seed) : config(c), weights(c, DType::f32, "checkpoint test") {
    if (seed == 0)
      weights.fill_zero();
    else
      weights.init(seed, 0.02);
    const std::vector<ParamSpec>& specs = weights.specs();
    moment_data.reserve(2 * specs.size());
    for (size_t i = 0; i < specs.size(); ++i)
      for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
        auto& v = moment_data.emplace_back(static_cast<size_t>(specs[i].numel()), 0.0f);
        const Tensor t(v.data(), DType::f32, specs[i].shape);
        if (seed != 0) fill_uniform(t, Philox(seed + 1, moments.size()), -1e-3, 1e-3);
        moments.push_back({specs[i].hf_key + suffix, t});
      }
  }

  WeightLookup lookup() const {
    return [this](const std::string& key) { return weights.at(key); };
  }

  // Same-length JSON for every one-digit step, so saves of different steps write the same byte count.
  TrainCheckpointWrite contents(int64_t step) const {
    TrainCheckpointWrite w;
    w.step = step;
    w.model_config = &config;
    w.weights = lookup();
    w.optimizer = moments;
    w.trainer_state_json = json{{"step", step}, {"optimizer_steps", step}, {"rng", {1, 2, 3}}}.dump();
    w.config_yaml = "train:\n  steps: 10\n  seed: 0\n";
    return w;
  }

  TrainCheckpointRead load(const std::string& dir) const {
    return load_train_checkpoint(dir, config, lookup(), moments);
  }
};

void expect_same_state(const TrainState& a, const TrainState& b) {
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i)
    EXPECT_EQ(bytes_of(a.weights.tensor(i)), bytes_of(b.weights.tensor(i))) << a.weights.specs()[i].hf_key;
  ASSERT_EQ(a.moments.size(), b.moments.size());
  for (size_t i = 0; i < a.moments.size(); ++i)
    EXPECT_EQ(bytes_of(a.moments[i].tensor), bytes_of(b.moments[i].tensor)) << a.moments[i].name;
}

bool all_zero(const TrainState& s) {
  for (size_t i = 0; i < s.weights.size(); ++i)
    if (bytes_of(s.weights.tensor(i)).find_first_not_of('\0') != std::string::npos) return false;
  for (const NamedTensor& m : s.moments)
    if (bytes_of(m.tensor).find_first_not_of('\0') != std::string::npos) return false;
  return true;
}

// Every file under `dir` (relative path -> bytes).
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = read_all(e.path().string());
  return out;
}

TEST(TrainCheckpoint, SaveLoadRoundTripIsBitIdentical) {
  TempDir tmp;
  for (const std::string flavor : {"tiny-moe", "tiny-dense"}) {
    SCOPED_TRACE(flavor);
    const ModelConfig config = small_vocab(flavor);
    const std::string root = tmp / (flavor + "_run");
    const TrainState saved(config, 5);
    const std::string dir = save_train_checkpoint(root, saved.contents(7), 3);
    EXPECT_EQ(dir, root + "/step-00000007");
    EXPECT_EQ(dir_entries(root), std::set<std::string>{"step-00000007"});
    std::set<std::string> files;
    for (const auto& [name, bytes] : snapshot(dir)) files.insert(name);
    EXPECT_EQ(files, (std::set<std::string>{"COMPLETE", "config.yaml", "model/config.json", "model/model.safetensors",
                                            "optimizer.safetensors", "trainer_state.json"}));

    const TrainState loaded(config, 0);
    const TrainCheckpointRead read = loaded.load(dir);
    expect_same_state(saved, loaded);
    EXPECT_EQ(read.trainer_state_json, saved.contents(7).trainer_state_json);
    EXPECT_EQ(read.config_yaml, saved.contents(7).config_yaml);

    // model/ is an ordinary f32 HF checkpoint: what save_hf_checkpoint writes, loadable on its own.
    save_hf_checkpoint(tmp / (flavor + "_hf"), config, saved.lookup(), DType::f32, 0);
    EXPECT_EQ(snapshot(dir + "/model"), snapshot(tmp / (flavor + "_hf")));
    EXPECT_EQ(hf_config_json(load_model_config(dir + "/model"), DType::f32), hf_config_json(config, DType::f32));
    const SafetensorsFile optimizer(dir + "/optimizer.safetensors");
    EXPECT_EQ(optimizer.tensors().size(), saved.moments.size());
    for (const StTensorInfo& t : optimizer.tensors())
      EXPECT_EQ(t.dtype, StDType::F32) << t.key;
  }
}

TEST(TrainCheckpoint, KeepsTheLastKCompleteCheckpoints) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState state(config, 3);
  const std::string root = tmp / "run";
  for (int64_t step = 1; step <= 5; ++step) save_train_checkpoint(root, state.contents(step), 2);
  EXPECT_EQ(complete_steps(root), (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(dir_entries(root), (std::set<std::string>{"step-00000004", "step-00000005"}));
  save_train_checkpoint(root, state.contents(6), 1);
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{6});
  // A run resumed from an older step keeps what it just saved (plus the keep-1 highest others).
  save_train_checkpoint(root, state.contents(3), 2);
  EXPECT_EQ(complete_steps(root), (std::vector<int64_t>{3, 6}));
  save_train_checkpoint(root, state.contents(2), 1);
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{2});
  EXPECT_EQ(dir_entries(root), std::set<std::string>{"step-00000002"});
}

TEST(TrainCheckpoint, ListingIgnoresIncompleteAndTemporaryFolders) {
  TempDir tmp;
  const std::string root = tmp / "run";
  EXPECT_TRUE(list_complete_checkpoints(root).empty());
  EXPECT_FALSE(latest_complete_checkpoint(root).has_value());

  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState state(config, 3);
  const std::string two = save_train_checkpoint(root, state.contents(2), 5);
  // Higher steps that must all be ignored: an incomplete step folder (a copy without the marker), a
  // temporary folder with a marker, a non-canonical name, a plain file, a marker that is not a file.
  fs::copy(two, root + "/step-00000005", fs::copy_options::recursive);
  fs::remove(root + "/step-00000005/COMPLETE");
  fs::copy(two, root + "/.tmp-step-00000006-12345", fs::copy_options::recursive);
  fs::copy(two, root + "/step-7", fs::copy_options::recursive);
  write_all(root + "/step-00000008", "not a folder");
  fs::create_directories(root + "/step-00000009/COMPLETE");

  const std::vector<CheckpointEntry> all = list_complete_checkpoints(root);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].step, 2);
  EXPECT_EQ(all[0].path, two);
  ASSERT_TRUE(latest_complete_checkpoint(root).has_value());
  EXPECT_EQ(latest_complete_checkpoint(root)->path, two);
  const TrainState loaded(config, 0);
  test::expect_error([&] { loaded.load(root + "/step-00000005"); },
                     root + "/step-00000005 is incomplete: it has no COMPLETE marker");
  test::expect_error([&] { list_complete_checkpoints(root + "/step-00000008"); }, "step-00000008 is not a folder");
}

TEST(TrainCheckpoint, SavingAStepAgainReplacesIt) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const std::string root = tmp / "run";
  // What a crash leaves: an incomplete step folder and another process's temporary folder of the same step.
  fs::create_directories(root + "/step-00000003/model");
  write_all(root + "/step-00000003/junk", "half a save");
  fs::create_directories(root + "/.tmp-step-00000003-999999");
  fs::create_directories(root + "/.tmp-step-00000004-999999");
  const TrainState first(config, 3);
  const std::string dir = save_train_checkpoint(root, first.contents(3), 3);
  EXPECT_FALSE(fs::exists(dir + "/junk"));
  EXPECT_EQ(dir_entries(root), (std::set<std::string>{"step-00000003", ".tmp-step-00000004-999999"}));

  const TrainState second(config, 4);
  EXPECT_EQ(save_train_checkpoint(root, second.contents(3), 3), dir);
  const TrainState loaded(config, 0);
  loaded.load(dir);
  expect_same_state(second, loaded);
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{3});
}

TEST(TrainCheckpoint, FullDiskFailsTheSaveAndLeavesEarlierCheckpointsUntouched) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const std::string root = tmp / "run";
  const TrainState state(config, 9);
  const std::string one = save_train_checkpoint(root, state.contents(1), 1);
  const std::map<std::string, std::string> before = snapshot(one);
  int64_t total = 0;
  for (const auto& [name, bytes] : before) total += static_cast<int64_t>(bytes.size());
  const int64_t optimizer_start = total - static_cast<int64_t>(before.at("COMPLETE").size() +
                                                              before.at("config.yaml").size() +
                                                              before.at("trainer_state.json").size() +
                                                              before.at("optimizer.safetensors").size());

  // Budgets that stop the save in each file: the first byte, inside the weights, inside the optimizer
  // file, and the last byte of the COMPLETE marker (after the rename). The error names the file being written.
  const std::string tmp_dir = root + "/.tmp-step-00000002-" + std::to_string(::getpid());
  const int64_t weights_start = static_cast<int64_t>(before.at("model/config.json").size());
  const std::vector<std::pair<int64_t, std::string>> budgets{
      {0, tmp_dir + "/model/config.json"},
      {weights_start + 1000, tmp_dir + "/model/model.safetensors"},
      {optimizer_start + 100, tmp_dir + "/optimizer.safetensors"},
      {total - 1, root + "/step-00000002/COMPLETE"},
  };
  const TrainState other(config, 10);
  for (const auto& [budget, file] : budgets) {
    SCOPED_TRACE(file);
    set_write_fault_after_bytes(budget);
    test::expect_error([&] { save_train_checkpoint(root, other.contents(2), 1); },
                       "checkpoint: cannot write " + file + ": No space left on device");
    set_write_fault_after_bytes(-1);
    EXPECT_EQ(dir_entries(root), std::set<std::string>{"step-00000001"});
    EXPECT_EQ(snapshot(one), before);
    ASSERT_TRUE(latest_complete_checkpoint(root).has_value());
    EXPECT_EQ(latest_complete_checkpoint(root)->step, 1);
    const TrainState loaded(config, 0);
    loaded.load(one);
    expect_same_state(state, loaded);
  }
  // The budget counts exactly the bytes of the files: a save that needs `total` bytes fits in `total`.
  set_write_fault_after_bytes(total);
  save_train_checkpoint(root, other.contents(2), 1);
  set_write_fault_after_bytes(-1);
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{2});
}

TEST(TrainCheckpoint, FullDiskFaultFromTheEnvironment) {
  // A fresh process (the threadsafe death-test style re-executes this binary), so the variable is read at
  // its first save.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir tmp;
  const std::string root = tmp / "run";
  EXPECT_EXIT(
      {
        ::setenv("Q3VL_FAULT_WRITE_AFTER_BYTES", "64", 1);
        const ModelConfig config = small_vocab("tiny-moe");
        const TrainState state(config, 1);
        bool full = false;
        try {
          save_train_checkpoint(root, state.contents(1), 1);
        } catch (const Error& e) {
          full = std::strstr(e.what(), "config.json: No space left on device") != nullptr;
        }
        const bool clean = dir_entries(root).empty();
        fs::remove_all(tmp.path());
        std::exit(full && clean ? 0 : 1);
      },
      testing::ExitedWithCode(0), "");
}

// Runs `save` as an unprivileged user (root ignores permissions) in a child process and returns the error
// message it got ("" when it succeeded); nullopt when the privileges cannot be dropped.
std::optional<std::string> error_as_nobody(const std::function<void()>& save) {
  int fds[2];
  if (::pipe(fds) != 0) return std::nullopt;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    constexpr uid_t kNobody = 65534;
    if (::setgid(kNobody) != 0 || ::setuid(kNobody) != 0) ::_exit(2);
    std::string message;
    try {
      save();
    } catch (const Error& e) {
      message = e.what();
    }
    const ssize_t written = ::write(fds[1], message.data(), message.size());
    ::_exit(written == static_cast<ssize_t>(message.size()) ? 0 : 3);
  }
  ::close(fds[1]);
  std::string message;
  char buffer[4096];
  for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;) message.append(buffer, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) == 2) return std::nullopt;
  return message;
}

TEST(TrainCheckpoint, UnwritableRootIsAnErrorNamingIt) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState state(config, 2);
  write_all(tmp / "file", "x");
  test::expect_error([&] { save_train_checkpoint(tmp / "file/run", state.contents(1), 1); },
                     "checkpoint: cannot create folder " + tmp / "file/run");

  const std::string locked = tmp / "locked";
  fs::create_directories(locked);
  ::chmod(locked.c_str(), 0555);
  const auto save = [&] { save_train_checkpoint(locked, state.contents(1), 1); };
  const std::string expected = "checkpoint: cannot create folder " + locked + "/.tmp-step-00000001-";
  if (::geteuid() != 0) {
    test::expect_error(save, expected);
    test::expect_error(save, "Permission denied");
  } else {
    // Root writes into read-only folders, so the check runs in a child process as user nobody.
    const std::optional<std::string> message = error_as_nobody(save);
    if (!message) GTEST_SKIP() << "running as root and cannot switch to user nobody: permission check skipped";
    EXPECT_NE(message->find(expected), std::string::npos) << *message;
    EXPECT_NE(message->find("Permission denied"), std::string::npos) << *message;
  }
  EXPECT_TRUE(dir_entries(locked).empty());
}

TEST(TrainCheckpoint, BadContentsAreRejectedBeforeAnythingIsWritten) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState state(config, 2);
  const std::string root = tmp / "run";
  const std::string norm = "model.language_model.norm.weight";
  std::vector<float> wrong(65);
  std::vector<double> f64(64);

  test::expect_error([&] { save_train_checkpoint(root, state.contents(1), 0); }, "keep is 0, expected at least 1");
  TrainCheckpointWrite w = state.contents(1);
  w.model_config = nullptr;
  test::expect_error([&] { save_train_checkpoint(root, w, 1); }, "no model config");
  w = state.contents(1);
  w.weights = [&](const std::string& key) {
    return key == norm ? Tensor(wrong.data(), DType::f32, {65}) : state.weights.at(key);
  };
  test::expect_error([&] { save_train_checkpoint(root, w, 1); },
                     "the weight tensor for '" + norm + "' has shape [65], expected [64]");
  w = state.contents(1);
  w.optimizer.push_back(w.optimizer.front());
  test::expect_error([&] { save_train_checkpoint(root, w, 1); },
                     "optimizer tensor '" + w.optimizer.front().name + "' is listed twice");
  w = state.contents(1);
  w.optimizer.push_back({"extra.exp_avg", Tensor(f64.data(), DType::f64, {64})});
  test::expect_error([&] { save_train_checkpoint(root, w, 1); },
                     "optimizer tensor 'extra.exp_avg' is f64[64], expected contiguous host f32");
  w = state.contents(1);
  w.trainer_state_json = "{\"step\": ";
  test::expect_error([&] { save_train_checkpoint(root, w, 1); }, "the trainer state is not valid JSON");
  EXPECT_FALSE(fs::exists(root));
}

// A saved checkpoint, damaged by `damage`, must fail to load with every part of `message`.
struct BadCheckpoint {
  std::string name;
  std::function<void(const std::string& dir)> damage;
  std::vector<std::string> message;
};

TEST(TrainCheckpoint, BadCheckpointsAreErrorsNamingTheFile) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState saved(config, 6);
  const std::string good = save_train_checkpoint(tmp / "run", saved.contents(1), 1);
  const auto truncate = [](const std::string& path) {
    const std::string bytes = read_all(path);
    write_all(path, bytes.substr(0, bytes.size() - 100));
  };
  const std::string q_proj = "model.language_model.layers.1.self_attn.q_proj.weight";
  const std::vector<BadCheckpoint> cases{
      {"no_marker", [](const std::string& d) { fs::remove(d + "/COMPLETE"); },
       {"no_marker is incomplete: it has no COMPLETE marker"}},
      {"no_state", [](const std::string& d) { fs::remove(d + "/trainer_state.json"); },
       {"cannot read ", "no_state/trainer_state.json: No such file or directory"}},
      {"truncated_state", [&](const std::string& d) { write_all(d + "/trainer_state.json", "{\"step\": 1,"); },
       {"truncated_state/trainer_state.json is not valid JSON"}},
      {"no_yaml", [](const std::string& d) { fs::remove(d + "/config.yaml"); },
       {"no_yaml/config.yaml: No such file or directory"}},
      {"no_model_config", [](const std::string& d) { fs::remove(d + "/model/config.json"); },
       {"no_model_config/model/config.json: No such file or directory"}},
      {"truncated_model", [&](const std::string& d) { truncate(d + "/model/model.safetensors"); },
       {"truncated_model/model/model.safetensors is truncated"}},
      {"truncated_optimizer", [&](const std::string& d) { truncate(d + "/optimizer.safetensors"); },
       {"truncated_optimizer/optimizer.safetensors is truncated"}},
      {"no_optimizer", [](const std::string& d) { fs::remove(d + "/optimizer.safetensors"); },
       {"no_optimizer/optimizer.safetensors: No such file or directory"}},
      {"missing_weight",
       [&](const std::string& d) {
         std::vector<StWriteEntry> kept;
         for (const ParamSpec& s : saved.weights.specs())
           if (s.hf_key != q_proj) kept.push_back({s.hf_key, saved.weights.at(s.hf_key)});
         write_safetensors_file(d + "/model/model.safetensors", kept, DType::f32);
       },
       {"1 missing tensor(s): '" + q_proj + "'"}},
  };
  for (const BadCheckpoint& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = tmp / c.name;
    fs::copy(good, dir, fs::copy_options::recursive);
    c.damage(dir);
    const TrainState loaded(config, 0);
    for (const std::string& part : c.message) test::expect_error([&] { loaded.load(dir); }, part);
    EXPECT_TRUE(all_zero(loaded)) << "a failed load wrote into the destination";
  }
}

TEST(TrainCheckpoint, ACheckpointOfAnotherModelOrOptimizerIsRejected) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const TrainState saved(config, 6);
  const std::string dir = save_train_checkpoint(tmp / "run", saved.contents(1), 1);

  ModelConfig wider = config;
  wider.text.moe_intermediate_size = 32;
  const TrainState other_model(wider, 0);
  test::expect_error([&] { other_model.load(dir); },
                     dir + "/model/config.json: the model config differs from this run's at "
                           "'text_config.moe_intermediate_size': the checkpoint has 48, the run has 32");
  ModelConfig deeper = config;
  deeper.vision.depth = 5;
  const TrainState other_vision(deeper, 0);
  test::expect_error([&] { other_vision.load(dir); }, "at 'vision_config.depth': the checkpoint has 4, the run has 5");

  const std::string optimizer_file = dir + "/optimizer.safetensors";
  TrainState loaded(config, 0);
  std::vector<float> spare(65);
  const std::string first = loaded.moments.front().name;
  const std::vector<NamedTensor> all = loaded.moments;
  const auto load_with = [&](const std::vector<NamedTensor>& moments) {
    load_train_checkpoint(dir, config, loaded.lookup(), moments);
  };
  std::vector<NamedTensor> extra = all;
  extra.push_back({"model.extra.weight.exp_avg", Tensor(spare.data(), DType::f32, {65})});
  test::expect_error([&] { load_with(extra); },
                     optimizer_file + ": missing optimizer tensor 'model.extra.weight.exp_avg'");
  std::vector<NamedTensor> fewer(all.begin() + 1, all.end());
  test::expect_error([&] { load_with(fewer); }, optimizer_file + ": unexpected optimizer tensor '" + first + "'");
  std::vector<NamedTensor> misshaped = all;
  const std::string norm_avg = "model.language_model.norm.weight.exp_avg";
  for (NamedTensor& t : misshaped)
    if (t.name == norm_avg) t.tensor = Tensor(spare.data(), DType::f32, {65});
  test::expect_error([&] { load_with(misshaped); },
                     optimizer_file + ": optimizer tensor '" + norm_avg + "' has shape [64], expected [65]");
  EXPECT_TRUE(all_zero(loaded)) << "a failed load wrote into the destination";
  load_with(all);
  expect_same_state(saved, loaded);
}

}  // namespace
}  // namespace q3vl::io
