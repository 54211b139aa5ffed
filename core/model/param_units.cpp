// param_units: the FSDP units as contiguous runs of model_param_specs.
#include "core/model/param_units.h"

#include "core/check.h"
#include "core/model/param_specs.h"

namespace q3vl {

namespace {

ParamUnit unit_of(const ParamSpec& s) {
  if (s.tower == ParamTower::vision) {
    if (s.layer >= 0) return {"vision block " + std::to_string(s.layer), UnitKind::vision_block, s.layer};
    if (s.hf_key.find("merger") != std::string::npos) return {"vision mergers", UnitKind::vision_mergers};
    return {"vision embeddings", UnitKind::vision_embeddings};
  }
  if (s.layer >= 0) return {"text layer " + std::to_string(s.layer), UnitKind::text_layer, s.layer};
  if (s.kind == ParamKind::embedding) return {"token embedding", UnitKind::token_embedding};
  return {"final norm + lm_head", UnitKind::head};
}

}  // namespace

std::vector<ParamUnit> param_units(const ModelConfig& config) {
  const std::vector<ParamSpec> specs = model_param_specs(config);
  std::vector<ParamUnit> units;
  for (size_t i = 0; i < specs.size(); ++i) {
    ParamUnit u = unit_of(specs[i]);
    if (!units.empty() && units.back().name == u.name) {
      units.back().end_spec = i + 1;
      continue;
    }
    for (const ParamUnit& earlier : units)
      Q3VL_CHECK(earlier.name != u.name, "param_units: unit '", u.name, "' is not contiguous in the parameter list (",
                 specs[i].hf_key, ")");
    u.first_spec = i;
    u.end_spec = i + 1;
    units.push_back(u);
  }
  return units;
}

UnitIds unit_ids(const std::vector<ParamUnit>& units) {
  UnitIds ids;
  for (size_t i = 0; i < units.size(); ++i) {
    const int u = static_cast<int>(i);
    switch (units[i].kind) {
      case UnitKind::vision_embeddings: ids.vision_embeddings = u; break;
      case UnitKind::vision_mergers: ids.vision_mergers = u; break;
      case UnitKind::token_embedding: ids.token_embedding = u; break;
      case UnitKind::head: ids.head = u; break;
      case UnitKind::vision_block: ids.vision_blocks.push_back(u); break;
      case UnitKind::text_layer: ids.text_layers.push_back(u); break;
    }
  }
  return ids;
}

}  // namespace q3vl
