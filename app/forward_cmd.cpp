// q3vl forward --model HF_DIR --batch IN.h5 --out OUT.h5: one fp32 forward pass of a Hugging Face
// Qwen3-VL(-MoE) checkpoint on a batch in HF's forward-argument layout; writes logits [B,S,V] and, when the
// batch has labels, the cross-entropy `loss` and the load-balancing `aux_loss` (HF's definitions).
#include <chrono>
#include <cstdio>

#include "app/cli_args.h"
#include "app/commands.h"
#include "io/hdf5_batch.h"
#include "io/model_io.h"

namespace q3vl::app {

int run_forward(const std::vector<std::string>& args) {
  const CliArgs a(args, "forward", {"--model", "--batch", "--out"}, {});
  const std::string model_dir = a.required("--model"), batch_path = a.required("--batch"), out_path = a.required("--out");
  const auto t0 = std::chrono::steady_clock::now();
  auto model = io::load_hf_model(model_dir);
  const io::HostBatch host = io::read_hdf5_batch(batch_path, io::batch_limits(model->config()));
  io::BatchTensors tensors(host, DType::f32);
  Workspace ws(*model, BatchShape::of(tensors.batch()));
  const auto t1 = std::chrono::steady_clock::now();
  const ForwardResult r = model->forward(tensors.batch(), ws);
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
  std::printf("{\"event\":\"forward\",\"tokens\":%lld,\"load_s\":%.4f,\"forward_s\":%.4f,\"loss\":%.8g,\"aux_loss\":%.8g}\n",
              (long long)(host.batch * host.seq_len), load_s, fwd_s, r.ce_loss, r.aux_loss);
  std::printf("wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace q3vl::app
