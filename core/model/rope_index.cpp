// get_rope_index: HF Qwen3-VL 3-D position ids per document, plus the checks of document boundaries and
// right-padded attention masks.
#include "core/model/rope_index.h"

#include <algorithm>

#include "core/layer_checks.h"

namespace q3vl {

namespace {

constexpr const char* kLayer = "get_rope_index";

// Walks the visual grids in HF order: images one by one, videos frame by frame (t grids (1, h, w)).
class GridCursor {
 public:
  GridCursor(const char* what, const Tensor& grid, int64_t merge) : what_(what), merge_(merge) {
    if (grid.defined()) {
      require(kLayer, what, grid, DType::i64, {-1, 3});
      g_ = grid.data<int64_t>();
      n_ = grid.size(0);
      for (int64_t i = 0; i < n_; ++i) {
        const int64_t t = g_[3 * i], h = g_[3 * i + 1], w = g_[3 * i + 2];
        Q3VL_CHECK(t > 0 && h > 0 && w > 0 && h % merge == 0 && w % merge == 0, kLayer, ": ", what, "[", i,
                   "] = (", t, ", ", h, ", ", w, ") must be positive with h and w multiples of spatial_merge_size ",
                   merge);
      }
    }
  }
  // The next span's merged grid; `per_frame` splits items into t spans of one temporal patch.
  void next(bool per_frame, int64_t start_token, int64_t& t, int64_t& h, int64_t& w) {
    Q3VL_CHECK(item_ < n_, kLayer, ": the visual span at token ", start_token, " has no ", what_,
               " entry left (", n_, " given)");
    const int64_t* g = g_ + 3 * item_;
    t = per_frame ? 1 : g[0];
    h = g[1] / merge_;
    w = g[2] / merge_;
    if (!per_frame || ++frame_ == g[0]) {
      ++item_;
      frame_ = 0;
    }
  }
  void check_used() const {
    Q3VL_CHECK(item_ == n_ && frame_ == 0, kLayer, ": ", what_, " has ", n_, " entries but the tokens use ",
               item_, frame_ ? " and part of the next" : "");
  }

 private:
  const char* what_;
  int64_t merge_;
  const int64_t* g_ = nullptr;
  int64_t n_ = 0, item_ = 0, frame_ = 0;
};

}  // namespace

void check_document_boundaries(const Tensor& cu_seqlens, int64_t batch, int64_t seq) {
  const char* L = "document boundaries";
  require(L, "cu_seqlens", cu_seqlens, DType::i64, {-1});
  const int64_t d = cu_seqlens.size(0) - 1;
  Q3VL_CHECK(d >= 1, L, ": cu_seqlens needs at least 2 entries, got ", d + 1);
  const int64_t* c = cu_seqlens.data<int64_t>();
  Q3VL_CHECK(c[0] == 0 && c[d] == batch * seq, L, ": cu_seqlens must run from 0 to ", batch * seq, ", got ", c[0],
             " .. ", c[d]);
  int64_t next_row_start = seq;
  for (int64_t i = 1; i <= d; ++i) {
    Q3VL_CHECK(c[i] > c[i - 1], L, ": cu_seqlens[", i, "] = ", c[i], " is not above cu_seqlens[", i - 1,
               "] = ", c[i - 1]);
    Q3VL_CHECK(c[i] <= next_row_start, L, ": document ", i - 1, " [", c[i - 1], ", ", c[i],
               ") crosses the row boundary ", next_row_start);
    if (c[i] == next_row_start) next_row_start += seq;
  }
}

void check_attention_mask(const Tensor& attention_mask, const Tensor& cu_seqlens) {
  const char* L = "attention_mask";
  require(L, "attention_mask", attention_mask, DType::i64, {-1, -1});
  const int64_t n = attention_mask.numel();
  const int64_t* m = attention_mask.data<int64_t>();
  const int64_t* c = cu_seqlens.data<int64_t>();
  for (int64_t d = 0; d + 1 < cu_seqlens.numel(); ++d) {
    Q3VL_CHECK(c[d + 1] <= n, L, ": document ", d, " ends at ", c[d + 1], " beyond ", n, " tokens");
    bool padding = false;
    for (int64_t i = c[d]; i < c[d + 1]; ++i) {
      Q3VL_CHECK(m[i] == 0 || m[i] == 1, L, ": value ", m[i], " at flat token ", i, ", expected 0 or 1");
      Q3VL_CHECK(!(padding && m[i] == 1), L, ": real token at flat token ", i,
                 " after padding; only right padding is supported");
      padding = padding || m[i] == 0;
    }
    Q3VL_CHECK(m[c[d]] == 1, L, ": document ", d, " (flat tokens ", c[d], "..", c[d + 1] - 1,
               ") has no real token");
  }
}

void get_rope_index(const ModelConfig& config, const Tensor& input_ids, const Tensor& attention_mask,
                    const Tensor& image_grid_thw, const Tensor& video_grid_thw, const Tensor& cu_seqlens,
                    const Tensor& positions) {
  require(kLayer, "input_ids", input_ids, DType::i64, {-1, -1});
  const int64_t batch = input_ids.size(0), seq = input_ids.size(1), n = batch * seq;
  if (attention_mask.defined()) require(kLayer, "attention_mask", attention_mask, DType::i64, {batch, seq});
  require(kLayer, "positions", positions, DType::i64, {3, n});
  if (cu_seqlens.defined()) check_document_boundaries(cu_seqlens, batch, seq);
  const int64_t merge = config.vision.spatial_merge_size;
  GridCursor images("image_grid_thw", image_grid_thw, merge);
  GridCursor videos("video_grid_thw", video_grid_thw, merge);

  const int64_t* ids = input_ids.data<int64_t>();
  const int64_t* mask = attention_mask.defined() ? attention_mask.data<int64_t>() : nullptr;
  int64_t* pt = positions.data<int64_t>();
  int64_t* ph = pt + n;
  int64_t* pw = pt + 2 * n;
  const bool multimodal = image_grid_thw.defined() || video_grid_thw.defined();
  const int64_t docs = cu_seqlens.defined() ? cu_seqlens.size(0) - 1 : batch;
  const int64_t* cu = cu_seqlens.defined() ? cu_seqlens.data<int64_t>() : nullptr;
  auto kind = [&](int64_t i) {
    return ids[i] == config.image_token_id ? 1 : ids[i] == config.video_token_id ? 2 : 0;
  };

  for (int64_t d = 0; d < docs; ++d) {
    const int64_t begin = cu ? cu[d] : d * seq, end = cu ? cu[d + 1] : (d + 1) * seq;
    if (!multimodal) {
      for (int64_t i = begin; i < end; ++i) pt[i] = ph[i] = pw[i] = i - begin;
      continue;
    }
    // Real tokens are walked in order (padding skipped, as HF indexes the masked row) and grouped in runs.
    int64_t pos = 0;
    int64_t i = begin;
    auto real = [&](int64_t j) { return mask == nullptr || mask[j] != 0; };
    for (int64_t j = begin; j < end; ++j)
      if (!real(j)) pt[j] = ph[j] = pw[j] = 0;
    while (i < end) {
      if (!real(i)) {
        ++i;
        continue;
      }
      const int k = kind(i);
      // The run: consecutive real tokens of kind k (padding tokens in between are skipped like HF does).
      int64_t run = 0;
      int64_t j = i;
      int64_t last = i;
      while (j < end && (!real(j) || kind(j) == k)) {
        if (real(j)) {
          ++run;
          last = j;
        }
        ++j;
      }
      if (k == 0) {
        for (int64_t x = i; x <= last; ++x)
          if (real(x)) {
            pt[x] = ph[x] = pw[x] = pos;
            ++pos;
          }
      } else {
        int64_t t = 0, h = 0, w = 0;
        (k == 1 ? images : videos).next(k == 2, i, t, h, w);
        Q3VL_CHECK(run == t * h * w, kLayer, ": the ", k == 1 ? "image" : "video", " span at flat token ", i,
                   " has ", run, " tokens, but its grid needs ", t * h * w, " (t=", t, ", merged ", h, "x", w, ")");
        int64_t r = 0;
        for (int64_t x = i; x <= last; ++x) {
          if (!real(x)) continue;
          const int64_t tt = r / (h * w), hh = (r / w) % h, ww = r % w;
          pt[x] = pos + tt;
          ph[x] = pos + hh;
          pw[x] = pos + ww;
          ++r;
        }
        pos += std::max(h, w);
      }
      i = last + 1;
    }
  }
  images.check_used();
  videos.check_used();
}

}  // namespace q3vl
