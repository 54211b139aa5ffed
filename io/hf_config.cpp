// config.json parsing with HF's defaults and an allow-list of keys, config.json writing, flavor lookup.
#include "io/hf_config.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "core/check.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// One JSON object of the config (top level, text_config, vision_config, rope block) with typed getters
// that name "<file>: <path.key>" in errors, and a record of the keys read so the rest can be rejected.
class Section {
 public:
  Section(const json& obj, std::string path, const std::string& source)
      : obj_(obj), path_(std::move(path)), source_(source) {
    Q3VL_CHECK(obj_.is_object(), source_, ": ", path_.empty() ? "the config" : path_, " is not a JSON object");
  }

  std::string where(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    Q3VL_FAIL(source_, ": ", where(key), " ", what);
  }

  // The value of `key`, or nullptr when absent or JSON null; marks the key as known either way.
  const json* find(const std::string& key) {
    known_.insert(key);
    const auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const std::string& key) { return find(key) != nullptr; }
  void accept(std::initializer_list<const char*> keys) {
    for (const char* k : keys) known_.insert(k);
  }

  int64_t get_int(const std::string& key, int64_t fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) fail(key, "must be an integer, got " + v->dump());
    return v->get<int64_t>();
  }
  int get_int32(const std::string& key, int fallback) {
    const int64_t v = get_int(key, fallback);
    if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) fail(key, "is out of range");
    return static_cast<int>(v);
  }
  double get_double(const std::string& key, double fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number()) fail(key, "must be a number, got " + v->dump());
    return v->get<double>();
  }
  // eps and theta are divided by and taken to powers: zero or negative ones fail far from the file otherwise.
  double get_positive(const std::string& key, double fallback) {
    const double v = get_double(key, fallback);
    if (!(v > 0 && std::isfinite(v))) fail(key, "must be a positive number, got " + find(key)->dump());
    return v;
  }
  bool get_bool(const std::string& key, bool fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) fail(key, "must be true or false, got " + v->dump());
    return v->get<bool>();
  }
  std::string get_string(const std::string& key, const std::string& fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_string()) fail(key, "must be a string, got " + v->dump());
    return v->get<std::string>();
  }
  std::vector<int> get_int_list(const std::string& key, std::vector<int> fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_array()) fail(key, "must be a list of integers, got " + v->dump());
    std::vector<int> out;
    for (const json& e : *v) {
      if (!e.is_number_integer() || e.get<int64_t>() < std::numeric_limits<int>::min() ||
          e.get<int64_t>() > std::numeric_limits<int>::max())
        fail(key, "must be a list of integers, got " + v->dump());
      out.push_back(e.get<int>());
    }
    return out;
  }
  void require_value(const std::string& key, const json& only, const char* why) {
    const json* v = find(key);
    if (v != nullptr && *v != only)
      fail(key, "is " + v->dump() + "; only " + only.dump() + " is supported (" + why + ")");
  }

  // Rejects every key that no getter asked for.
  void finish() const {
    for (const auto& [key, value] : obj_.items())
      if (!known_.contains(key)) fail(key, "is not a known key (see io/hf_config.h for the accepted keys)");
  }

 private:
  const json& obj_;
  std::string path_;
  const std::string& source_;
  std::set<std::string> known_;
};

// Keys that describe storage, generation or the tokenizer, not the computation.
void accept_harmless(Section& s) {
  s.accept({"dtype", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id"});
}

struct RopeSettings {
  std::optional<double> theta;
  std::array<int, 3> section{24, 20, 20};  // HF's Qwen3-VL rotary default when the config has none
  bool interleaved = true;
};

void parse_rope_block(Section& text, const std::string& key, RopeSettings& rope, const std::string& source) {
  const json* block = text.find(key);
  if (block == nullptr) return;
  Section r(*block, text.where(key), source);
  const std::string type = r.has("rope_type") ? r.get_string("rope_type", "default") : r.get_string("type", "default");
  if (type != "default" && type != "mrope")
    r.fail(r.has("rope_type") ? "rope_type" : "type", "is '" + type + "'; only the default (m)rope is supported");
  if (r.has("rope_theta")) rope.theta = r.get_positive("rope_theta", 1);
  const std::vector<int> section = r.get_int_list("mrope_section", {rope.section[0], rope.section[1], rope.section[2]});
  if (section.size() != 3) r.fail("mrope_section", "must have 3 entries (T, H, W)");
  rope.section = {section[0], section[1], section[2]};
  rope.interleaved = r.get_bool("mrope_interleaved", true);
  r.finish();
}

TextConfig parse_text(Section& t, bool moe, const std::string& source) {
  TextConfig c;
  const std::string expected_type = moe ? "qwen3_vl_moe_text" : "qwen3_vl_text";
  const std::string type = t.get_string("model_type", expected_type);
  if (type != expected_type) t.fail("model_type", "is '" + type + "', expected '" + expected_type + "'");
  accept_harmless(t);
  t.accept({"tie_word_embeddings", "output_router_logits"});

  // HF class defaults (Qwen3VLMoeTextConfig / Qwen3VLTextConfig).
  c.vocab_size = t.get_int("vocab_size", 151936);
  c.hidden_size = t.get_int("hidden_size", moe ? 2048 : 4096);
  c.intermediate_size = t.get_int("intermediate_size", moe ? 5632 : 22016);
  c.num_hidden_layers = t.get_int32("num_hidden_layers", moe ? 24 : 32);
  c.num_attention_heads = t.get_int32("num_attention_heads", moe ? 16 : 32);
  c.num_key_value_heads = t.get_int32("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads <= 0) t.fail("num_attention_heads", "must be positive");
  c.head_dim = t.get_int("head_dim", moe ? c.hidden_size / c.num_attention_heads : 128);
  c.hidden_act = t.get_string("hidden_act", "silu");
  c.max_position_embeddings = t.get_int("max_position_embeddings", 128000);
  c.initializer_range = t.get_double("initializer_range", 0.02);
  c.rms_norm_eps = t.get_positive("rms_norm_eps", 1e-6);
  c.attention_bias = t.get_bool("attention_bias", false);
  t.require_value("attention_dropout", 0.0, "training runs without attention dropout");
  t.require_value("sliding_window", nullptr, "Qwen3-VL attends to the whole document");
  t.require_value("use_sliding_window", false, "Qwen3-VL attends to the whole document");
  if (const json* lt = t.find("layer_types")) {
    if (!lt->is_array() || static_cast<int>(lt->size()) != c.num_hidden_layers ||
        std::any_of(lt->begin(), lt->end(), [](const json& e) { return e != "full_attention"; }))
      t.fail("layer_types", "must list \"full_attention\" once per layer, got " + lt->dump());
  }

  if (moe) {
    const bool has_experts = t.has("num_experts"), has_local = t.has("num_local_experts");
    c.num_experts = t.get_int32("num_experts", 60);
    if (has_local) {
      const int local = t.get_int32("num_local_experts", 60);
      if (has_experts && local != c.num_experts)
        t.fail("num_local_experts",
               "is " + std::to_string(local) + " but num_experts is " + std::to_string(c.num_experts));
      c.num_experts = local;
    }
    c.num_experts_per_tok = t.get_int32("num_experts_per_tok", 4);
    c.moe_intermediate_size = t.get_int("moe_intermediate_size", 1408);
    c.decoder_sparse_step = t.get_int32("decoder_sparse_step", 1);
    c.mlp_only_layers = t.get_int_list("mlp_only_layers", {});
    c.router_aux_loss_coef = t.get_double("router_aux_loss_coef", 0.001);
    t.require_value("norm_topk_prob", true, "HF's Qwen3-VL-MoE router always renormalises the top-k weights");
    for (size_t i = 0; i < c.mlp_only_layers.size(); ++i)
      if (c.mlp_only_layers[i] < 0 || c.mlp_only_layers[i] >= c.num_hidden_layers)
        t.fail("mlp_only_layers", "entry " + std::to_string(c.mlp_only_layers[i]) + " is outside the " +
                                      std::to_string(c.num_hidden_layers) + " text layers");
  } else {
    c.num_experts = 0;
    c.num_experts_per_tok = 0;
    c.moe_intermediate_size = 0;
    c.decoder_sparse_step = 1;
    c.mlp_only_layers.clear();
  }

  RopeSettings rope;
  if (t.has("rope_scaling") && t.has("rope_parameters"))
    t.fail("rope_parameters", "and rope_scaling are both present; which one applies is ambiguous");
  parse_rope_block(t, "rope_scaling", rope, source);
  parse_rope_block(t, "rope_parameters", rope, source);
  if (t.has("rope_theta")) {
    const double theta = t.get_positive("rope_theta", 1);
    if (rope.theta && *rope.theta != theta) t.fail("rope_theta", "disagrees with rope_parameters.rope_theta");
    rope.theta = theta;
  }
  c.rope_theta = rope.theta.value_or(500000.0);  // HF's default_theta for these configs
  c.mrope_section = rope.section;
  c.mrope_interleaved = rope.interleaved;
  t.finish();
  return c;
}

VisionConfig parse_vision(Section& v, const std::string& source) {
  VisionConfig c;
  v.accept({"model_type", "dtype", "torch_dtype", "initializer_range"});
  const std::string type = v.get_string("model_type", "qwen3_vl");
  if (type != "qwen3_vl" && type != "qwen3_vl_moe" && type != "qwen3_vl_moe_vision" && type != "qwen3_vl_vision")
    v.fail("model_type", "is '" + type + "', not a Qwen3-VL vision tower");
  // HF class defaults (Qwen3VL(Moe)VisionConfig).
  c.depth = v.get_int32("depth", 27);
  c.hidden_size = v.get_int("hidden_size", 1152);
  c.hidden_act = v.get_string("hidden_act", "gelu_pytorch_tanh");
  c.intermediate_size = v.get_int("intermediate_size", 4304);
  c.num_heads = v.get_int32("num_heads", 16);
  c.in_channels = v.get_int("in_channels", 3);
  c.patch_size = v.get_int("patch_size", 16);
  c.spatial_merge_size = v.get_int("spatial_merge_size", 2);
  c.temporal_patch_size = v.get_int("temporal_patch_size", 2);
  c.out_hidden_size = v.get_int("out_hidden_size", 3584);
  c.num_position_embeddings = v.get_int("num_position_embeddings", 2304);
  c.deepstack_visual_indexes = v.get_int_list("deepstack_visual_indexes", {8, 16, 24});
  // transformers >= 5.x records the vision tower's 2-D rotary here (rope_type "axial"); absent, theta is 1e4.
  c.rope_theta = 10000.0;
  if (const json* block = v.find("rope_parameters")) {
    Section r(*block, v.where("rope_parameters"), source);
    const std::string type = r.get_string("rope_type", "axial");
    if (type != "axial") r.fail("rope_type", "is '" + type + "'; the vision tower's rotary is axial");
    c.rope_theta = r.get_positive("rope_theta", 10000.0);
    r.finish();
  }
  v.finish();
  return c;
}

std::string architecture_of(const std::string& model_type) {
  return model_type == "qwen3_vl_moe" ? "Qwen3VLMoeForConditionalGeneration" : "Qwen3VLForConditionalGeneration";
}

std::string dtype_json_name(DType dt) {
  switch (dt) {
    case DType::f32:
      return "float32";
    case DType::bf16:
      return "bfloat16";
    case DType::f16:
      return "float16";
    default:
      Q3VL_FAIL("config.json: checkpoint dtype ", dtype_name(dt), " is not f32, bf16 or f16");
  }
}

std::optional<fs::path> find_upwards(fs::path start, const fs::path& relative) {
  std::error_code ec;
  for (fs::path p = start; !p.empty(); p = p.parent_path()) {
    if (fs::is_directory(p / relative, ec)) return p / relative;
    if (p == p.parent_path()) break;
  }
  return std::nullopt;
}

}  // namespace

ModelConfig parse_hf_config(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    Q3VL_FAIL(source, ": bad JSON: ", e.what());
  }
  Section top(root, "", source);
  ModelConfig cfg;
  cfg.model_type = top.get_string("model_type", "");
  if (cfg.model_type != "qwen3_vl_moe" && cfg.model_type != "qwen3_vl")
    top.fail("model_type", "is '" + cfg.model_type + "', expected qwen3_vl_moe or qwen3_vl");
  const bool moe = cfg.is_moe_model();
  if (const json* arch = top.find("architectures")) {
    if (*arch != json::array({architecture_of(cfg.model_type)}))
      top.fail("architectures", "is " + arch->dump() + ", expected [\"" + architecture_of(cfg.model_type) +
                                    "\"] for model_type " + cfg.model_type);
  }
  accept_harmless(top);
  top.accept({"transformers_version", "q3vl_version", "_name_or_path", "initializer_range"});

  const json* text = top.find("text_config");
  const json* vision = top.find("vision_config");
  if (text == nullptr) top.fail("text_config", "is missing");
  if (vision == nullptr) top.fail("vision_config", "is missing");
  Section text_section(*text, "text_config", source);
  cfg.text = parse_text(text_section, moe, source);
  Section vision_section(*vision, "vision_config", source);
  cfg.vision = parse_vision(vision_section, source);

  cfg.image_token_id = top.get_int("image_token_id", 151655);
  cfg.video_token_id = top.get_int("video_token_id", 151656);
  cfg.vision_start_token_id = top.get_int("vision_start_token_id", 151652);
  cfg.vision_end_token_id = top.get_int("vision_end_token_id", 151653);
  cfg.tie_word_embeddings = top.get_bool("tie_word_embeddings", false);
  // Each special token marks a different thing (image pads, video pads, the vision span's ends): two equal
  // ids would make the model read video pads as image pads, found only when the patch counts disagree.
  const std::pair<const char*, int64_t> special[] = {{"image_token_id", cfg.image_token_id},
                                                     {"video_token_id", cfg.video_token_id},
                                                     {"vision_start_token_id", cfg.vision_start_token_id},
                                                     {"vision_end_token_id", cfg.vision_end_token_id}};
  for (size_t i = 0; i < std::size(special); ++i)
    for (size_t j = 0; j < i; ++j)
      if (special[i].second == special[j].second)
        top.fail(special[i].first, "is " + std::to_string(special[i].second) + ", the same as " + special[j].first);
  top.finish();

  try {
    cfg.validate();
  } catch (const Error& e) {
    Q3VL_FAIL(source, ": inconsistent config: ", e.what());
  }
  return cfg;
}

ModelConfig read_hf_config(const std::string& path) {
  std::ifstream in(path);
  Q3VL_CHECK(in, "config: cannot open ", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_hf_config(ss.str(), path);
}

std::string hf_config_json(const ModelConfig& cfg, DType dtype) {
  cfg.validate();
  const bool moe = cfg.is_moe_model();
  const TextConfig& t = cfg.text;
  json text = {
      {"model_type", moe ? "qwen3_vl_moe_text" : "qwen3_vl_text"},
      {"vocab_size", t.vocab_size},
      {"hidden_size", t.hidden_size},
      {"intermediate_size", t.intermediate_size},
      {"num_hidden_layers", t.num_hidden_layers},
      {"num_attention_heads", t.num_attention_heads},
      {"num_key_value_heads", t.num_key_value_heads},
      {"head_dim", t.head_dim},
      {"hidden_act", t.hidden_act},
      {"max_position_embeddings", t.max_position_embeddings},
      {"initializer_range", t.initializer_range},
      {"rms_norm_eps", t.rms_norm_eps},
      {"attention_bias", t.attention_bias},
      {"attention_dropout", 0.0},
      {"rope_theta", t.rope_theta},
      {"rope_scaling",
       {{"rope_type", "default"},
        {"mrope_section", {t.mrope_section[0], t.mrope_section[1], t.mrope_section[2]}},
        {"mrope_interleaved", t.mrope_interleaved}}},
      {"dtype", dtype_json_name(dtype)},
  };
  if (moe) {
    text["num_experts"] = t.num_experts;
    text["num_experts_per_tok"] = t.num_experts_per_tok;
    text["moe_intermediate_size"] = t.moe_intermediate_size;
    text["decoder_sparse_step"] = t.decoder_sparse_step;
    text["mlp_only_layers"] = t.mlp_only_layers;
    text["norm_topk_prob"] = true;
    text["router_aux_loss_coef"] = t.router_aux_loss_coef;
  }
  const VisionConfig& v = cfg.vision;
  json vision = {
      {"model_type", cfg.model_type},
      {"depth", v.depth},
      {"hidden_size", v.hidden_size},
      {"hidden_act", v.hidden_act},
      {"intermediate_size", v.intermediate_size},
      {"num_heads", v.num_heads},
      {"in_channels", v.in_channels},
      {"patch_size", v.patch_size},
      {"spatial_merge_size", v.spatial_merge_size},
      {"temporal_patch_size", v.temporal_patch_size},
      {"out_hidden_size", v.out_hidden_size},
      {"num_position_embeddings", v.num_position_embeddings},
      {"deepstack_visual_indexes", v.deepstack_visual_indexes},
      {"initializer_range", t.initializer_range},
  };
  // Written only when it differs from the default, so configs keep the published (4.57) layout.
  if (v.rope_theta != 10000.0) vision["rope_parameters"] = {{"rope_type", "axial"}, {"rope_theta", v.rope_theta}};
  json root = {
      {"architectures", {architecture_of(cfg.model_type)}},
      {"model_type", cfg.model_type},
      {"text_config", text},
      {"vision_config", vision},
      {"image_token_id", cfg.image_token_id},
      {"video_token_id", cfg.video_token_id},
      {"vision_start_token_id", cfg.vision_start_token_id},
      {"vision_end_token_id", cfg.vision_end_token_id},
      {"tie_word_embeddings", cfg.tie_word_embeddings},
      {"dtype", dtype_json_name(dtype)},
  };
  return root.dump(2) + "\n";
}

void write_hf_config(const std::string& path, const ModelConfig& cfg, DType dtype) {
  const std::string text = hf_config_json(cfg, dtype);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    Q3VL_CHECK(out, "config: cannot open ", tmp, " for writing");
    out << text;
    out.flush();
    Q3VL_CHECK(out, "config: write to ", tmp, " failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  Q3VL_CHECK(!ec, "config: cannot rename ", tmp, " to ", path, ": ", ec.message());
}

std::string flavors_dir() {
  if (const char* env = std::getenv("Q3VL_FLAVORS_DIR")) {
    Q3VL_CHECK(fs::is_directory(env), "config: Q3VL_FLAVORS_DIR=", env, " is not a directory");
    return env;
  }
  const fs::path relative = fs::path("jobs") / "flavors";
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    if (auto found = find_upwards(exe.parent_path(), relative)) return found->string();
  if (auto found = find_upwards(fs::current_path(ec), relative)) return found->string();
  Q3VL_FAIL("config: no jobs/flavors directory above the executable or the working directory; set Q3VL_FLAVORS_DIR");
}

std::vector<std::string> flavor_names() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(flavors_dir()))
    if (e.path().extension() == ".json") names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

ModelConfig load_model_config(const std::string& name_or_path) {
  std::error_code ec;
  if (fs::is_directory(name_or_path, ec)) {
    const fs::path file = fs::path(name_or_path) / "config.json";
    Q3VL_CHECK(fs::exists(file), "config: directory ", name_or_path, " has no config.json");
    return read_hf_config(file.string());
  }
  if (fs::is_regular_file(name_or_path, ec)) return read_hf_config(name_or_path);
  const fs::path flavor = fs::path(flavors_dir()) / (name_or_path + ".json");
  if (name_or_path.find('/') == std::string::npos && fs::is_regular_file(flavor, ec))
    return read_hf_config(flavor.string());
  std::string known;
  for (const std::string& n : flavor_names()) {
    if (!known.empty()) known += ", ";
    known += n;
  }
  Q3VL_FAIL("config: '", name_or_path, "' is neither a directory with config.json, a .json file, nor a flavor (", known,
            ")");
}

}  // namespace q3vl::io
