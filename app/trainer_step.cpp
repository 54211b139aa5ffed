// One optimizer step of the trainer (trainer_impl.h): its micro-batches' forward and backward, the sums over the
// data ranks (loss, routing statistics, gradients), the gradient norm, the AdamW update and the router-bias update,
// with the time each phase took.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <thread>

#include "app/train_batch.h"
#include "app/trainer_impl.h"
#include "core/check.h"

namespace q3vl::app {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

StepRecord Trainer::Impl::train_step() {
  const Clock::time_point t0 = Clock::now();
  StepRecord rec;
  rec.lr = schedule.at(step);
  // All micro-batches of the step first: the CE mean is over all their targets.
  std::vector<std::unique_ptr<TrainBatch>> micro;
  if (comm.rank() == hang_rank && step + 1 == hang_step) {
    std::fprintf(stderr, "rank %d: Q3VL_FAULT_HANG: not making progress in step %lld\n", hang_rank, (long long)hang_step);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  beat("step " + std::to_string(step + 1) + ": loading micro-batches");
  for (int k = 0; k < cfg.train.grad_accum; ++k)
    micro.push_back(std::make_unique<TrainBatch>(loader->next(), model->config(), model->dtype()));
  rec.phases.data_s = seconds_since(t0);
  BatchShape need = micro[0]->shape();
  for (const auto& b : micro) {
    need = batch_shape_max(need, b->shape());
    rec.tokens += b->tokens();
    rec.target_tokens += b->target_tokens();
  }
  {
    const Clock::time_point t = Clock::now();
    int64_t counts[2] = {rec.tokens, rec.target_tokens};
    grid->data().all_reduce_sum(std::span<int64_t>(counts, 2));
    rec.tokens = counts[0];
    rec.target_tokens = counts[1];
    rec.phases.comm_s += seconds_since(t);
  }
  if (cfg.train.max_tokens > 0)
    Q3VL_CHECK(need.tokens() <= cfg.train.max_tokens, "train.max_tokens: a micro-batch of ", need.tokens(),
               " tokens exceeds the configured capacity ", cfg.train.max_tokens);
  // Expert parallelism: any rank's rows may all come to this rank's experts, so the expert rows are sized for
  // the group's largest batch.
  int64_t group_tokens = need.tokens();
  if (expert_exchange) {
    const Clock::time_point t = Clock::now();
    grid->expert().all_reduce_max(std::span<int64_t>(&group_tokens, 1));
    rec.phases.comm_s += seconds_since(t);
  }
  if (!workspace || !batch_fits(need, workspace->capacity()) || group_tokens > workspace->expert_group_tokens()) {
    const BatchShape cap = workspace ? batch_shape_max(need, workspace->capacity()) : need;
    if (workspace) group_tokens = std::max(group_tokens, workspace->expert_group_tokens());
    workspace.reset();
    workspace = std::make_unique<Workspace>(*model, cap, group_tokens);
  }

  sharded->zero_grads();
  for (auto& c : expert_counts) std::fill(c.begin(), c.end(), 0);
  ++health_steps;
  const int64_t normalizer = std::max<int64_t>(rec.target_tokens, 1);
  bool finite = true;
  ForwardOptions fo;
  fo.aux_loss = cfg.moe.uses_aux();
  fo.aux_per_layer = cfg.moe.aux_loss == "per_layer";
  if (grid->data().size() > 1) fo.expert_stats_reducer = [this](std::vector<MoeStats>& layers) { reduce_expert_stats(layers); };
  for (const auto& b : micro) {
    beat("step " + std::to_string(step + 1) + ": forward and backward");
    const Clock::time_point forward_start = Clock::now();
    const ForwardResult r = model->forward(b->plan(), b->batch(), *workspace, fo);
    rec.phases.forward_s += seconds_since(forward_start);
    rec.ce_loss += r.ce_loss * static_cast<double>(r.ce_tokens) / static_cast<double>(normalizer);
    rec.aux_loss += r.aux_loss / cfg.train.grad_accum;
    finite = finite && std::isfinite(r.loss);
    const auto& load = workspace->expert_load();
    for (size_t l = 0; l < load.size(); ++l) {
      const int64_t* c = load[l].counts.data<int64_t>();
      for (size_t e = 0; e < expert_counts[l].size(); ++e) {
        expert_counts[l][e] += c[e];
        health_counts[l][e] += c[e];
      }
      health_entropy[l] += load[l].entropy_sum;
      health_tokens[l] += load[l].valid_tokens;
      rec.router_margin = std::min(rec.router_margin, load[l].min_margin);
    }
    BackwardOptions bo;
    bo.ce_normalizer = normalizer;
    bo.aux_scale = 1.0 / cfg.train.grad_accum;
    const Clock::time_point backward_start = Clock::now();
    model->backward(b->plan(), *workspace, bo);
    rec.phases.backward_s += seconds_since(backward_start);
  }
  Clock::time_point comm_start = Clock::now();
  {
    double sums[2] = {rec.ce_loss, finite ? 0.0 : 1.0};
    grid->data().all_reduce_sum(std::span<double>(sums, 2));
    rec.ce_loss = sums[0];
    finite = sums[1] == 0.0;
    double negated_margin = -rec.router_margin;  // the minimum over ranks as a maximum
    grid->data().all_reduce_max(std::span<double>(&negated_margin, 1));
    rec.router_margin = -negated_margin;
  }
  beat("step " + std::to_string(step + 1) + ": gradient all-reduce");
  reduce_gradients();
  rec.phases.comm_s += seconds_since(comm_start);
  beat("step " + std::to_string(step + 1) + ": optimizer");
  Clock::time_point optimizer_start = Clock::now();
  const double coef = model->config().num_moe_layers() > 0 && cfg.moe.uses_aux()
                          ? model->config().text.router_aux_loss_coef
                          : 0.0;
  rec.loss = rec.ce_loss + coef * rec.aux_loss;
  {
    double sum_sq = gradient_sum_of_squares(norm_tensors);
    rec.phases.optimizer_s += seconds_since(optimizer_start);
    comm_start = Clock::now();
    sharded->piece_owners().all_reduce_sum(std::span<double>(&sum_sq, 1));
    rec.phases.comm_s += seconds_since(comm_start);
    rec.grad_norm = std::sqrt(sum_sq);
  }
  ++step;
  rec.step = step;
  if (!finite || !std::isfinite(rec.grad_norm)) {
    std::ostringstream why;
    why << "step " << step << ": " << (!finite ? "loss" : "gradient norm") << " is not finite (loss " << rec.loss
        << ", gradient norm " << rec.grad_norm << "; its micro-batches end at loader epoch " << loader->state().epoch
        << " position " << loader->state().position << ")";
    Q3VL_CHECK(cfg.train.skip_nonfinite, why.str(), "; set train.on_nonfinite: skip to skip such steps");
    say() << why.str() << ": update skipped\n";
    rec.skipped = true;
    ++skipped_steps;
  } else {
    optimizer_start = Clock::now();
    adamw->step(rec.lr, clip_coefficient(rec.grad_norm, cfg.optimizer.grad_clip));
    update_router_bias();
    rec.phases.optimizer_s += seconds_since(optimizer_start);
    beat("step " + std::to_string(step) + ": parameter all-gather");
    // Resident parameters are all-gathered now; per-unit ones by the next forward.
    comm_start = Clock::now();
    sharded->parameters_updated();
    rec.phases.comm_s += seconds_since(comm_start);
  }
  tokens_seen += rec.tokens;
  rec.seconds = seconds_since(t0);
  double step_flops = 0;
  for (const auto& b : micro) step_flops += train_flops(flops, b->document_tokens(), b->item_patches());
  log_step(rec, static_cast<int64_t>(step_flops));
  return rec;
}

void Trainer::Impl::update_router_bias() {
  const Tensor& bias = model->router_bias();
  if (!bias.defined()) return;
  const int64_t experts = bias.size(1);
  const double rate = cfg.moe.bias_update_rate;
  std::vector<double> delta(static_cast<size_t>(experts));
  for (size_t l = 0; l < expert_counts.size(); ++l) {
    const std::vector<int64_t>& load = expert_counts[l];
    double mean = 0;
    for (const int64_t v : load) mean += static_cast<double>(v);
    mean /= static_cast<double>(experts);
    double centre = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const double gap = mean - static_cast<double>(load[e]);
      delta[e] = rate * static_cast<double>((gap > 0) - (gap < 0));
      centre += delta[e];
    }
    centre = cfg.moe.bias_centered ? centre / static_cast<double>(experts) : 0.0;
    float* b = bias.data<float>() + static_cast<int64_t>(l) * experts;
    for (int64_t e = 0; e < experts; ++e) b[e] = static_cast<float>(b[e] + (delta[e] - centre));
  }
}

void Trainer::Impl::reduce_expert_stats(std::vector<MoeStats>& layers) {
  const size_t e = layers.empty() ? 0 : static_cast<size_t>(layers[0].counts.numel());
  std::vector<int64_t> ints(layers.size() * (e + 1));
  // prob_sum rows, then each layer's entropy sum.
  std::vector<double> doubles(layers.size() * (e + 1));
  for (size_t l = 0; l < layers.size(); ++l) {
    std::copy_n(layers[l].counts.data<int64_t>(), e, ints.begin() + l * e);
    std::copy_n(layers[l].prob_sum.data<double>(), e, doubles.begin() + l * e);
    ints[layers.size() * e + l] = layers[l].valid_tokens;
    doubles[layers.size() * e + l] = layers[l].entropy_sum;
  }
  grid->data().all_reduce_sum(std::span<int64_t>(ints));
  grid->data().all_reduce_sum(std::span<double>(doubles));
  for (size_t l = 0; l < layers.size(); ++l) {
    std::copy_n(ints.begin() + l * e, e, layers[l].counts.data<int64_t>());
    std::copy_n(doubles.begin() + l * e, e, layers[l].prob_sum.data<double>());
    layers[l].valid_tokens = ints[layers.size() * e + l];
    layers[l].entropy_sum = doubles[layers.size() * e + l];
  }
}

void Trainer::Impl::reduce_gradients() {
  // Per-unit sharding: the model's backward already reduce-scattered every unit inside the replica.
  sharded->reduce_gradients();
  if (tp_partial_pieces.empty()) return;
  // q/k norms (and the router of split experts) saw only this rank's heads (expert columns).
  const auto& pieces = sharded->pieces();
  float* at = tp_partial_buffer.data();
  for (const size_t i : tp_partial_pieces) at = std::copy_n(pieces[i].grad, pieces[i].numel, at);
  grid->tp().all_reduce_sum(std::span<float>(tp_partial_buffer));
  at = tp_partial_buffer.data();
  for (const size_t i : tp_partial_pieces) {
    std::copy_n(at, pieces[i].numel, pieces[i].grad);
    at += pieces[i].numel;
  }
}

}  // namespace q3vl::app
