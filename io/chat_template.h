// Qwen3-VL chat template: turns a sample in the messages format (roles, content with <image>/<video> tags)
// plus the grids of its vision items into token ids and labels, exactly as the Hugging Face processor
// expands the chat template (SPEC "Processor"), and a plain image-caption mode.
//
// Chat: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, no default system prompt. An image tag
// becomes `<|vision_start|><|image_pad|>*n<|vision_end|>` (n = t*h*w/4); a video tag becomes, per temporal
// patch, `<t.t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` with t the pair's mean timestamp.
// Labels equal the ids on assistant turns (content and `<|im_end|>`, not the header or the trailing
// newline), -100 elsewhere and on every vision token. Labels are not shifted (the loss shifts).
// Caption: `<|vision_start|><|image_pad|>*n<|vision_end|>{caption}<|endoftext|>`, loss on caption and
// `<|endoftext|>`.
//
// Text is encoded in the pieces the tokenizer sees anyway (special tokens cut the text), except that an
// assistant header and its content are encoded together, as in the rendered string: a token that straddles
// "assistant\n" and the content (content starting with a newline) is labelled.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/check.h"
#include "io/tokenizer.h"

namespace q3vl::io {

constexpr int32_t kIgnoreLabel = -100;

// Why a sample is skipped by `q3vl pack` (the summary counts each and names the sample).
enum class SkipReason {
  bad_json,        // the line or record is not valid JSON or lacks the messages structure
  unknown_role,    // a role other than system, user, assistant
  empty_assistant, // an assistant turn with empty content, or no assistant turn at all
  tag_mismatch,    // <image>/<video> tag count differs from the images/videos list
  missing_media,   // an image or video file that does not exist
  corrupt_media,   // an image or video that fails to decode or resize
  too_long,        // more tokens than the sequence budget
};
constexpr int kNumSkipReasons = 7;
const char* skip_reason_name(SkipReason reason);

// A sample-level problem: the packer skips the sample and counts it under `reason`.
class SampleError : public Error {
 public:
  SampleError(SkipReason reason, const std::string& message) : Error(message), reason_(reason) {}
  SkipReason reason() const { return reason_; }

 private:
  SkipReason reason_;
};

struct ChatMessage {
  std::string role;     // system, user or assistant
  std::string content;  // text with <image> / <video> tags
};

enum class VisionKind : uint8_t { image = 0, video = 1 };

// What the template needs of one vision item: its patch grid and, for videos, one timestamp (seconds) per
// temporal patch.
struct VisionGrid {
  VisionKind kind = VisionKind::image;
  int32_t t = 1, h = 0, w = 0;  // grid_thw in 16x16 patches (h, w even)
  std::vector<double> timestamps;
};

struct TemplateOutput {
  std::vector<int32_t> tokens;
  std::vector<int32_t> labels;
  // Per vision item (in order), the index in `tokens` of its first pad token.
  std::vector<int64_t> item_token_offsets;
};

// The ids of the template's special tokens, looked up by spelling in the tokenizer.
struct SpecialTokenIds {
  int32_t im_start, im_end, endoftext, vision_start, vision_end, image_pad, video_pad;
  static SpecialTokenIds from(const Tokenizer& tokenizer);
};

// Throws SampleError for an unknown role (unknown_role), an empty assistant turn or no assistant turn at all
// (empty_assistant). The template and the packer's early checks share it.
void check_chat_roles(const std::vector<ChatMessage>& messages);

class ChatTemplate {
 public:
  explicit ChatTemplate(const Tokenizer& tokenizer);

  // Chat mode. Items are consumed by the <image> and <video> tags in message order, each kind from its own
  // list (`images`, `videos`). Throws SampleError for an unknown role, an empty or missing assistant turn,
  // or a tag/list count mismatch.
  TemplateOutput apply(const std::vector<ChatMessage>& messages, const std::vector<VisionGrid>& images,
                       const std::vector<VisionGrid>& videos) const;
  // Caption mode: one image, then the caption (SampleError empty_assistant when the caption is empty).
  TemplateOutput caption(const VisionGrid& image, std::string_view caption) const;

  // The rendered text of apply() (vision pads expanded), for reference comparisons and debugging.
  std::string render(const std::vector<ChatMessage>& messages, const std::vector<VisionGrid>& images,
                     const std::vector<VisionGrid>& videos) const;

  const SpecialTokenIds& ids() const { return ids_; }

 private:
  const Tokenizer& tokenizer_;
  SpecialTokenIds ids_;
};

// Tokens one item occupies in the sequence (pads only): t*h*w/4.
int64_t vision_token_count(const VisionGrid& grid);

}  // namespace q3vl::io
