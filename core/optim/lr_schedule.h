// Learning-rate schedules: linear warmup from lr/warmup to lr, then cosine or linear decay to min_lr at
// total_steps, or constant. Step numbers are 0-based optimizer steps.
#pragma once

#include <cstdint>
#include <string_view>

namespace q3vl {

enum class LrDecay { cosine, linear, constant };

// "cosine" | "linear" | "constant"; anything else is an error naming the value.
LrDecay parse_lr_decay(std::string_view name);
std::string_view lr_decay_name(LrDecay decay);

struct LrSchedule {
  double lr = 1e-4;
  double min_lr = 0.0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  LrDecay decay = LrDecay::cosine;

  // Checks the fields (lr >= min_lr >= 0, warmup_steps >= 0, total_steps >= 1, all finite): errors name the
  // field and value. at() runs it; a config loader can run it up front.
  void validate() const;

  // step < warmup: lr * (step + 1) / warmup; then decay over progress = (step - warmup) / (total - warmup)
  // (cosine: min + (lr - min) * (1 + cos(pi * progress)) / 2; linear: lr + (min - lr) * progress),
  // clamped to min_lr after total_steps; constant stays at lr after the warmup. With warmup_steps >=
  // total_steps the decay phase is empty: min_lr from warmup_steps on (cosine, linear).
  double at(int64_t step) const;
};

}  // namespace q3vl
