// The `q3vl train` config: defaults, a file setting every field, one error per kind of bad input (the message
// must name the key and where it came from), --set overrides, path resolution and the to_yaml round trip.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "app/train_config.h"
#include "core/check.h"
#include "tests/support/test_files.h"

namespace q3vl::app {
namespace {

namespace fs = std::filesystem;

// A base folder that does not exist: parse() only computes paths, it never touches them.
const std::string kBase = "/q3vl_test_base/jobs";
const std::string kMinimal = "model: {flavor: tiny-moe}\ndata: {dir: packed}\n";

TrainConfig parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return TrainConfig::parse(text, "train.yaml", overrides, kBase);
}

// The message of the q3vl::Error that parsing throws ("" when it does not throw).
std::string parse_error(const std::string& text, const std::vector<std::string>& overrides = {}) {
  try {
    parse(text, overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string cwd_path(const std::string& p) { return (fs::current_path() / p).lexically_normal().string(); }

// A config whose every field differs from its default.
const char* kFull = R"(# every field set
model:
  flavor: null
  config: ../models/config.json
  checkpoint: null
  init_seed: 7
  router_aux_loss_coef: 0.002
data:
  dir: /data/packed/
  seed: 11
  sequences_per_batch: 4
  prefetch: 0
train:
  steps: 500
  grad_accum: 8
  seed: 18446744073709551615
  max_tokens: 16384
  on_nonfinite: skip
optimizer:
  lr: 3e-4
  min_lr: 3.0e-5
  warmup_steps: 50
  decay: linear
  beta1: 0.8
  beta2: 0.999
  eps: 1.0e-6
  weight_decay: 0
  no_decay: [norm, bias, embedding, experts]
  grad_clip: 0.5
  lr_scale:
    vision_tower: 0.1
    mergers: 2
    language_model: 0
  freeze:
    - vision_tower
logging:
  every: 10
  expert_stats_every: 0
  peak_gflops: 1500.5
checkpoint:
  every: 100
  keep: 1
  resume: runs/old/step_100
export:
  hf: false
  dtype: f32
  shard_mb: 1
  tokenizer: "tok dir"
parallel:
  dp: 2
  fsdp: 4
  tp: 2
  ep: 8
output_dir: out/full
)";

TEST(TrainConfig, MinimalFileGetsTheDefaults) {
  const TrainConfig c = parse(kMinimal);
  TrainConfig expected;
  expected.model.flavor = "tiny-moe";
  expected.data.dir = kBase + "/packed";
  expected.output_dir = cwd_path("out/run");  // the default is not written in the file: current directory
  EXPECT_EQ(c, expected);
  EXPECT_EQ(c.train.steps, 100);
  EXPECT_EQ(c.optimizer.lr, 1e-4);
  EXPECT_EQ(c.optimizer.no_decay, (std::vector<std::string>{"norm", "bias", "embedding"}));
  EXPECT_EQ(c.optimizer.lr_scale.size(), 3u);
  EXPECT_TRUE(c.optimizer.freeze.empty());
  EXPECT_EQ(c.checkpoint.resume, "auto");
  EXPECT_EQ(c.export_.dtype, "bf16");
  EXPECT_FALSE(c.train.skip_nonfinite);
  EXPECT_FALSE(c.data.seed.has_value());
  EXPECT_FALSE(c.model.router_aux_loss_coef.has_value());
}

TEST(TrainConfig, EmptySectionsAndNullOptionalsChangeNothing) {
  const TrainConfig c = parse(
      "model:\n  flavor: tiny-moe\n  config:\n  checkpoint: ~\n  router_aux_loss_coef: null\n"
      "data:\n  dir: packed\n  seed:\noptimizer:\nlogging: {}\n");
  EXPECT_EQ(c, parse(kMinimal));
}

TEST(TrainConfig, FullFileSetsEveryField) {
  const TrainConfig c = parse(kFull);
  EXPECT_FALSE(c.model.flavor);
  EXPECT_EQ(c.model.config, "/q3vl_test_base/models/config.json");
  EXPECT_FALSE(c.model.checkpoint);
  EXPECT_EQ(c.model.init_seed, 7u);
  EXPECT_EQ(c.model.router_aux_loss_coef, 0.002);
  EXPECT_EQ(c.data.dir, "/data/packed");
  EXPECT_EQ(c.data.seed, 11u);
  EXPECT_EQ(c.data.sequences_per_batch, 4);
  EXPECT_EQ(c.data.prefetch, 0);
  EXPECT_EQ(c.train.steps, 500);
  EXPECT_EQ(c.train.grad_accum, 8);
  EXPECT_EQ(c.train.seed, 18446744073709551615u);
  EXPECT_EQ(c.train.max_tokens, 16384);
  EXPECT_TRUE(c.train.skip_nonfinite);
  EXPECT_EQ(c.optimizer.lr, 3e-4);
  EXPECT_EQ(c.optimizer.min_lr, 3e-5);
  EXPECT_EQ(c.optimizer.warmup_steps, 50);
  EXPECT_EQ(c.optimizer.decay, "linear");
  EXPECT_EQ(c.optimizer.beta1, 0.8);
  EXPECT_EQ(c.optimizer.beta2, 0.999);
  EXPECT_EQ(c.optimizer.eps, 1e-6);
  EXPECT_EQ(c.optimizer.weight_decay, 0.0);
  EXPECT_EQ(c.optimizer.no_decay, (std::vector<std::string>{"norm", "bias", "embedding", "experts"}));
  EXPECT_EQ(c.optimizer.grad_clip, 0.5);
  EXPECT_EQ(c.optimizer.lr_scale,
            (std::map<std::string, double>{{"vision_tower", 0.1}, {"mergers", 2.0}, {"language_model", 0.0}}));
  EXPECT_EQ(c.optimizer.freeze, std::vector<std::string>{"vision_tower"});
  EXPECT_EQ(c.logging.every, 10);
  EXPECT_EQ(c.logging.expert_stats_every, 0);
  EXPECT_EQ(c.logging.peak_gflops, 1500.5);
  EXPECT_EQ(c.checkpoint.every, 100);
  EXPECT_EQ(c.checkpoint.keep, 1);
  EXPECT_EQ(c.checkpoint.resume, kBase + "/runs/old/step_100");
  EXPECT_FALSE(c.export_.hf);
  EXPECT_EQ(c.export_.dtype, "f32");
  EXPECT_EQ(c.export_.shard_mb, 1);
  EXPECT_EQ(c.export_.tokenizer, kBase + "/tok dir");
  EXPECT_EQ(c.parallel, (ParallelSection{2, 4, 2, 8}));
  EXPECT_EQ(c.parallel.world(), 2 * 4 * 8 * 2);  // dp x fsdp x ep x tp
  EXPECT_EQ(c.output_dir, kBase + "/out/full");
}

struct BadInput {
  std::string name;
  std::string yaml;                    // the file
  std::vector<std::string> overrides;  // then these
  std::vector<std::string> expected;   // substrings of the message
};

std::ostream& operator<<(std::ostream& os, const BadInput& b) { return os << b.name; }

// A minimal valid file plus `extra` top-level sections (which must not repeat model or data).
std::string with(const std::string& extra) { return kMinimal + extra; }

class TrainConfigRejects : public testing::TestWithParam<BadInput> {};

TEST_P(TrainConfigRejects, NamingTheKeyAndTheSource) {
  const BadInput& b = GetParam();
  const std::string message = parse_error(b.yaml, b.overrides);
  ASSERT_FALSE(message.empty()) << "accepted: " << b.yaml;
  for (const std::string& part : b.expected) EXPECT_NE(message.find(part), std::string::npos) << message;
}

// Every error names where the value came from (train.yaml with line:column, or --set) and the dotted key.
INSTANTIATE_TEST_SUITE_P(
    AllKinds, TrainConfigRejects,
    testing::Values(
        // unknown keys, at each level, with the known ones listed
        BadInput{"unknown_nested", with("optimizer:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n"), {},
                 {"train.yaml:5:3: unknown key 'optimizer.betas' (known: lr, min_lr, warmup_steps, decay, beta1, "
                  "beta2, eps, weight_decay, no_decay, grad_clip, lr_scale, freeze)"}},
        BadInput{"unknown_top", with("trian: {steps: 3}\n"), {},
                 {"train.yaml:3:1: unknown key 'trian' (known: model, data, train, optimizer, moe, logging, checkpoint, "
                  "export, parallel, output_dir)"}},
        BadInput{"unknown_lr_scale_module", with("optimizer: {lr_scale: {text: 2}}\n"), {},
                 {"unknown key 'optimizer.lr_scale.text' (known: vision_tower, mergers, language_model)"}},
        BadInput{"unknown_in_set", kMinimal, {"optimizer.betas=[0.9, 0.95]"},
                 {"--set optimizer.betas=[0.9, 0.95]: unknown key 'optimizer.betas' (known: lr,"}},
        BadInput{"unknown_section_in_set", kMinimal, {"optim.lr=1"}, {"--set optim.lr=1: unknown key 'optim'"}},
        BadInput{"set_below_a_value", kMinimal, {"optimizer.lr.peak=1"},
                 {"--set optimizer.lr.peak=1: unknown key 'optimizer.lr.peak' ('optimizer.lr' is a value"}},
        BadInput{"set_without_value", kMinimal, {"train.steps"}, {"--set train.steps: expected key=value"}},
        BadInput{"set_malformed_key", kMinimal, {"train..steps=3"}, {"--set train..steps=3: malformed key"}},
        // YAML structure
        BadInput{"invalid_yaml", with("train: {steps: 3\n"), {}, {"train.yaml:", "invalid YAML"}},
        BadInput{"invalid_yaml_in_set", kMinimal, {"optimizer.freeze=[mergers"},
                 {"--set optimizer.freeze=[mergers: invalid YAML"}},
        BadInput{"two_documents", kMinimal + "---\ntrain: {steps: 3}\n", {},
                 {"train.yaml: expected one YAML document"}},
        BadInput{"top_level_list", "- model\n- data\n", {}, {"train.yaml:1:1: expected a map of sections"}},
        BadInput{"section_not_a_map", with("train: 100\n"), {}, {"train.yaml:3:1: train: expected a map", "got '100'"}},
        BadInput{"duplicate_key", with("train:\n  steps: 3\n  steps: 4\n"), {},
                 {"train.yaml:5:3: duplicate key 'train.steps'"}},
        // wrong types
        BadInput{"integer_word", with("train:\n  steps: ten\n"), {},
                 {"train.yaml:4:3: train.steps: expected an integer, got 'ten'"}},
        BadInput{"integer_float", with("train: {steps: 1.5}\n"), {}, {"train.steps: expected an integer, got '1.5'"}},
        BadInput{"integer_quoted", with("train: {steps: \"10\"}\n"), {},
                 {"train.steps: expected an integer, got the string \"10\""}},
        BadInput{"integer_null", with("train: {steps: null}\n"), {}, {"train.steps: expected an integer, got null"}},
        BadInput{"integer_list", with("train: {grad_accum: [1]}\n"), {},
                 {"train.grad_accum: expected an integer, got a list"}},
        BadInput{"integer_out_of_range", with("train: {grad_accum: 3000000000}\n"), {},
                 {"train.grad_accum: 3000000000 is out of range"}},
        BadInput{"seed_negative", with("train: {seed: -1}\n"), {},
                 {"train.seed: expected a non-negative integer, got '-1'"}},
        BadInput{"number_word", with("optimizer: {lr: fast}\n"), {}, {"optimizer.lr: expected a number, got 'fast'"}},
        BadInput{"number_nan", with("optimizer: {lr: .nan}\n"), {}, {"optimizer.lr: expected a finite number"}},
        BadInput{"number_overflow", with("optimizer: {lr: 1e999}\n"), {}, {"optimizer.lr: expected a finite number"}},
        BadInput{"bool_word", with("export: {hf: maybe}\n"), {}, {"export.hf: expected true or false, got 'maybe'"}},
        BadInput{"string_map", "model: {flavor: {name: x}}\ndata: {dir: d}\n", {},
                 {"train.yaml:1:9: model.flavor: expected a string, got a map"}},
        BadInput{"string_null", with("optimizer: {decay: null}\n"), {},
                 {"optimizer.decay: expected a string, got null"}},
        BadInput{"list_scalar", with("optimizer: {freeze: mergers}\n"), {},
                 {"optimizer.freeze: expected a list", "got 'mergers'"}},
        BadInput{"list_of_lists", with("optimizer: {freeze: [[mergers]]}\n"), {},
                 {"optimizer.freeze: expected a list of names"}},
        BadInput{"type_from_set", kMinimal, {"train.steps=ten"},
                 {"--set train.steps=ten: train.steps: expected an integer, got 'ten'"}},
        // impossible values
        BadInput{"steps_zero", with("train:\n  steps: 0\n"), {}, {"train.yaml:4:3: train.steps: must be >= 1, got 0"}},
        BadInput{"grad_accum_zero", with("train: {grad_accum: 0}\n"), {}, {"train.grad_accum: must be >= 1"}},
        BadInput{"sequences_per_batch_zero", "model: {flavor: f}\ndata: {dir: d, sequences_per_batch: 0}\n", {},
                 {"data.sequences_per_batch: must be >= 1"}},
        BadInput{"prefetch_negative", "model: {flavor: f}\ndata: {dir: d, prefetch: -1}\n", {},
                 {"data.prefetch: must be >= 0"}},
        BadInput{"max_tokens_negative", with("train: {max_tokens: -1}\n"), {}, {"train.max_tokens: must be >= 0"}},
        BadInput{"on_nonfinite", with("train: {on_nonfinite: ignore}\n"), {},
                 {"train.on_nonfinite: expected stop or skip, got 'ignore'"}},
        BadInput{"lr_zero", with("optimizer: {lr: 0}\n"), {}, {"optimizer.lr: must be > 0, got 0"}},
        BadInput{"lr_negative", with("optimizer: {lr: -1e-4}\n"), {}, {"optimizer.lr: must be > 0"}},
        BadInput{"min_lr_negative", with("optimizer: {min_lr: -1.0e-6}\n"), {}, {"optimizer.min_lr: must be >= 0"}},
        BadInput{"min_lr_above_lr", with("optimizer: {lr: 1e-4, min_lr: 1e-3}\n"), {},
                 {"optimizer.min_lr: must be <= optimizer.lr (0.0001), got 0.001"}},
        BadInput{"warmup_negative", with("optimizer: {warmup_steps: -1}\n"), {},
                 {"optimizer.warmup_steps: must be >= 0"}},
        BadInput{"warmup_above_steps", with("train: {steps: 10}\noptimizer: {warmup_steps: 11}\n"), {},
                 {"train.yaml:4:13: optimizer.warmup_steps: must be <= train.steps (10), got 11"}},
        BadInput{"decay", with("optimizer: {decay: exponential}\n"), {},
                 {"optimizer.decay: expected one of cosine, linear, constant, got 'exponential'"}},
        BadInput{"beta1_one", with("optimizer: {beta1: 1}\n"), {}, {"optimizer.beta1: must be in [0, 1), got 1"}},
        BadInput{"beta2_negative", with("optimizer: {beta2: -0.5}\n"), {}, {"optimizer.beta2: must be in [0, 1)"}},
        BadInput{"eps_zero", with("optimizer: {eps: 0.0}\n"), {}, {"optimizer.eps: must be > 0"}},
        BadInput{"weight_decay_negative", with("optimizer: {weight_decay: -0.1}\n"), {},
                 {"optimizer.weight_decay: must be >= 0"}},
        BadInput{"no_decay_kind", with("optimizer: {no_decay: [norm, layernorm]}\n"), {},
                 {"optimizer.no_decay: expected one of norm, bias, embedding, matrix, experts, got 'layernorm'"}},
        BadInput{"no_decay_twice", with("optimizer: {no_decay: [bias, bias]}\n"), {},
                 {"optimizer.no_decay: 'bias' is listed twice"}},
        BadInput{"grad_clip_negative", with("optimizer: {grad_clip: -1}\n"), {}, {"optimizer.grad_clip: must be >= 0"}},
        BadInput{"lr_scale_negative", with("optimizer: {lr_scale: {mergers: -0.5}}\n"), {},
                 {"optimizer.lr_scale.mergers: must be >= 0, got -0.5"}},
        BadInput{"freeze_module", with("optimizer: {freeze: [vision]}\n"), {},
                 {"optimizer.freeze: expected one of vision_tower, mergers, language_model, got 'vision'"}},
        BadInput{"freeze_all", with("optimizer:\n  freeze: [mergers, language_model, vision_tower]\n"), {},
                 {"train.yaml:4:3: optimizer.freeze: freezes every module"}},
        BadInput{"logging_every_zero", with("logging: {every: 0}\n"), {}, {"logging.every: must be >= 1"}},
        BadInput{"expert_stats_negative", with("logging: {expert_stats_every: -1}\n"), {},
                 {"logging.expert_stats_every: must be >= 0"}},
        BadInput{"moe_balance_unknown", with("moe: {balance: loss_free}\n"), {},
                 {"moe.balance: expected one of aux, bias, aux+bias, got 'loss_free'"}},
        BadInput{"moe_bias_rate_zero", with("moe: {balance: bias, bias_update_rate: 0}\n"), {},
                 {"moe.bias_update_rate: must be > 0"}},
        BadInput{"moe_aux_loss_unknown", with("moe: {aux_loss: layerwise}\n"), {},
                 {"moe.aux_loss: expected one of pooled, per_layer, got 'layerwise'"}},
        BadInput{"peak_gflops_negative", with("logging: {peak_gflops: -1}\n"), {},
                 {"logging.peak_gflops: must be >= 0"}},
        BadInput{"checkpoint_every_negative", with("checkpoint: {every: -5}\n"), {},
                 {"checkpoint.every: must be >= 0"}},
        BadInput{"keep_zero", with("checkpoint: {keep: 0}\n"), {}, {"checkpoint.keep: must be >= 1, got 0"}},
        BadInput{"resume_empty", with("checkpoint: {resume: ''}\n"), {},
                 {"checkpoint.resume: expected auto, none or a checkpoint folder"}},
        BadInput{"resume_null", with("checkpoint: {resume: null}\n"), {},
                 {"checkpoint.resume: expected a string, got null"}},
        BadInput{"export_dtype", with("export: {dtype: fp16}\n"), {},
                 {"export.dtype: expected one of f32, bf16, f16, got 'fp16'"}},
        BadInput{"shard_mb_zero", with("export: {shard_mb: 0}\n"), {}, {"export.shard_mb: must be >= 1"}},
        BadInput{"tokenizer_empty", with("export: {tokenizer: \"\"}\n"), {}, {"export.tokenizer: must not be empty"}},
        BadInput{"router_aux_negative", "model: {flavor: f, router_aux_loss_coef: -0.001}\ndata: {dir: d}\n", {},
                 {"model.router_aux_loss_coef: must be >= 0"}},
        BadInput{"model_none", "model: {init_seed: 3}\ndata: {dir: d}\n", {},
                 {"train.yaml: model: exactly one of model.flavor, model.config, model.checkpoint must be set, "
                  "none is"}},
        BadInput{"model_missing", "data: {dir: d}\n", {}, {"train.yaml: model: exactly one of"}},
        BadInput{"empty_file", "", {}, {"train.yaml: model: exactly one of"}},
        BadInput{"model_two", "model:\n  flavor: tiny-moe\n  checkpoint: hf/\ndata: {dir: d}\n", {},
                 {"train.yaml:3:3: model.checkpoint: exactly one of", "got model.flavor and model.checkpoint"}},
        BadInput{"model_two_in_one_set", kMinimal, {"model={config: c.json, checkpoint: hf}"},
                 {"--set model={config: c.json, checkpoint: hf}: model.checkpoint: exactly one of",
                  "got model.config and model.checkpoint"}},
        BadInput{"flavor_empty", "model: {flavor: ''}\ndata: {dir: d}\n", {}, {"model.flavor: must not be empty"}},
        BadInput{"data_dir_missing", "model: {flavor: tiny-moe}\n", {},
                 {"train.yaml: data.dir: required (the `q3vl pack` output folder)"}},
        BadInput{"data_dir_empty", "model: {flavor: tiny-moe}\ndata: {dir: ''}\n", {}, {"data.dir: required"}},
        BadInput{"parallel_zero", with("parallel: {dp: 0}\n"), {}, {"parallel.dp", ">= 1"}},
        BadInput{"parallel_ep_zero", with("parallel: {fsdp: 2, ep: 0}\n"), {}, {"parallel.ep", ">= 1"}},
        BadInput{"parallel_world_overflow", with("parallel: {dp: 65536, fsdp: 65536}\n"), {},
                 {"train.yaml", "parallel: dp x fsdp x ep x tp = 65536 x 65536 x 1 x 1 ranks overflows an int"}},
        BadInput{"output_dir_empty", with("output_dir: ''\n"), {}, {"train.yaml:3:1: output_dir: must not be empty"}},
        BadInput{"value_from_set", kMinimal, {"optimizer.freeze=[vision_tower, mergers, language_model]"},
                 {"--set optimizer.freeze=[vision_tower, mergers, language_model]: optimizer.freeze: freezes every"}}),
    [](const testing::TestParamInfo<BadInput>& info) { return info.param.name; });

TEST(TrainConfig, OverridesApplyInOrderAfterTheFile) {
  const TrainConfig c = parse(with("train: {steps: 0}\noptimizer: {lr_scale: {vision_tower: 0.5}}\n"),
                              {"train.steps=20", "train.steps=30", "optimizer.freeze=[vision_tower]",
                               "optimizer.lr_scale={mergers: 0.25}", "optimizer.lr_scale.language_model=2",
                               "train.on_nonfinite=skip", "export.hf=false", "model.router_aux_loss_coef=0.01",
                               "model.router_aux_loss_coef=null", "data.seed=5", "optimizer.no_decay=[]",
                               "optimizer={lr: 2e-3, decay: constant}"});
  EXPECT_EQ(c.train.steps, 30);  // the file's invalid 0 is replaced before the checks
  EXPECT_EQ(c.optimizer.freeze, std::vector<std::string>{"vision_tower"});
  // A map sets only the keys it names.
  EXPECT_EQ(c.optimizer.lr_scale,
            (std::map<std::string, double>{{"vision_tower", 0.5}, {"mergers", 0.25}, {"language_model", 2.0}}));
  EXPECT_TRUE(c.train.skip_nonfinite);
  EXPECT_FALSE(c.export_.hf);
  EXPECT_FALSE(c.model.router_aux_loss_coef);
  EXPECT_EQ(c.data.seed, 5u);
  EXPECT_TRUE(c.optimizer.no_decay.empty());
  EXPECT_EQ(c.optimizer.lr, 2e-3);
  EXPECT_EQ(c.optimizer.decay, "constant");
  EXPECT_EQ(c.optimizer.beta2, 0.95);
}

TEST(TrainConfig, SetOfOneModelSourceReplacesTheFilesChoice) {
  const TrainConfig c = parse(kMinimal, {"model.checkpoint=hf_model"});
  EXPECT_FALSE(c.model.flavor);
  EXPECT_EQ(c.model.checkpoint, cwd_path("hf_model"));
  const TrainConfig d = parse(kMinimal, {"model.checkpoint=hf_model", "model.flavor=tiny-dense"});
  EXPECT_EQ(d.model.flavor, "tiny-dense");
  EXPECT_FALSE(d.model.checkpoint);
}

TEST(TrainConfig, PathsAreRelativeToTheFileOrToTheCurrentDirectory) {
  const std::string text =
      "model: {config: cfg/../configs/c.json}\ndata: {dir: ../packed}\ncheckpoint: {resume: none}\n"
      "export: {tokenizer: /abs/tok}\noutput_dir: out/\n";
  const TrainConfig c = parse(text);
  EXPECT_EQ(c.model.config, kBase + "/configs/c.json");
  EXPECT_EQ(c.data.dir, "/q3vl_test_base/packed");
  EXPECT_EQ(c.checkpoint.resume, "none");
  EXPECT_EQ(c.export_.tokenizer, "/abs/tok");
  EXPECT_EQ(c.output_dir, kBase + "/out");

  const TrainConfig s = parse(text, {"data.dir=packed2", "output_dir=/runs/a", "checkpoint.resume=ckpt/step_9",
                                     "checkpoint.resume=auto", "export.tokenizer=tok"});
  EXPECT_EQ(s.data.dir, cwd_path("packed2"));
  EXPECT_EQ(s.output_dir, "/runs/a");
  EXPECT_EQ(s.checkpoint.resume, "auto");
  EXPECT_EQ(s.export_.tokenizer, cwd_path("tok"));
  EXPECT_EQ(parse(text, {"checkpoint.resume=ckpt/step_9"}).checkpoint.resume, cwd_path("ckpt/step_9"));
  EXPECT_EQ(parse(text, {"checkpoint.resume=./auto"}).checkpoint.resume, cwd_path("auto"));

  // parse() with a relative base folder: relative to the current directory.
  EXPECT_EQ(TrainConfig::parse(kMinimal, "t.yaml", {}, "jobs/x").data.dir, cwd_path("jobs/x/packed"));
}

TEST(TrainConfig, LoadResolvesAgainstTheFilesFolder) {
  test::TempDir dir;
  fs::create_directories(dir.path() / "configs");
  const std::string file = dir / "configs/train.yaml";
  test::write_all(file, "model: {flavor: tiny-moe}\ndata: {dir: ../packed}\ntrain: {steps: 3}\n");
  const TrainConfig c = TrainConfig::load(file, {"train.grad_accum=2"});
  EXPECT_EQ(c.data.dir, (dir.path() / "packed").lexically_normal().string());
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.train.grad_accum, 2);
  // The same file named by a path relative to the current directory.
  const TrainConfig r = TrainConfig::load(fs::relative(file).string());
  EXPECT_EQ(r.data.dir, c.data.dir);

  test::write_all(file, "model: {flavor: tiny-moe}\ndata: {dir: d}\ntrain: {steps: many}\n");
  try {
    TrainConfig::load(file);
    FAIL() << "accepted steps: many";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(file + ":3:9: train.steps: expected an integer"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(TrainConfig::load(dir / "missing.yaml"), Error);
}

TEST(TrainConfig, ToYamlRoundTrips) {
  for (const std::string& text : {kMinimal, std::string(kFull)}) {
    const TrainConfig c = parse(text);
    const std::string yaml = c.to_yaml();
    // Read back from anywhere: every path in it is absolute.
    EXPECT_EQ(TrainConfig::parse(yaml, "effective.yaml", {}, "/elsewhere"), c) << yaml;
  }
}

TEST(TrainConfig, ToYamlWritesEveryFieldReadably) {
  const std::string yaml = parse(kMinimal).to_yaml();
  for (const char* line :
       {"\nmodel:\n  flavor: tiny-moe ", "\n  config: null ", "\n  checkpoint: null ", "\n  init_seed: 0 ",
        "\n  router_aux_loss_coef: null ", "\ndata:\n  dir: \"/q3vl_test_base/jobs/packed\" ", "\n  seed: null ",
        "\n  sequences_per_batch: 1 ", "\n  prefetch: 2 ", "\ntrain:\n  steps: 100 ", "\n  grad_accum: 1 ",
        "\n  seed: 0 ", "\n  max_tokens: 0 ", "\n  on_nonfinite: stop ", "\noptimizer:\n  lr: 0.0001 ",
        "\n  min_lr: 0 ", "\n  warmup_steps: 0 ", "\n  decay: cosine ", "\n  beta1: 0.9 ", "\n  beta2: 0.95 ",
        "\n  eps: 1e-08 ", "\n  weight_decay: 0.1 ", "\n  no_decay: [norm, bias, embedding] ", "\n  grad_clip: 1 ",
        "\n  lr_scale:\n    vision_tower: 1 ", "\n    mergers: 1 ", "\n    language_model: 1 ", "\n  freeze: [] ",
        "\nmoe:\n  balance: aux ", "\n  bias_update_rate: 0.001 ", "\n  bias_centered: false ",
        "\n  aux_loss: pooled ", "\nlogging:\n  every: 1 ", "\n  expert_stats_every: 10 ",
        "\n  expert_health_every: 10 ", "\n  peak_gflops: 0 ",
        "\ncheckpoint:\n  every: 0 ", "\n  keep: 3 ", "\n  resume: auto ", "\nexport:\n  hf: true ",
        "\n  dtype: bf16 ", "\n  shard_mb: 4096 ", "\n  tokenizer: null ", "\noutput_dir: \""}) {
    EXPECT_NE(yaml.find(line), std::string::npos) << "missing '" << line << "' in\n" << yaml;
  }
  EXPECT_NE(yaml.find("# cosine | linear | constant"), std::string::npos) << yaml;
}

TEST(TrainConfig, ToYamlQuotesStringsYamlWouldMisread) {
  TrainConfig c = parse(kMinimal);
  for (const char* flavor : {"null", "true", "No", "123", "1e5", "~", "-x", "a: b", "#c", "[x]", "{y}",
                                    "quote\"back\\slash", "tab\there\nnewline", "grüße", " padded ", "*alias"}) {
    c.model.flavor = flavor;
    c.optimizer.lr = 1.0 / 3.0;
    c.optimizer.eps = 4.9e-324;  // the smallest subnormal still reads back exactly
    c.logging.peak_gflops = 1.7976931348623157e308;
    const TrainConfig back = TrainConfig::parse(c.to_yaml(), "effective.yaml");
    EXPECT_EQ(back, c) << c.to_yaml();
  }
}

TEST(TrainConfig, ValidateChecksAConfigBuiltInCode) {
  TrainConfig c;
  c.model.flavor = "tiny-moe";
  c.data.dir = "/data/packed";
  EXPECT_NO_THROW(c.validate());
  c.optimizer.lr_scale["text"] = 1.0;
  try {
    c.validate("my run");
    FAIL() << "accepted lr_scale.text";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("my run: optimizer.lr_scale: expected one of vision_tower, mergers, "
                                         "language_model, got 'text'"),
              std::string::npos)
        << e.what();
  }
  c.optimizer.lr_scale.erase("text");
  c.optimizer.lr_scale.erase("mergers");
  EXPECT_THROW(c.validate(), Error);
  c.optimizer.lr_scale["mergers"] = 1.0;
  c.optimizer.weight_decay = std::nan("");
  EXPECT_THROW(c.validate(), Error);
}

}  // namespace
}  // namespace q3vl::app
