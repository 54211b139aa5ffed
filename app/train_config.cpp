// TrainConfig: the `q3vl train` YAML schema as one table of fields that drives reading (file and --set),
// the unknown-key lists, the value checks and to_yaml, so that none of them can drift from the others.
// Why one file of about 600 lines: the reader, the checks and the writer all walk the private field table
// (fields_of); split, that table and its types would become a header shared by every part.
#include "app/train_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <variant>

#include "core/check.h"
#include "core/checked_math.h"
#include "io/tokenizer_path.h"

namespace q3vl::app {
namespace {

namespace fs = std::filesystem;

// on_nonfinite: stop | skip, stored as TrainSection::skip_nonfinite.
struct NonfiniteAction {
  bool* skip;
};

using Target = std::variant<int*, int64_t*, uint64_t*, std::optional<uint64_t>*, double*, std::optional<double>*, bool*,
                            std::string*, std::optional<std::string>*, std::vector<std::string>*, NonfiniteAction>;

// How a text field is read: as written, as a path, or as a path unless it is a resume keyword.
enum class Resolve { text, path, path_or_keyword };

struct Field {
  std::string key;  // dotted path
  Target target;
  const char* help;
  Resolve resolve = Resolve::text;
};

const std::vector<std::string> kModules = {"vision_tower", "mergers", "language_model"};
const std::vector<std::string> kParamKinds = {"norm", "bias", "embedding", "matrix", "experts"};
const std::vector<std::string> kModelSources = {"model.flavor", "model.config", "model.checkpoint"};

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};

std::vector<Field> fields_of(TrainConfig& c) {
  ModelSection& m = c.model;
  OptimizerSection& o = c.optimizer;
  return {
      {"model.flavor", &m.flavor, "a jobs/flavors name; exactly one of flavor, config, checkpoint"},
      {"model.config", &m.config, "an HF config.json (weights from init_seed)", Resolve::path},
      {"model.checkpoint", &m.checkpoint, "an HF model folder to start from (weights loaded)", Resolve::path},
      {"model.init_seed", &m.init_seed, "weights when not loaded from a checkpoint"},
      {"model.router_aux_loss_coef", &m.router_aux_loss_coef, "null: the model config's coefficient"},
      {"data.dir", &c.data.dir, "the `q3vl pack` output folder (manifest.json + shards)", Resolve::path},
      {"data.seed", &c.data.seed, "shuffle seed; null: train.seed"},
      {"data.sequences_per_batch", &c.data.sequences_per_batch, "packed sequences per micro-batch"},
      {"data.prefetch", &c.data.prefetch, "micro-batches loaded ahead"},
      {"train.steps", &c.train.steps, "optimizer steps"},
      {"train.grad_accum", &c.train.grad_accum, "micro-batches per optimizer step"},
      {"train.seed", &c.train.seed, "run seed"},
      {"train.max_tokens", &c.train.max_tokens, "micro-batch tokens; 0: sequences_per_batch x the pack's budget"},
      {"train.on_nonfinite", NonfiniteAction{&c.train.skip_nonfinite}, "stop | skip (skip the step, count it)"},
      {"optimizer.lr", &o.lr, "peak learning rate"},
      {"optimizer.min_lr", &o.min_lr, "learning rate at the end of the decay"},
      {"optimizer.warmup_steps", &o.warmup_steps, "linear warmup from 0"},
      {"optimizer.decay", &o.decay, "cosine | linear | constant"},
      {"optimizer.beta1", &o.beta1, "AdamW first-moment decay"},
      {"optimizer.beta2", &o.beta2, "AdamW second-moment decay"},
      {"optimizer.eps", &o.eps, "AdamW denominator epsilon"},
      {"optimizer.weight_decay", &o.weight_decay, "decoupled weight decay"},
      {"optimizer.no_decay", &o.no_decay, "parameter kinds without decay: norm, bias, embedding, matrix, experts"},
      {"optimizer.grad_clip", &o.grad_clip, "global gradient-norm limit; 0: off"},
      {"optimizer.lr_scale.vision_tower", &o.lr_scale["vision_tower"], "learning-rate multiplier"},
      {"optimizer.lr_scale.mergers", &o.lr_scale["mergers"], "learning-rate multiplier"},
      {"optimizer.lr_scale.language_model", &o.lr_scale["language_model"], "learning-rate multiplier"},
      {"optimizer.freeze", &o.freeze, "modules not trained: vision_tower, mergers, language_model"},
      {"moe.balance", &c.moe.balance, "aux (HF's aux loss) | bias (aux-loss-free router bias) | aux+bias"},
      {"moe.bias_update_rate", &c.moe.bias_update_rate, "router bias += rate x sign(mean load - load) per step"},
      {"moe.bias_centered", &c.moe.bias_centered, "subtract the bias update's mean over the experts"},
      {"moe.aux_loss", &c.moe.aux_loss, "pooled (HF's, over all layers) | per_layer (mean of the layers' own)"},
      {"logging.every", &c.logging.every, "progress line + metrics.jsonl record every N steps"},
      {"logging.expert_stats_every", &c.logging.expert_stats_every, "per-layer expert load every N steps; 0: off"},
      {"logging.expert_health_every", &c.logging.expert_health_every,
       "per-layer load CV, max/mean, dead experts, router entropy every N steps; 0: off"},
      {"logging.peak_gflops", &c.logging.peak_gflops, "per-rank fp32 peak for the MFU; 0: this CPU's estimate"},
      {"checkpoint.every", &c.checkpoint.every, "steps between checkpoints; 0: only at the end"},
      {"checkpoint.keep", &c.checkpoint.keep, "complete checkpoints kept"},
      {"checkpoint.resume", &c.checkpoint.resume, "auto (newest complete) | none | a checkpoint folder",
       Resolve::path_or_keyword},
      {"export.hf", &c.export_.hf, "HF model folder at the end (output_dir/hf)"},
      {"export.dtype", &c.export_.dtype, "f32 | bf16 | f16"},
      {"export.shard_mb", &c.export_.shard_mb, "safetensors shard size in MiB"},
      {"export.tokenizer", &c.export_.tokenizer, "tokenizer.json or its folder: its tokenizer files go into the export",
       Resolve::path},
      {"parallel.dp", &c.parallel.dp, "data-parallel replicas (each holds the same shards)"},
      {"parallel.fsdp", &c.parallel.fsdp, "FSDP shard degree (with ep: parameters sharded over fsdp x ep ranks, experts over fsdp)"},
      {"parallel.tp", &c.parallel.tp, "tensor-parallel degree"},
      {"parallel.ep", &c.parallel.ep, "expert-parallel degree (experts split over ep ranks; world = dp x fsdp x ep x tp)"},
      {"parallel.step_timeout_s", &c.parallel.step_timeout_s, "no progress this long ends the job; 0: off"},
      {"output_dir", &c.output_dir, "checkpoints, metrics and the export", Resolve::path},
  };
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string child_key(const std::string& section, const std::string& name) {
  return section.empty() ? name : section + "." + name;
}

// Shortest text that reads back to the same double (fixed notation for 1e-4 .. 1e16, "0.0001" not "1e-04").
std::string format_number(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::general);
  return std::string(buf, r.ptr);
}

std::string describe(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Scalar: return n.Tag() == "?" ? "'" + n.Scalar() + "'" : "the string \"" + n.Scalar() + "\"";
    case YAML::NodeType::Undefined: break;
  }
  return "nothing";
}

// Where a value came from: the file with line and column, or the --set argument.
struct Source {
  std::string name;  // the file name, or "--set key=value"
  fs::path base;     // absolute folder relative paths are resolved against
  bool from_set = false;

  std::string at(const YAML::Mark& mark) const {
    if (from_set || mark.is_null()) return name;
    return name + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
  }
};

// The scalar text of a plain (unquoted) scalar: numbers and booleans are YAML-typed, so "10" is not 10.
std::optional<std::string> plain_scalar(const YAML::Node& n) {
  if (n.IsScalar() && n.Tag() == "?") return n.Scalar();
  return std::nullopt;
}

// Reads one YAML node into one field, naming the key and the place on a type error.
class ValueReader {
 public:
  ValueReader(const YAML::Node& node, const std::string& key, const std::string& at)
      : node_(node), key_(key), at_(at) {}

  [[noreturn]] void wrong_type(const std::string& expected) const {
    Q3VL_FAIL(at_, ": ", key_, ": expected ", expected, ", got ", describe(node_));
  }

  template <class Int>
  Int integer(const char* expected) const {
    static const std::regex kInteger("[-+]?[0-9]+");  // YAML 1.2 core schema, decimal
    const auto text = plain_scalar(node_);
    if (!text || !std::regex_match(*text, kInteger)) wrong_type(expected);
    const char* begin = text->data() + ((*text)[0] == '+' ? 1 : 0);
    const char* end = text->data() + text->size();
    Int v{};
    const auto r = std::from_chars(begin, end, v);
    Q3VL_CHECK(r.ec != std::errc::result_out_of_range, at_, ": ", key_, ": ", *text, " is out of range (",
               std::numeric_limits<Int>::min(), " to ", std::numeric_limits<Int>::max(), ")");
    if (r.ec != std::errc() || r.ptr != end) wrong_type(expected);  // a sign on an unsigned field
    return v;
  }

  double number() const {
    // YAML 1.2 core schema floats and integers; .inf and .nan are named apart since no field can take them.
    static const std::regex kNumber(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
    static const std::regex kNonFinite(R"([-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))");
    const auto text = plain_scalar(node_);
    if (text && std::regex_match(*text, kNonFinite)) wrong_type("a finite number");
    if (!text || !std::regex_match(*text, kNumber)) wrong_type("a number");
    const char* begin = text->data() + ((*text)[0] == '+' ? 1 : 0);
    const char* end = text->data() + text->size();
    double v = 0;
    const auto r = std::from_chars(begin, end, v);
    if (r.ec != std::errc() || r.ptr != end) wrong_type("a finite number");  // beyond the double range
    return v;
  }

  bool boolean() const {
    const auto text = plain_scalar(node_);
    static const std::set<std::string> kTrue = {"true", "True", "TRUE"}, kFalse = {"false", "False", "FALSE"};
    if (text && kTrue.count(*text)) return true;
    if (text && kFalse.count(*text)) return false;
    wrong_type("true or false");
  }

  std::string text() const {
    if (!node_.IsScalar()) wrong_type("a string");
    return node_.Scalar();
  }

  std::vector<std::string> words() const {
    if (!node_.IsSequence()) wrong_type("a list (e.g. [a, b] or [])");
    std::vector<std::string> out;
    for (const YAML::Node& item : node_) {
      if (!item.IsScalar()) {
        Q3VL_FAIL(at_, ": ", key_, ": expected a list of names, got an item that is ", describe(item));
      }
      out.push_back(item.Scalar());
    }
    return out;
  }

 private:
  const YAML::Node& node_;
  const std::string& key_;
  const std::string& at_;
};

std::string resolve_path(const std::string& p, const fs::path& base) {
  if (p.empty()) return p;
  fs::path r = (base / p).lexically_normal();
  if (!r.has_filename() && r.has_relative_path()) r = r.parent_path();  // "dir/" -> "dir"
  return r.string();
}

// Applies YAML documents and --set overrides to a config, recording where each field was last set.
class ConfigReader {
 public:
  explicit ConfigReader(TrainConfig& config) : fields_(fields_of(config)) {}

  void apply_document(const YAML::Node& root, const Source& src) {
    if (!root.IsNull()) {
      Q3VL_CHECK(root.IsMap(), src.at(root.Mark()), ": expected a map of sections (model, data, ...), got ",
                 describe(root));
    }
    apply(root, "", src.name, src);
  }

  void apply_override(const std::string& text) {
    const size_t eq = text.find('=');
    Q3VL_CHECK(eq != std::string::npos && eq > 0, "--set ", text, ": expected key=value (e.g. train.steps=10)");
    const std::string key = text.substr(0, eq);
    const Source src{"--set " + text, fs::current_path(), true};
    std::string section;
    size_t start = 0;
    while (true) {
      const size_t dot = key.find('.', start);
      const std::string name = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      Q3VL_CHECK(!name.empty(), src.name, ": malformed key '", key, "' (dotted names, e.g. optimizer.lr)");
      const std::string child = child_key(section, name);
      check_known(child, section, src.name);
      if (dot == std::string::npos) break;
      Q3VL_CHECK(find(child) == nullptr, src.name, ": unknown key '", key, "' ('", child,
                 "' is a value, not a section)");
      section = child;
      start = dot + 1;
    }
    YAML::Node value;
    try {
      value = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      Q3VL_FAIL(src.name, ": invalid YAML value: ", e.msg);
    }
    apply(value, key, src.name, src);
  }

  // Where `key` was last set, or "" when it holds its default.
  std::string origin(const std::string& key) const {
    const auto it = origins_.find(key);
    return it == origins_.end() ? "" : it->second;
  }

 private:
  const Field* find(const std::string& key) const {
    for (const Field& f : fields_)
      if (f.key == key) return &f;
    return nullptr;
  }

  bool is_section(const std::string& key) const {
    if (key.empty()) return true;
    for (const Field& f : fields_)
      if (f.key.size() > key.size() && f.key.compare(0, key.size(), key) == 0 && f.key[key.size()] == '.') return true;
    return false;
  }

  std::vector<std::string> children(const std::string& section) const {
    const std::string prefix = section.empty() ? "" : section + ".";
    std::vector<std::string> out;
    for (const Field& f : fields_) {
      if (f.key.compare(0, prefix.size(), prefix) != 0) continue;
      const std::string rest = f.key.substr(prefix.size());
      const std::string name = rest.substr(0, rest.find('.'));
      if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    }
    return out;
  }

  void check_known(const std::string& key, const std::string& section, const std::string& at) const {
    if (find(key) == nullptr && !is_section(key)) {
      Q3VL_FAIL(at, ": unknown key '", key, "' (known: ", join(children(section), ", "), ")");
    }
  }

  void apply(const YAML::Node& node, const std::string& key, const std::string& at, const Source& src) {
    if (const Field* f = find(key)) {
      set(*f, node, at, src);
      return;
    }
    if (node.IsNull()) return;  // an empty section
    if (!node.IsMap()) Q3VL_FAIL(at, ": ", key, ": expected a map (a section), got ", describe(node));
    std::set<std::string> seen;
    for (const auto& entry : node) {
      const std::string key_at = src.at(entry.first.Mark());
      if (!entry.first.IsScalar()) {
        Q3VL_FAIL(key_at, ": ", key.empty() ? "top level" : key, ": keys must be names, got ", describe(entry.first));
      }
      const std::string child = child_key(key, entry.first.Scalar());
      Q3VL_CHECK(seen.insert(child).second, key_at, ": duplicate key '", child, "'");
      check_known(child, key, key_at);
      apply(entry.second, child, key_at, src);
    }
  }

  void set(const Field& f, const YAML::Node& node, const std::string& at, const Source& src) {
    const ValueReader read(node, f.key, at);
    const auto read_path = [&] {
      const std::string s = read.text();
      if (f.resolve == Resolve::path_or_keyword && (s == "auto" || s == "none")) return s;
      return f.resolve == Resolve::text ? s : resolve_path(s, src.base);
    };
    std::visit(
        Overloaded{
            [&](int* t) { *t = read.integer<int>("an integer"); },
            [&](int64_t* t) { *t = read.integer<int64_t>("an integer"); },
            [&](uint64_t* t) { *t = read.integer<uint64_t>("a non-negative integer"); },
            [&](std::optional<uint64_t>* t) {
              *t = node.IsNull() ? std::nullopt : std::optional(read.integer<uint64_t>("a non-negative integer"));
            },
            [&](double* t) { *t = read.number(); },
            [&](std::optional<double>* t) { *t = node.IsNull() ? std::nullopt : std::optional(read.number()); },
            [&](bool* t) { *t = read.boolean(); },
            [&](std::string* t) { *t = read_path(); },
            [&](std::optional<std::string>* t) { *t = node.IsNull() ? std::nullopt : std::optional(read_path()); },
            [&](std::vector<std::string>* t) { *t = read.words(); },
            [&](NonfiniteAction t) {
              const std::string s = read.text();
              Q3VL_CHECK(s == "stop" || s == "skip", at, ": ", f.key, ": expected stop or skip, got '", s, "'");
              *t.skip = s == "skip";
            },
        },
        f.target);
    origins_[f.key] = at;
    // Naming one model source on the command line replaces the file's choice (but two in one --set clash).
    const bool model_source = std::find(kModelSources.begin(), kModelSources.end(), f.key) != kModelSources.end();
    if (model_source && src.from_set && !node.IsNull()) {
      for (const std::string& other : kModelSources) {
        if (other == f.key || origin(other) == at) continue;
        std::get<std::optional<std::string>*>(find(other)->target)->reset();
        origins_[other] = at;
      }
    }
  }

  std::vector<Field> fields_;
  std::map<std::string, std::string> origins_;
};

// The value checks; `where(key)` names the place the key's value came from.
void check_values(const TrainConfig& c, const std::function<std::string(const std::string&)>& where) {
  const auto fail_unless = [&](bool ok, const std::string& key, const std::string& what) {
    Q3VL_CHECK(ok, where(key), ": ", key, ": ", what);
  };
  const auto one_of = [&](const std::string& key, const std::string& value, const std::vector<std::string>& allowed) {
    fail_unless(std::find(allowed.begin(), allowed.end(), value) != allowed.end(), key,
                "expected one of " + join(allowed, ", ") + ", got '" + value + "'");
  };
  const auto names_from = [&](const std::string& key, const std::vector<std::string>& items,
                              const std::vector<std::string>& allowed) {
    std::set<std::string> seen;
    for (const std::string& item : items) {
      one_of(key, item, allowed);
      fail_unless(seen.insert(item).second, key, "'" + item + "' is listed twice");
    }
  };
  const auto at_least = [&](const std::string& key, double value, double min) {
    fail_unless(value >= min, key, "must be >= " + format_number(min) + ", got " + format_number(value));
  };
  const auto not_empty = [&](const std::string& key, const std::optional<std::string>& value) {
    fail_unless(!value || !value->empty(), key, "must not be empty (null leaves it unset)");
  };

  TrainConfig copy = c;
  for (const Field& f : fields_of(copy)) {
    if (const auto* d = std::get_if<double*>(&f.target)) fail_unless(std::isfinite(**d), f.key, "must be finite");
    if (const auto* d = std::get_if<std::optional<double>*>(&f.target)) {
      fail_unless(!**d || std::isfinite(***d), f.key, "must be finite");
    }
  }

  const ModelSection& m = c.model;
  std::vector<std::string> sources;
  for (const auto& [key, value] : {std::pair{"model.flavor", &m.flavor}, std::pair{"model.config", &m.config},
                                   std::pair{"model.checkpoint", &m.checkpoint}}) {
    not_empty(key, *value);
    if (*value) sources.push_back(key);
  }
  fail_unless(sources.size() == 1, sources.size() > 1 ? sources.back() : "model",
              sources.empty() ? "exactly one of model.flavor, model.config, model.checkpoint must be set, none is"
                              : "exactly one of model.flavor, model.config, model.checkpoint must be set, got " +
                                    join(sources, " and "));
  if (m.router_aux_loss_coef) at_least("model.router_aux_loss_coef", *m.router_aux_loss_coef, 0);

  fail_unless(!c.data.dir.empty(), "data.dir", "required (the `q3vl pack` output folder)");
  at_least("data.sequences_per_batch", c.data.sequences_per_batch, 1);
  at_least("data.prefetch", c.data.prefetch, 0);

  at_least("train.steps", static_cast<double>(c.train.steps), 1);
  at_least("train.grad_accum", c.train.grad_accum, 1);
  at_least("train.max_tokens", static_cast<double>(c.train.max_tokens), 0);

  const OptimizerSection& o = c.optimizer;
  fail_unless(o.lr > 0, "optimizer.lr", "must be > 0, got " + format_number(o.lr));
  at_least("optimizer.min_lr", o.min_lr, 0);
  fail_unless(o.min_lr <= o.lr, "optimizer.min_lr",
              "must be <= optimizer.lr (" + format_number(o.lr) + "), got " + format_number(o.min_lr));
  at_least("optimizer.warmup_steps", static_cast<double>(o.warmup_steps), 0);
  fail_unless(o.warmup_steps <= c.train.steps, "optimizer.warmup_steps",
              "must be <= train.steps (" + std::to_string(c.train.steps) + "), got " + std::to_string(o.warmup_steps) +
                  "; hint: the run is shorter than its warmup, lower it with --set optimizer.warmup_steps=N or "
                  "lengthen the run with --set train.steps=N");
  one_of("optimizer.decay", o.decay, {"cosine", "linear", "constant"});
  for (const auto& [key, beta] : {std::pair{"optimizer.beta1", o.beta1}, std::pair{"optimizer.beta2", o.beta2}}) {
    fail_unless(beta >= 0 && beta < 1, key, "must be in [0, 1), got " + format_number(beta));
  }
  fail_unless(o.eps > 0, "optimizer.eps", "must be > 0, got " + format_number(o.eps));
  at_least("optimizer.weight_decay", o.weight_decay, 0);
  names_from("optimizer.no_decay", o.no_decay, kParamKinds);
  at_least("optimizer.grad_clip", o.grad_clip, 0);
  for (const std::string& module : kModules) {
    fail_unless(o.lr_scale.count(module) == 1, "optimizer.lr_scale." + module, "missing");
  }
  for (const auto& [module, scale] : o.lr_scale) {
    one_of("optimizer.lr_scale", module, kModules);
    at_least("optimizer.lr_scale." + module, scale, 0);
  }
  names_from("optimizer.freeze", o.freeze, kModules);
  fail_unless(o.freeze.size() < kModules.size(), "optimizer.freeze", "freezes every module, nothing would train");

  one_of("moe.balance", c.moe.balance, {"aux", "bias", "aux+bias"});
  fail_unless(c.moe.bias_update_rate > 0, "moe.bias_update_rate",
              "must be > 0, got " + format_number(c.moe.bias_update_rate));
  one_of("moe.aux_loss", c.moe.aux_loss, {"pooled", "per_layer"});

  at_least("logging.every", static_cast<double>(c.logging.every), 1);
  at_least("logging.expert_stats_every", static_cast<double>(c.logging.expert_stats_every), 0);
  at_least("logging.expert_health_every", static_cast<double>(c.logging.expert_health_every), 0);
  at_least("logging.peak_gflops", c.logging.peak_gflops, 0);

  at_least("checkpoint.every", static_cast<double>(c.checkpoint.every), 0);
  at_least("checkpoint.keep", c.checkpoint.keep, 1);
  fail_unless(!c.checkpoint.resume.empty(), "checkpoint.resume", "expected auto, none or a checkpoint folder, got ''");

  one_of("export.dtype", c.export_.dtype, {"f32", "bf16", "f16"});
  at_least("export.shard_mb", static_cast<double>(c.export_.shard_mb), 1);
  not_empty("export.tokenizer", c.export_.tokenizer);

  const ParallelSection& p = c.parallel;
  for (const auto& [key, degree] : {std::pair{"parallel.dp", p.dp}, std::pair{"parallel.fsdp", p.fsdp},
                                    std::pair{"parallel.tp", p.tp}, std::pair{"parallel.ep", p.ep}}) {
    at_least(key, degree, 1);
  }
  // world() is an int: dp 65536 x fsdp 65536 used to wrap to "0 ranks".
  const std::optional<int64_t> world = checked_product({p.dp, p.fsdp, p.ep, p.tp});
  fail_unless(world && *world <= std::numeric_limits<int>::max(), "parallel",
              "dp x fsdp x ep x tp = " + std::to_string(p.dp) + " x " + std::to_string(p.fsdp) + " x " +
                  std::to_string(p.ep) + " x " + std::to_string(p.tp) + " ranks overflows an int");
  at_least("parallel.step_timeout_s", p.step_timeout_s, 0);

  fail_unless(!c.output_dir.empty(), "output_dir", "must not be empty");
}

// A string as YAML: bare when it is a simple name YAML would not read as anything else, else double-quoted.
std::string yaml_string(const std::string& s) {
  static const std::regex kBare("[A-Za-z_][A-Za-z0-9_.-]*");
  static const std::regex kReserved(
      "null|Null|NULL|true|True|TRUE|false|False|FALSE|y|Y|n|N|yes|Yes|YES|no|No|NO|"
      "on|On|ON|off|Off|OFF");
  if (std::regex_match(s, kBare) && !std::regex_match(s, kReserved)) return s;
  std::string out = "\"";
  for (const char ch : s) {
    const auto u = static_cast<unsigned char>(ch);
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (u < 0x20 || u == 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 15];
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

std::string yaml_value(const Target& target) {
  return std::visit(Overloaded{
                        [](int* t) { return std::to_string(*t); },
                        [](int64_t* t) { return std::to_string(*t); },
                        [](uint64_t* t) { return std::to_string(*t); },
                        [](std::optional<uint64_t>* t) { return *t ? std::to_string(**t) : std::string("null"); },
                        [](double* t) { return format_number(*t); },
                        [](std::optional<double>* t) { return *t ? format_number(**t) : std::string("null"); },
                        [](bool* t) { return std::string(*t ? "true" : "false"); },
                        [](std::string* t) { return yaml_string(*t); },
                        [](std::optional<std::string>* t) { return *t ? yaml_string(**t) : std::string("null"); },
                        [](std::vector<std::string>* t) {
                          std::vector<std::string> items;
                          for (const std::string& s : *t) items.push_back(yaml_string(s));
                          return "[" + join(items, ", ") + "]";
                        },
                        [](NonfiniteAction t) { return std::string(*t.skip ? "skip" : "stop"); },
                    },
                    target);
}

}  // namespace

TrainConfig TrainConfig::load(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path, std::ios::binary);
  Q3VL_CHECK(in, "cannot open train config '", path, "'");
  const std::string text{std::istreambuf_iterator<char>(in), {}};
  Q3VL_CHECK(!in.bad(), "cannot read train config '", path, "'");
  const fs::path folder = fs::path(path).parent_path();
  return parse(text, path, overrides, folder.empty() ? "." : folder.string());
}

TrainConfig TrainConfig::parse(const std::string& yaml_text, const std::string& source_name,
                               const std::vector<std::string>& overrides, const std::string& base_dir) {
  const Source file{source_name, fs::absolute(base_dir).lexically_normal(), false};
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(yaml_text);
  } catch (const YAML::Exception& e) {
    Q3VL_FAIL(file.at(e.mark), ": invalid YAML: ", e.msg);
  }
  Q3VL_CHECK(docs.size() <= 1, source_name, ": expected one YAML document, found ", docs.size());

  TrainConfig config;
  ConfigReader reader(config);
  reader.apply_document(docs.empty() ? YAML::Node() : docs[0], file);
  for (const std::string& o : overrides) reader.apply_override(o);
  if (reader.origin("output_dir").empty()) config.output_dir = resolve_path(config.output_dir, fs::current_path());
  // export.tokenizer names the tokenizer files' folder; a tokenizer.json given instead stands for its folder. A path
  // that does not exist yet is left for the trainer to report.
  if (config.export_.tokenizer && fs::is_regular_file(*config.export_.tokenizer))
    config.export_.tokenizer = io::resolve_tokenizer_dir(*config.export_.tokenizer, "export.tokenizer");

  check_values(config, [&](const std::string& key) {
    const std::string at = reader.origin(key);
    return at.empty() ? source_name : at;
  });
  return config;
}

void TrainConfig::validate(const std::string& source_name) const {
  check_values(*this, [&](const std::string&) { return source_name; });
}

std::vector<std::string> TrainConfig::hints() const {
  std::vector<std::string> out;
  if (optimizer.warmup_steps > 0 && optimizer.warmup_steps == train.steps && optimizer.decay != "constant")
    out.push_back("optimizer.warmup_steps = train.steps = " + std::to_string(train.steps) +
                  ": the whole run is warmup and the learning rate never decays (lower optimizer.warmup_steps)");
  return out;
}

std::string TrainConfig::to_yaml() const {
  TrainConfig copy = *this;
  std::ostringstream os;
  os << "# q3vl train configuration: every field, defaults filled in.\n";
  std::vector<std::string> open;  // the sections the previous line was in
  for (const Field& f : fields_of(copy)) {
    std::vector<std::string> sections;
    size_t start = 0;
    for (size_t dot; (dot = f.key.find('.', start)) != std::string::npos; start = dot + 1) {
      sections.push_back(f.key.substr(start, dot - start));
    }
    size_t common = 0;
    while (common < open.size() && common < sections.size() && open[common] == sections[common]) ++common;
    for (size_t i = common; i < sections.size(); ++i) os << std::string(2 * i, ' ') << sections[i] << ":\n";
    open = sections;
    std::string line = std::string(2 * sections.size(), ' ') + f.key.substr(start) + ": " + yaml_value(f.target);
    constexpr size_t kCommentColumn = 40;
    line.resize(std::max(line.size() + 1, kCommentColumn), ' ');
    os << line << " # " << f.help << "\n";
  }
  return os.str();
}

}  // namespace q3vl::app
