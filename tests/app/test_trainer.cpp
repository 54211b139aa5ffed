// The trainer end to end on real packed data (cc12m captions with their images, shrunk): overfitting, exact
// resume after a signal-triggered save, gradient accumulation equal to a bigger batch, non-finite handling,
// bad checkpoints and inputs, the MFU's peak, the HF export, and MoE load balancing (router bias against the
// aux loss on a collapsed router, the bias through resume and export, per-layer aux loss, expert health).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "app/train_config.h"
#include "app/trainer.h"
#include "app/version.h"
#include "core/cpu_peak.h"
#include "io/hf_config.h"
#include "io/image.h"
#include "io/image_resize.h"
#include "io/model_io.h"
#include "io/packer.h"
#include "io/safetensors.h"
#include "io/shard_format.h"
#include "io/train_checkpoint.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::app {
namespace {

namespace fs = std::filesystem;

const std::string kShared = Q3VL_SHARED_DIR;
const std::string kTokenizerDir = kShared + "/assets/qwen3-tokenizer";

// Packs the first `samples` cc12m caption samples (images shrunk to 64x64: 4 vision tokens) into `out`.
void pack_captions(const std::string& out, int samples, int64_t budget) {
  const std::string src = kShared + "/data/cc12m-32/captions.jsonl";
  std::ifstream in(src);
  std::ostringstream lines;
  std::string line;
  for (int i = 0; i < samples && std::getline(in, line); ++i) lines << line << "\n";
  fs::create_directories(out);
  const std::string input = out + "/samples.jsonl";
  test::write_all(input, lines.str());
  for (const auto& e : fs::directory_iterator(kShared + "/data/cc12m-32"))
    if (e.path().extension() == ".jpg") fs::copy_file(e.path(), fs::path(out) / e.path().filename(), fs::copy_options::skip_existing);
  io::PackOptions options;
  options.inputs = {input};
  options.out_dir = out + "/packed";
  options.token_budget = budget;
  io::MediaDecoder media;
  media.image = [](const std::string& path) {
    const io::Image resized = io::resize_for_model(io::decode_image(path), {.factor = 32, .min_pixels = 4096, .max_pixels = 4096});
    return io::DecodedMedia{1, static_cast<int32_t>(resized.height), static_cast<int32_t>(resized.width), resized.pixels, {}};
  };
  const std::string tokenizer = kTokenizerDir + "/tokenizer.json";
  const io::PackSummary summary = io::pack(options, io::Tokenizer::load(tokenizer), io::tokenizer_file_hash(tokenizer), media);
  ASSERT_EQ(summary.samples_packed, samples) << summary.report();
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ::setenv("Q3VL_FLAVORS_DIR", (std::string(Q3VL_SOURCE_DIR) + "/jobs/flavors").c_str(), 1);
    Trainer::clear_stop_request();
  }

  TrainConfig base_config(const std::string& data, const std::string& out) const {
    TrainConfig c;
    c.model.flavor = "tiny-moe";
    c.model.init_seed = 7;
    c.data.dir = data;
    c.train.steps = 4;
    c.optimizer.lr = 2e-3;
    c.optimizer.warmup_steps = 1;
    c.logging.expert_stats_every = 2;
    c.checkpoint.resume = "auto";
    c.export_.hf = false;
    c.output_dir = out;
    return c;
  }

  test::TempDir tmp;
  std::ostringstream log;
};

std::vector<float> weights_of(const Model& m) {
  std::vector<float> w;
  for (size_t i = 0; i < m.weights().size(); ++i) {
    const Tensor& t = m.weights().tensor(i);
    w.insert(w.end(), t.data<float>(), t.data<float>() + t.numel());
  }
  return w;
}

TEST_F(TrainerTest, OverfitsEightSamples) {
  pack_captions(tmp / "data", 8, 1024);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.train.steps = 60;
  c.optimizer.lr = 3e-3;
  c.optimizer.warmup_steps = 5;
  c.optimizer.decay = "constant";
  c.optimizer.weight_decay = 0.0;
  c.data.sequences_per_batch = 1;
  Trainer t(c, log);
  const TrainOutcome o = t.run();
  ASSERT_EQ(o.steps.size(), 60u);
  std::printf("overfit: loss %.4f -> %.4f after %zu steps\n", o.steps.front().loss, o.steps.back().loss, o.steps.size());
  EXPECT_GT(o.steps.front().loss, 5.0) << "an untrained model should be far from the data";
  EXPECT_LT(o.steps.back().loss, 0.5) << log.str();
}

TEST_F(TrainerTest, ResumeAfterSignalIsBitExact) {
  pack_captions(tmp / "data", 12, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "straight");
  c.train.steps = 6;
  c.train.grad_accum = 2;
  Trainer straight(c, log);
  const TrainOutcome a = straight.run();
  ASSERT_EQ(a.steps.size(), 6u);

  c.output_dir = tmp / "split";
  TrainOutcome first;
  {
    Trainer::install_stop_signal_handlers();
    Trainer t(c, log);
    t.set_step_callback([](const StepRecord& r) {
      if (r.step == 3) std::raise(SIGUSR1);
    });
    first = t.run();
  }
  EXPECT_TRUE(first.stopped_by_signal);
  ASSERT_EQ(first.steps_done, 3);
  ASSERT_EQ(io::list_complete_checkpoints(tmp / "split/checkpoints").size(), 1u);
  Trainer::clear_stop_request();
  Trainer resumed(c, log);
  const TrainOutcome second = resumed.run();
  EXPECT_EQ(second.start_step, 3);
  ASSERT_EQ(second.steps.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(first.steps[i].loss, a.steps[i].loss) << "step " << i + 1;
    EXPECT_EQ(second.steps[i].loss, a.steps[i + 3].loss) << "step " << i + 4;
    EXPECT_EQ(second.steps[i].grad_norm, a.steps[i + 3].grad_norm) << "step " << i + 4;
  }
  const std::vector<float> wa = weights_of(straight.model()), wb = weights_of(resumed.model());
  ASSERT_EQ(wa.size(), wb.size());
  EXPECT_EQ(std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)), 0) << "parameters differ after resume";
}

TEST_F(TrainerTest, GradientAccumulationEqualsTheBiggerBatch) {
  pack_captions(tmp / "data", 12, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "big");
  c.model.router_aux_loss_coef = 0.0;  // the aux loss of a pooled batch is not the mean of its halves' aux losses
  c.train.steps = 3;
  c.data.sequences_per_batch = 2;
  Trainer big(c, log);
  const TrainOutcome a = big.run();
  c.output_dir = tmp / "accum";
  c.data.sequences_per_batch = 1;
  c.train.grad_accum = 2;
  Trainer accum(c, log);
  const TrainOutcome b = accum.run();
  // Same sequences, same loss; only the fp32 summation order differs (two CE sums instead of one, gradients
  // accumulated in two passes), so agreement to ~1e-6 relative is expected; 1e-5 leaves room for 3 steps.
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a.steps[i].tokens, b.steps[i].tokens);
    EXPECT_NEAR(a.steps[i].loss, b.steps[i].loss, 1e-5 * std::abs(a.steps[i].loss)) << "step " << i + 1;
  }
  const std::vector<float> wa = weights_of(big.model()), wb = weights_of(accum.model());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < wa.size(); ++i) {
    diff += (double(wa[i]) - wb[i]) * (double(wa[i]) - wb[i]);
    norm += double(wa[i]) * wa[i];
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-5);
}

TEST_F(TrainerTest, FrozenModulesAndZeroLearningRateStayPut) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.train.steps = 2;
  c.optimizer.freeze = {"vision_tower"};
  c.optimizer.lr_scale["mergers"] = 0.0;
  Trainer t(c, log);
  t.run();
  Model init(io::load_model_config("tiny-moe"));
  init.init_weights(c.model.init_seed);
  int64_t unchanged_visual = 0, changed_text = 0;
  for (size_t i = 0; i < init.weights().size(); ++i) {
    const Tensor& a = init.weights().tensor(i);
    const Tensor& b = t.model().weights().tensor(i);
    const bool same = std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
    const std::string module = param_module(init.weights().specs()[i].hf_key);
    if (module == "language_model") {
      changed_text += !same;
    } else {
      EXPECT_TRUE(same) << init.weights().specs()[i].hf_key << " (" << module << ") moved";
      ++unchanged_visual;
    }
  }
  EXPECT_GT(unchanged_visual, 10);
  EXPECT_GT(changed_text, 10) << "the language model should have trained";
}

// The MFU's peak is this CPU's estimate unless the config sets one, and the start line and record say which.
TEST_F(TrainerTest, MfuPeakIsDetectedUnlessTheConfigSetsIt) {
  pack_captions(tmp / "data", 2, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "detected");
  c.train.steps = 1;
  c.logging.expert_stats_every = 0;
  {
    Trainer t(c, log);
    t.run();
  }
  const CpuPeak cpu = detect_cpu_peak(omp_get_max_threads());
  EXPECT_NE(log.str().find(" GFLOP/s per rank (detected: " + cpu.describe() + ")\n"), std::string::npos) << log.str();
  EXPECT_NE(test::read_all(tmp / "detected/metrics.jsonl").find("\"peak_source\":\"detected: " + cpu.describe()),
            std::string::npos);

  c.logging.peak_gflops = 1234.5;
  c.output_dir = tmp / "configured";
  log.str("");
  Trainer t(c, log);
  t.run();
  EXPECT_NE(log.str().find("MFU against a peak of 1234.5 GFLOP/s per rank (from config logging.peak_gflops)\n"),
            std::string::npos) << log.str();
  const std::string metrics = test::read_all(tmp / "configured/metrics.jsonl");
  EXPECT_NE(metrics.find("\"peak_gflops\":1234.5,"), std::string::npos) << metrics;
}

// A checkpoint to start from whose lm_head holds a NaN: every loss is NaN.
std::string nan_model(const std::string& dir) {
  Model m(io::load_model_config("tiny-moe"));
  m.init_weights(3);
  m.weights().at("lm_head.weight").data<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  io::save_hf_model(dir, m, DType::f32, 0);
  return dir;
}

TEST_F(TrainerTest, NonFiniteLossStopsOrSkips) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.model.flavor.reset();
  c.model.checkpoint = nan_model(tmp / "nan_model");
  {
    Trainer t(c, log);
    test::expect_error([&] { t.run(); }, "step 1: loss is not finite");
  }
  c.train.skip_nonfinite = true;
  c.output_dir = tmp / "run_skip";
  Trainer t(c, log);
  const TrainOutcome o = t.run();
  ASSERT_EQ(o.steps.size(), 4u);
  for (const StepRecord& r : o.steps) EXPECT_TRUE(r.skipped);
}

TEST_F(TrainerTest, BadInputsAreClearErrors) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");

  TrainConfig missing = c;
  missing.data.dir = tmp / "nowhere";
  test::expect_error([&] { Trainer t(missing, log); }, "nowhere");

  TrainConfig unwritable = c;
  test::write_all(tmp / "a_file", "x");
  unwritable.output_dir = tmp / "a_file/run";
  test::expect_error([&] { Trainer t(unwritable, log); }, "output_dir");

  // Another tokenizer than the data was packed with.
  fs::create_directories(tmp / "other_tok");
  std::string tok = test::read_all(kTokenizerDir + "/tokenizer.json");
  tok.back() = tok.back() == '}' ? ' ' : tok.back();
  test::write_all(tmp / "other_tok/tokenizer.json", tok + "}");
  TrainConfig other_tok = c;
  other_tok.export_.tokenizer = tmp / "other_tok";
  test::expect_error([&] { Trainer t(other_tok, log); }, "was packed with tokenizer");

  // A checkpoint of another model config.
  c.train.steps = 1;
  { Trainer(c, log).run(); }
  const std::string ckpt = io::latest_complete_checkpoint(tmp / "run/checkpoints")->path;
  TrainConfig dense = c;
  dense.model.flavor = "tiny-dense";
  dense.checkpoint.resume = ckpt;
  test::expect_error([&] { Trainer t(dense, log); }, "config");

  // A truncated optimizer file in the checkpoint to resume.
  TrainConfig resume = c;
  resume.output_dir = tmp / "run2";
  resume.checkpoint.resume = tmp / "broken";
  fs::copy(ckpt, tmp / "broken", fs::copy_options::recursive);
  const std::string opt = tmp / "broken/optimizer.safetensors";
  fs::resize_file(opt, fs::file_size(opt) / 2);
  test::expect_error([&] { Trainer t(resume, log); }, "optimizer.safetensors");

  // Without its COMPLETE marker a checkpoint is not one.
  fs::remove(tmp / "broken/COMPLETE");
  test::expect_error([&] { Trainer t(resume, log); }, "broken");
}

TEST_F(TrainerTest, FullDiskDuringSaveKeepsThePreviousCheckpoint) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.train.steps = 2;
  c.checkpoint.every = 1;
  Trainer t(c, log);
  // The callback runs between a step and its checkpoint: step 2's save meets the full disk.
  t.set_step_callback([](const StepRecord& r) {
    if (r.step == 2) io::set_write_fault_after_bytes(100000);
  });
  test::expect_error([&] { t.run(); }, "No space left on device");
  io::set_write_fault_after_bytes(-1);
  const auto complete = io::list_complete_checkpoints(tmp / "run/checkpoints");
  ASSERT_EQ(complete.size(), 1u);
  EXPECT_EQ(complete[0].step, 1);
  // The surviving checkpoint still resumes.
  TrainConfig again = c;
  Trainer resumed(again, log);
  const TrainOutcome o = resumed.run();
  EXPECT_EQ(o.start_step, 1);
  EXPECT_EQ(o.steps_done, 2);
}

TEST_F(TrainerTest, ExportsAnHfFolderThatLoadsBack) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.train.steps = 2;
  c.export_.hf = true;
  c.export_.dtype = "f32";
  c.export_.tokenizer = kTokenizerDir;
  Trainer t(c, log);
  const TrainOutcome o = t.run();
  ASSERT_EQ(o.export_dir, tmp / "run/hf");
  EXPECT_TRUE(fs::exists(tmp / "run/hf/tokenizer.json"));
  EXPECT_TRUE(fs::exists(tmp / "run/hf/tokenizer_config.json"));
  const auto loaded = io::load_hf_model(tmp / "run/hf");
  const std::vector<float> wa = weights_of(t.model()), wb = weights_of(*loaded);
  ASSERT_EQ(wa.size(), wb.size());
  EXPECT_EQ(std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)), 0);
}

// Every metrics record carries its wall-clock time, the start record and the saved state name the q3vl that ran,
// every progress line starts with the time, and a step's phases are disjoint parts of it.
TEST_F(TrainerTest, RecordsCarryTimeVersionAndStepPhases) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "run");
  c.train.steps = 2;
  c.export_.hf = true;
  c.export_.dtype = "f32";
  Trainer t(c, log);
  t.run();
  const std::string version = std::string(q3vl_version()), commit = std::string(q3vl_git_commit());
  ASSERT_FALSE(version.empty());
  ASSERT_FALSE(commit.empty());
  const std::regex utc(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z)");
  std::istringstream metrics(test::read_all(tmp / "run/metrics.jsonl"));
  int steps = 0, starts = 0;
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    ASSERT_TRUE(j.contains("time")) << line;
    EXPECT_TRUE(std::regex_match(j.at("time").get<std::string>(), utc)) << line;
    if (j.at("event") == "start") {
      ++starts;
      EXPECT_EQ(j.at("q3vl_version"), version);
      EXPECT_EQ(j.at("git_commit"), commit);
    }
    if (j.at("event") != "step") continue;
    ++steps;
    double phases = 0;
    for (const char* key : {"data_s", "forward_s", "backward_s", "comm_s", "optimizer_s"}) {
      const double v = j.at(key).get<double>();
      EXPECT_GE(v, 0.0) << key << " in " << line;
      phases += v;
    }
    EXPECT_GT(j.at("forward_s").get<double>(), 0.0) << line;
    EXPECT_GT(j.at("backward_s").get<double>(), 0.0) << line;
    // Disjoint intervals of the step: their sum is at most the step's time (up to the rounding of the sums).
    EXPECT_LE(phases, j.at("step_s").get<double>() * (1 + 1e-9)) << line;
  }
  EXPECT_EQ(starts, 1);
  EXPECT_EQ(steps, 2);
  const std::regex local(R"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} .*)");
  std::istringstream lines(log.str());
  for (std::string line; std::getline(lines, line);) EXPECT_TRUE(std::regex_match(line, local)) << line;
  EXPECT_NE(log.str().find(" (data "), std::string::npos) << log.str();
  const nlohmann::json state = nlohmann::json::parse(test::read_all(tmp / "run/checkpoints/step-00000002/trainer_state.json"));
  EXPECT_EQ(state.at("q3vl_version"), version);
  EXPECT_EQ(state.at("git_commit"), commit);
  const nlohmann::json exported = nlohmann::json::parse(test::read_all(tmp / "run/hf/config.json"));
  EXPECT_EQ(exported.at("q3vl_version"), version + " (git " + commit + ")");
}

// A tiny-moe checkpoint whose routers send almost every token to experts 0 and 1 of every MoE layer: every token
// embedding gets a shared direction d (norm 0.5, against rows of norm ~0.16), which the residual stream carries
// to every layer's router input, and the router rows of experts 0 and 1 get 0.5 d / |d|: their logits are ~4
// above the others' for nearly every token (top-2 of 8: max/mean load near its maximum, 4).
std::string collapsed_router_model(const std::string& dir) {
  const ModelConfig mc = io::load_model_config("tiny-moe");
  Model m(mc);
  m.init_weights(11);
  const int64_t H = mc.text.hidden_size;
  std::vector<float> d(static_cast<size_t>(H));
  for (int64_t i = 0; i < H; ++i) d[i] = (i % 3 == 0 ? 1.0f : -0.5f);
  float norm = 0;
  for (const float v : d) norm += v * v;
  norm = std::sqrt(norm);
  for (float& v : d) v /= norm;
  const Tensor embed = m.weights().at("model.language_model.embed_tokens.weight");
  for (int64_t r = 0; r < embed.size(0); ++r)
    for (int64_t i = 0; i < H; ++i) embed.data<float>()[r * H + i] += 0.5f * d[i];
  for (int l = 0; l < mc.text.num_hidden_layers; ++l) {
    if (!mc.is_moe_layer(l)) continue;
    const Tensor router = m.weights().at("model.language_model.layers." + std::to_string(l) + ".mlp.gate.weight");
    for (int64_t e = 0; e < 2; ++e)
      for (int64_t i = 0; i < H; ++i) router.data<float>()[e * H + i] += 0.5f * d[i];
  }
  io::save_hf_model(dir, m, DType::f32, 0);
  return dir;
}

// The "expert_health" records of a run's metrics.jsonl.
std::vector<nlohmann::json> health_records(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::istringstream in(test::read_all(run + "/metrics.jsonl"));
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.at("event") == "expert_health") out.push_back(j);
  }
  return out;
}

double worst_max_over_mean(const nlohmann::json& record) {
  double worst = 0;
  for (const auto& l : record.at("layers")) worst = std::max(worst, l.at("max_over_mean").get<double>());
  return worst;
}

// Done-when of issue 18: from a collapsed router, the bias brings the worst layer's load towards balance within
// 50 steps while HF's aux loss (tiny-moe's coefficient 0.001) barely moves it. The bias rate is 0.02 so that 50
// sign steps can close the ~0.45 probability gap of the collapsed experts. Prints both runs' windows.
TEST_F(TrainerTest, BiasRoutingBalancesACollapsedRouterFasterThanTheAuxLoss) {
  pack_captions(tmp / "data", 12, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "aux");
  c.model.flavor.reset();
  c.model.checkpoint = collapsed_router_model(tmp / "collapsed");
  c.train.steps = 50;
  c.optimizer.warmup_steps = 0;
  c.optimizer.decay = "constant";
  c.logging.expert_stats_every = 0;
  c.logging.expert_health_every = 10;
  { Trainer(c, log).run(); }
  c.output_dir = tmp / "bias";
  c.moe.balance = "bias";
  c.moe.bias_update_rate = 0.02;
  Trainer biased(c, log);
  biased.run();
  const std::vector<nlohmann::json> aux = health_records(tmp / "aux"), bias = health_records(tmp / "bias");
  ASSERT_EQ(aux.size(), 5u);
  ASSERT_EQ(bias.size(), 5u);
  for (size_t w = 0; w < 5; ++w)
    std::printf("steps %2zu-%2zu: worst max/mean aux %.2f, bias %.2f; dead experts (layer 0) aux %d, bias %d\n",
                10 * w + 1, 10 * w + 10, worst_max_over_mean(aux[w]), worst_max_over_mean(bias[w]),
                aux[w]["layers"][0]["dead_experts"].get<int>(), bias[w]["layers"][0]["dead_experts"].get<int>());
  EXPECT_GT(worst_max_over_mean(aux[0]), 3.0) << "the router should start collapsed";
  EXPECT_GT(worst_max_over_mean(aux[4]), 3.0) << "the aux loss alone should not rebalance it in 50 steps";
  EXPECT_LT(worst_max_over_mean(bias[4]), 2.0) << "the bias should have rebalanced every layer";
  EXPECT_LT(worst_max_over_mean(bias[4]), 0.6 * worst_max_over_mean(aux[4]));
  // The bias run's records carry its bias, which pushed the collapsed experts down.
  EXPECT_LT(bias[4]["layers"][0]["bias_min"].get<double>(), 0.0);
  EXPECT_FALSE(aux[4]["layers"][0].contains("bias_min"));
  const Tensor& b = biased.model().router_bias();
  ASSERT_TRUE(b.defined());
  EXPECT_LT(b.data<float>()[0], b.data<float>()[5]);
  EXPECT_NE(log.str().find("expert health step 50 (last 10 steps, 4 MoE layers): worst max/mean"), std::string::npos);
}

// The router bias is state: a signal-triggered save and resume reproduces it (and the weights) bit for bit, and
// the HF export warns and writes it to its side file.
TEST_F(TrainerTest, RouterBiasResumesBitExactAndGoesToTheExportSideFile) {
  pack_captions(tmp / "data", 12, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "straight");
  c.train.steps = 6;
  c.train.grad_accum = 2;
  c.moe.balance = "aux+bias";
  c.moe.bias_update_rate = 0.01;
  c.moe.bias_centered = true;
  c.export_.hf = true;
  c.export_.dtype = "f32";
  Trainer straight(c, log);
  const TrainOutcome a = straight.run();
  ASSERT_EQ(a.steps.size(), 6u);
  const Tensor& bias = straight.model().router_bias();
  double sum = 0, spread = 0;
  for (int64_t e = 0; e < bias.size(1); ++e) {
    sum += bias.data<float>()[e];
    spread = std::max(spread, std::abs(double(bias.data<float>()[e])));
  }
  EXPECT_GT(spread, 0.0) << "the bias should have moved";
  EXPECT_NEAR(sum, 0.0, 1e-6) << "a centred update keeps each layer's bias at mean zero";
  EXPECT_NE(log.str().find("warning: the HF model has no router score bias"), std::string::npos) << log.str();
  const io::SafetensorsFile side(tmp / "straight/hf/router_bias.safetensors");
  Tensor layer2 = Tensor::zeros(test::test_arena(), {bias.size(1)}, DType::f32);
  side.read("model.language_model.layers.2.mlp.gate.score_bias", layer2);
  EXPECT_EQ(std::memcmp(layer2.raw(), bias.data<float>() + 2 * bias.size(1), layer2.nbytes()), 0);

  c.output_dir = tmp / "split";
  c.export_.hf = false;
  {
    Trainer::install_stop_signal_handlers();
    Trainer t(c, log);
    t.set_step_callback([](const StepRecord& r) {
      if (r.step == 3) std::raise(SIGUSR1);
    });
    ASSERT_TRUE(t.run().stopped_by_signal);
  }
  Trainer::clear_stop_request();
  Trainer resumed(c, log);
  const TrainOutcome second = resumed.run();
  EXPECT_EQ(second.start_step, 3);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(second.steps[i].loss, a.steps[i + 3].loss) << "step " << i + 4;
  const Tensor& resumed_bias = resumed.model().router_bias();
  ASSERT_EQ(resumed_bias.numel(), bias.numel());
  EXPECT_EQ(std::memcmp(resumed_bias.raw(), bias.raw(), bias.nbytes()), 0) << "router bias differs after resume";
  const std::vector<float> wa = weights_of(straight.model()), wb = weights_of(resumed.model());
  EXPECT_EQ(std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)), 0) << "parameters differ after resume";
}

// moe.aux_loss: per_layer reports and trains the mean of the layers' own losses (not the pooled one), and
// moe.balance: bias trains without the aux term in the loss.
TEST_F(TrainerTest, PerLayerAuxLossAndBiasOnlyLoss) {
  pack_captions(tmp / "data", 4, 256);
  TrainConfig c = base_config(tmp / "data/packed", tmp / "pooled");
  c.train.steps = 1;
  const double pooled = Trainer(c, log).run().steps[0].aux_loss;
  c.output_dir = tmp / "per_layer";
  c.moe.aux_loss = "per_layer";
  const StepRecord per_layer = Trainer(c, log).run().steps[0];
  EXPECT_NE(per_layer.aux_loss, pooled);
  const double coef = io::load_model_config("tiny-moe").text.router_aux_loss_coef;
  EXPECT_NEAR(per_layer.loss, per_layer.ce_loss + coef * per_layer.aux_loss, 1e-12);
  c.output_dir = tmp / "bias_only";
  c.moe.balance = "bias";
  const StepRecord bias_only = Trainer(c, log).run().steps[0];
  EXPECT_EQ(bias_only.loss, bias_only.ce_loss);
  EXPECT_GT(bias_only.aux_loss, 0.0) << "still reported";
}

}  // namespace
}  // namespace q3vl::app
