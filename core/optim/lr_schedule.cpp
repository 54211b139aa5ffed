// Learning-rate schedules: warmup, then cosine, linear or constant; the formulas are written in the
// operation order of tests/golden/optim_reference.py so both give the same doubles.
#include "core/optim/lr_schedule.h"

#include <cmath>
#include <numbers>

#include "core/check.h"

namespace q3vl {

LrDecay parse_lr_decay(std::string_view name) {
  if (name == "cosine") return LrDecay::cosine;
  if (name == "linear") return LrDecay::linear;
  if (name == "constant") return LrDecay::constant;
  Q3VL_FAIL("unknown learning-rate decay '", name, "' (expected cosine, linear or constant)");
}

std::string_view lr_decay_name(LrDecay decay) {
  switch (decay) {
    case LrDecay::cosine: return "cosine";
    case LrDecay::linear: return "linear";
    case LrDecay::constant: return "constant";
  }
  Q3VL_FAIL("invalid LrDecay value ", static_cast<int>(decay));
}

void LrSchedule::validate() const {
  Q3VL_CHECK(std::isfinite(lr) && lr >= 0, "lr schedule: lr ", lr, " is negative or not finite");
  Q3VL_CHECK(std::isfinite(min_lr) && min_lr >= 0, "lr schedule: min_lr ", min_lr, " is negative or not finite");
  Q3VL_CHECK(min_lr <= lr, "lr schedule: min_lr ", min_lr, " exceeds lr ", lr);
  Q3VL_CHECK(warmup_steps >= 0, "lr schedule: warmup_steps ", warmup_steps, " is negative");
  Q3VL_CHECK(total_steps >= 1, "lr schedule: total_steps ", total_steps, " is below 1");
  lr_decay_name(decay);  // rejects a value outside the enum
}

double LrSchedule::at(int64_t step) const {
  validate();
  Q3VL_CHECK(step >= 0, "lr schedule: step ", step, " is negative");
  if (step < warmup_steps) return lr * double(step + 1) / double(warmup_steps);
  if (decay == LrDecay::constant) return lr;
  if (step >= total_steps) return min_lr;
  const double progress = double(step - warmup_steps) / double(total_steps - warmup_steps);
  if (decay == LrDecay::cosine) return min_lr + (lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress)) / 2.0;
  return lr + (min_lr - lr) * progress;
}

}  // namespace q3vl
