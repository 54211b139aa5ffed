// q3vl forward --model HF_DIR --batch IN.h5 --out OUT.h5: one fp32 forward pass of a Hugging Face
// Qwen3-VL(-MoE) checkpoint on a batch in HF's forward-argument layout; writes logits [B,S,V] and, when the
// batch has labels, the cross-entropy `loss` and the load-balancing `aux_loss` (HF's definitions).
// Non-finite numbers: a NaN/Inf weight is an error naming the tensor before the forward (read_hdf5_batch does
// the same for pixels); a loss that still comes out non-finite (an overflow) is written as JSON null in the
// event line (JSON has no NaN; null keeps the field numeric-or-missing for readers, where a string would not)
// and ends the command with an error naming it, after the output file is written for inspection.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#include "app/cli.h"
#include "app/commands.h"
#include "io/hdf5_batch.h"
#include "io/model_io.h"

namespace q3vl::app {

namespace {

void check_weights_finite(const Model& model, const std::string& dir) {
  const ParamStore& w = model.weights();
  for (size_t i = 0; i < w.size(); ++i) {
    const Tensor& t = w.tensor(i);
    if (t.dtype() != DType::f32) continue;
    const float* p = t.data<float>();
    for (int64_t k = 0; k < t.numel(); ++k)
      Q3VL_CHECK(std::isfinite(p[k]), "forward: checkpoint ", dir, ": tensor ", w.specs()[i].hf_key, " holds ", p[k],
                 " at element ", k, "; every loss would be NaN");
  }
}

// A number for the JSON event line: JSON has no NaN or Infinity.
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.8g", v);
  return buf;
}

}  // namespace

int run_forward(const std::vector<std::string>& args) {
  auto cli = make_command("forward", "One fp32 forward pass of a Hugging Face Qwen3-VL(-MoE) checkpoint on a batch: "
                                    "logits, and the loss and aux_loss when the batch has labels.");
  std::string model_dir, batch_path, out_path;
  cli->add_option("--model", model_dir, "Hugging Face model folder (config.json + safetensors)")->required();
  cli->add_option("--batch", batch_path, "HDF5 batch in HF's forward-argument layout")->required();
  cli->add_option("--out", out_path, "HDF5 file to write logits (and loss, aux_loss) to")->required();
  if (const auto done = parse_command(*cli, args)) return *done;
  const auto t0 = std::chrono::steady_clock::now();
  auto model = io::load_hf_model(model_dir);
  check_weights_finite(*model, model_dir);
  const io::HostBatch host = io::read_hdf5_batch(batch_path, io::batch_limits(model->config()));
  io::BatchTensors tensors(host, DType::f32);
  const BatchPlan plan = plan_batch(model->config(), model->dtype(), tensors.batch());
  Workspace ws(*model, plan.shape);
  const auto t1 = std::chrono::steady_clock::now();
  const ForwardResult r = model->forward(plan, tensors.batch(), ws);
  const double fwd_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

  io::Hdf5Writer out(out_path);
  out.write("logits", r.logits.data<float>(), {host.batch, host.seq_len, model->config().text.vocab_size});
  if (!host.labels.empty()) {
    out.write_scalar("loss", r.ce_loss);
    out.write_scalar("aux_loss", r.aux_loss);
  }
  out.close();
  const double load_s = std::chrono::duration<double>(t1 - t0).count();
  std::printf("forward: %lld x %lld tokens, load %.2f s, forward %.3f s%s\n", (long long)host.batch,
              (long long)host.seq_len, load_s, fwd_s,
              host.labels.empty() ? "" : (", loss " + std::to_string(r.ce_loss) + ", aux_loss " + std::to_string(r.aux_loss)).c_str());
  std::printf("{\"event\":\"forward\",\"tokens\":%lld,\"load_s\":%.4f,\"forward_s\":%.4f,\"loss\":%s,\"aux_loss\":%s}\n",
              (long long)(host.batch * host.seq_len), load_s, fwd_s, json_number(r.ce_loss).c_str(),
              json_number(r.aux_loss).c_str());
  std::printf("wrote %s\n", out_path.c_str());
  std::fflush(stdout);
  Q3VL_CHECK(std::isfinite(r.ce_loss) && std::isfinite(r.aux_loss), "forward: loss ", r.ce_loss, ", aux_loss ",
             r.aux_loss, " on ", batch_path, " is not finite (an overflow in the forward; written as null)");
  return 0;
}

}  // namespace q3vl::app
