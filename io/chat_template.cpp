// Qwen3-VL chat template and caption mode: messages + vision grids -> token ids and labels.
#include "io/chat_template.h"

#include <cstdio>
#include <functional>

namespace q3vl::io {

const char* skip_reason_name(SkipReason reason) {
  switch (reason) {
    case SkipReason::bad_json: return "bad_json";
    case SkipReason::unknown_role: return "unknown_role";
    case SkipReason::empty_assistant: return "empty_assistant";
    case SkipReason::tag_mismatch: return "tag_mismatch";
    case SkipReason::missing_media: return "missing_media";
    case SkipReason::corrupt_media: return "corrupt_media";
    case SkipReason::too_long: return "too_long";
  }
  return "unknown";
}

SpecialTokenIds SpecialTokenIds::from(const Tokenizer& tokenizer) {
  return SpecialTokenIds{tokenizer.token_id("<|im_start|>"),     tokenizer.token_id("<|im_end|>"),
                         tokenizer.token_id("<|endoftext|>"),    tokenizer.token_id("<|vision_start|>"),
                         tokenizer.token_id("<|vision_end|>"),   tokenizer.token_id("<|image_pad|>"),
                         tokenizer.token_id("<|video_pad|>")};
}

int64_t vision_token_count(const VisionGrid& grid) {
  Q3VL_CHECK(grid.t > 0 && grid.h > 0 && grid.w > 0 && grid.h % 2 == 0 && grid.w % 2 == 0,
             "chat template: vision grid (", grid.t, ", ", grid.h, ", ", grid.w,
             ") must be positive with even h and w (2x2 merge)");
  return static_cast<int64_t>(grid.t) * grid.h * grid.w / 4;
}

void check_chat_roles(const std::vector<ChatMessage>& messages) {
  bool has_assistant = false;
  for (const ChatMessage& m : messages) {
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      throw SampleError(SkipReason::unknown_role, "unknown role '" + m.role + "'");
    if (m.role == "assistant") {
      if (m.content.empty()) throw SampleError(SkipReason::empty_assistant, "empty assistant turn");
      has_assistant = true;
    }
  }
  if (!has_assistant) throw SampleError(SkipReason::empty_assistant, "no assistant turn");
}

namespace {

// Receives the template's output in order: text pieces (labelled or not) and special tokens.
struct TemplateSink {
  std::function<void(std::string_view text, bool labelled)> text;
  std::function<void(int32_t id, bool labelled)> special;
  std::function<void()> item_start;  // called right before the first pad token of each item
};

// "<t.t seconds>" exactly as Python's f"<{t:.1f} seconds>" (both round the exact binary value).
std::string timestamp_text(double seconds) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "<%.1f seconds>", seconds);
  return buf;
}

void emit_item(const SpecialTokenIds& ids, const VisionGrid& grid, const TemplateSink& sink) {
  const int64_t per_patch = static_cast<int64_t>(grid.h) * grid.w / 4;
  vision_token_count(grid);
  if (grid.kind == VisionKind::image) {
    Q3VL_CHECK(grid.t == 1, "chat template: an image has grid t == 1, got ", grid.t);
    sink.special(ids.vision_start, false);
    sink.item_start();
    for (int64_t i = 0; i < per_patch; ++i) sink.special(ids.image_pad, false);
    sink.special(ids.vision_end, false);
    return;
  }
  Q3VL_CHECK(static_cast<int32_t>(grid.timestamps.size()) == grid.t, "chat template: a video with grid t = ",
             grid.t, " needs ", grid.t, " timestamps, got ", grid.timestamps.size());
  for (int32_t f = 0; f < grid.t; ++f) {
    sink.text(timestamp_text(grid.timestamps[f]), false);
    sink.special(ids.vision_start, false);
    if (f == 0) sink.item_start();
    for (int64_t i = 0; i < per_patch; ++i) sink.special(ids.video_pad, false);
    sink.special(ids.vision_end, false);
  }
}

// Content with its <image>/<video> tags replaced by the next items of each list.
void emit_content(const SpecialTokenIds& ids, std::string_view content, bool labelled,
                  const std::vector<VisionGrid>& images, const std::vector<VisionGrid>& videos, size_t& next_image,
                  size_t& next_video, const TemplateSink& sink) {
  static constexpr std::string_view kImageTag = "<image>", kVideoTag = "<video>";
  size_t pos = 0;
  for (;;) {
    const size_t image_at = content.find(kImageTag, pos), video_at = content.find(kVideoTag, pos);
    const size_t at = std::min(image_at, video_at);
    if (at > pos) sink.text(content.substr(pos, std::min(at, content.size()) - pos), labelled);
    if (at == std::string_view::npos) return;
    const bool is_image = at == image_at;
    if (is_image) {
      if (next_image >= images.size())
        throw SampleError(SkipReason::tag_mismatch, "more <image> tags than images (" +
                                                        std::to_string(images.size()) + ")");
      emit_item(ids, images[next_image++], sink);
    } else {
      if (next_video >= videos.size())
        throw SampleError(SkipReason::tag_mismatch, "more <video> tags than videos (" +
                                                        std::to_string(videos.size()) + ")");
      emit_item(ids, videos[next_video++], sink);
    }
    pos = at + (is_image ? kImageTag.size() : kVideoTag.size());
  }
}

void emit_chat(const SpecialTokenIds& ids, const std::vector<ChatMessage>& messages,
               const std::vector<VisionGrid>& images, const std::vector<VisionGrid>& videos,
               const TemplateSink& sink) {
  check_chat_roles(messages);
  size_t next_image = 0, next_video = 0;
  for (const ChatMessage& m : messages) {
    const bool assistant = m.role == "assistant";
    sink.special(ids.im_start, false);
    sink.text(m.role + "\n", false);
    emit_content(ids, m.content, assistant, images, videos, next_image, next_video, sink);
    sink.special(ids.im_end, assistant);
    sink.text("\n", false);
  }
  if (next_image != images.size() || next_video != videos.size())
    throw SampleError(SkipReason::tag_mismatch, std::to_string(next_image) + " <image> tags for " +
                                                    std::to_string(images.size()) + " images, " +
                                                    std::to_string(next_video) + " <video> tags for " +
                                                    std::to_string(videos.size()) + " videos");
}

// Collects ids and labels; text is buffered until the next special token so that every piece is encoded
// exactly as the tokenizer cuts the whole rendered string.
class TokenBuilder {
 public:
  TokenBuilder(const Tokenizer& tokenizer, TemplateOutput& out) : tokenizer_(tokenizer), out_(out) {}

  TemplateSink sink() {
    return TemplateSink{[this](std::string_view text, bool labelled) { add_text(text, labelled); },
                        [this](int32_t id, bool labelled) { add_special(id, labelled); },
                        [this] { out_.item_token_offsets.push_back(static_cast<int64_t>(out_.tokens.size())); }};
  }

  void flush() {
    if (pending_.empty()) return;
    const std::vector<int32_t> ids = tokenizer_.encode(pending_);
    size_t unlabelled = ids.size();
    if (label_from_ == 0) {
      unlabelled = 0;
    } else if (label_from_ != std::string::npos) {
      // Tokens of the unlabelled prefix that survive unchanged in the joint encoding stay unlabelled; the
      // first token that differs straddles the boundary and carries content, so it is labelled.
      const std::vector<int32_t> prefix = tokenizer_.encode(std::string_view(pending_).substr(0, label_from_));
      unlabelled = 0;
      while (unlabelled < prefix.size() && unlabelled < ids.size() && ids[unlabelled] == prefix[unlabelled])
        ++unlabelled;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      out_.tokens.push_back(ids[i]);
      out_.labels.push_back(i < unlabelled ? kIgnoreLabel : ids[i]);
    }
    pending_.clear();
    label_from_ = std::string::npos;
  }

 private:
  void add_text(std::string_view text, bool labelled) {
    if (labelled && label_from_ == std::string::npos) label_from_ = pending_.size();
    Q3VL_CHECK(labelled || label_from_ == std::string::npos,
               "chat template: unlabelled text after labelled text in one piece");
    pending_ += text;
  }
  void add_special(int32_t id, bool labelled) {
    flush();
    out_.tokens.push_back(id);
    out_.labels.push_back(labelled ? id : kIgnoreLabel);
  }

  const Tokenizer& tokenizer_;
  TemplateOutput& out_;
  std::string pending_;
  size_t label_from_ = std::string::npos;
};

}  // namespace

ChatTemplate::ChatTemplate(const Tokenizer& tokenizer) : tokenizer_(tokenizer), ids_(SpecialTokenIds::from(tokenizer)) {}

TemplateOutput ChatTemplate::apply(const std::vector<ChatMessage>& messages, const std::vector<VisionGrid>& images,
                                   const std::vector<VisionGrid>& videos) const {
  for (const VisionGrid& g : images)
    Q3VL_CHECK(g.kind == VisionKind::image, "chat template: an item of the images list is a video");
  for (const VisionGrid& g : videos)
    Q3VL_CHECK(g.kind == VisionKind::video, "chat template: an item of the videos list is an image");
  TemplateOutput out;
  TokenBuilder builder(tokenizer_, out);
  emit_chat(ids_, messages, images, videos, builder.sink());
  builder.flush();
  return out;
}

TemplateOutput ChatTemplate::caption(const VisionGrid& image, std::string_view caption) const {
  Q3VL_CHECK(image.kind == VisionKind::image, "chat template: caption mode takes an image");
  if (caption.empty()) throw SampleError(SkipReason::empty_assistant, "empty caption");
  TemplateOutput out;
  TokenBuilder builder(tokenizer_, out);
  const TemplateSink sink = builder.sink();
  emit_item(ids_, image, sink);
  sink.text(caption, true);
  sink.special(ids_.endoftext, true);
  builder.flush();
  return out;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, const std::vector<VisionGrid>& images,
                                 const std::vector<VisionGrid>& videos) const {
  std::string text;
  const TemplateSink sink{[&](std::string_view piece, bool) { text += piece; },
                          [&](int32_t id, bool) { text += tokenizer_.token(id); }, [] {}};
  emit_chat(ids_, messages, images, videos, sink);
  return text;
}

}  // namespace q3vl::io
