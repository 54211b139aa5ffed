// FSDP units of Qwen3-VL(-MoE): the groups of parameters a sharded run gathers together just before they are
// used and frees right after (the vision embeddings, each vision block, the vision mergers, the token
// embedding, each text layer, and the final norm with an untied lm_head), plus the hooks through which the
// model asks for them. Each unit is a contiguous range of model_param_specs, so a store can lay units out on
// their own pages and hand the memory of an unused unit back to the system.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "core/model/config.h"

namespace q3vl {

enum class UnitKind { vision_embeddings, vision_block, vision_mergers, token_embedding, text_layer, head };

struct ParamUnit {
  std::string name;            // "vision block 3", "text layer 0", ...
  UnitKind kind;
  int index = -1;              // block / layer number, -1 otherwise
  size_t first_spec = 0;       // specs [first_spec, end_spec) of model_param_specs
  size_t end_spec = 0;
};

// The units in model_param_specs order (they tile it).
std::vector<ParamUnit> param_units(const ModelConfig& config);

// Where each unit sits in param_units(config), for the model's calls.
struct UnitIds {
  int vision_embeddings = -1, vision_mergers = -1, token_embedding = -1, head = -1;
  std::vector<int> vision_blocks, text_layers;
};
UnitIds unit_ids(const std::vector<ParamUnit>& units);

// What a sharded parameter store does for the model (parallel/ implements it over communicators). The model
// calls, for every unit it touches, in the same order on every rank:
//   acquire(u)          before reading the unit's weights (forward, or backward);
//   release(u)          when it will not read them again until the next acquire;
//   gradients_ready(u)  when its backward has finished adding to the unit's gradients in the gradient store.
//                       A tied token embedding gets it twice per backward (after lm_head and after the
//                       embedding); the store must accumulate, and leaves the unit's gradient store zeroed.
class ParamUnitHooks {
 public:
  virtual ~ParamUnitHooks() = default;
  virtual void acquire(int unit) = 0;
  virtual void release(int unit) = 0;
  virtual void gradients_ready(int unit) = 0;
};

}  // namespace q3vl
