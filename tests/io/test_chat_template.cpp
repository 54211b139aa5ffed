// Chat template: structure of the token stream (roles, vision spans, video timestamps), labels on assistant
// turns only, caption mode, and the sample errors the packer counts.
#include <gtest/gtest.h>

#include "io/chat_template.h"
#include "tests/support/gradcheck.h"

namespace q3vl::io {
namespace {

const Tokenizer& qwen_tokenizer() {
  static const Tokenizer tok = Tokenizer::load(std::string(Q3VL_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json");
  return tok;
}

std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(ChatTemplate, TextConversationTokensAndLabels) {
  const Tokenizer& tok = qwen_tokenizer();
  const ChatTemplate chat(tok);
  const TemplateOutput out = chat.apply({{"system", "Be brief."}, {"user", "Hi there"}, {"assistant", "Hello!"}}, {}, {});
  const SpecialTokenIds& id = chat.ids();
  EXPECT_EQ(id.im_start, 151644);
  EXPECT_EQ(id.im_end, 151645);
  const std::vector<int32_t> header = tok.encode("assistant\n"), content = tok.encode("Hello!");
  const std::vector<int32_t> expected =
      concat({{id.im_start}, tok.encode("system\nBe brief."), {id.im_end}, tok.encode("\n"), {id.im_start},
              tok.encode("user\nHi there"), {id.im_end}, tok.encode("\n"), {id.im_start}, tok.encode("assistant\nHello!"),
              {id.im_end}, tok.encode("\n")});
  EXPECT_EQ(out.tokens, expected);
  // The whole rendered string encodes to the same ids (pieces are cut where the tokenizer cuts).
  EXPECT_EQ(tok.encode(chat.render({{"system", "Be brief."}, {"user", "Hi there"}, {"assistant", "Hello!"}}, {}, {})),
            expected);
  ASSERT_EQ(out.labels.size(), out.tokens.size());
  // Labelled: exactly the assistant content and its <|im_end|>.
  const size_t content_start = expected.size() - 2 - content.size();
  for (size_t i = 0; i < out.tokens.size(); ++i) {
    const bool labelled = i >= content_start && i < expected.size() - 1;
    EXPECT_EQ(out.labels[i], labelled ? out.tokens[i] : kIgnoreLabel) << "token " << i;
  }
  EXPECT_EQ(out.tokens[expected.size() - 2], id.im_end);
}

TEST(ChatTemplate, ImageSpanAndMultiTurnLabels) {
  const Tokenizer& tok = qwen_tokenizer();
  const ChatTemplate chat(tok);
  const VisionGrid image{VisionKind::image, 1, 4, 6, {}};  // 6 tokens
  const TemplateOutput out = chat.apply(
      {{"user", "<image>What?"}, {"assistant", "A cat."}, {"user", "Sure?"}, {"assistant", "Yes."}}, {image}, {});
  const SpecialTokenIds& id = chat.ids();
  ASSERT_EQ(out.item_token_offsets.size(), 1u);
  const int64_t at = out.item_token_offsets[0];
  EXPECT_EQ(out.tokens[at - 1], id.vision_start);
  for (int k = 0; k < 6; ++k) EXPECT_EQ(out.tokens[at + k], id.image_pad);
  EXPECT_EQ(out.tokens[at + 6], id.vision_end);
  EXPECT_EQ(vision_token_count(image), 6);
  const std::string rendered = chat.render(
      {{"user", "<image>What?"}, {"assistant", "A cat."}, {"user", "Sure?"}, {"assistant", "Yes."}}, {image}, {});
  EXPECT_EQ(tok.encode(rendered), out.tokens);
  // Labelled tokens decode to both assistant turns with their <|im_end|>.
  std::vector<int32_t> labelled;
  for (size_t i = 0; i < out.tokens.size(); ++i)
    if (out.labels[i] != kIgnoreLabel) labelled.push_back(out.labels[i]);
  EXPECT_EQ(tok.decode(labelled), "A cat.<|im_end|>Yes.<|im_end|>");
}

TEST(ChatTemplate, VideoTimestampsPerTemporalPatch) {
  const Tokenizer& tok = qwen_tokenizer();
  const ChatTemplate chat(tok);
  const VisionGrid video{VisionKind::video, 3, 2, 4, {0.25, 1.25, 2.05}};  // 2 tokens per temporal patch
  const std::vector<ChatMessage> msgs{{"user", "<video>Why?"}, {"assistant", "Fun."}};
  const std::string rendered = chat.render(msgs, {}, {video});
  EXPECT_EQ(rendered,
            "<|im_start|>user\n<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
            "<1.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
            "<2.0 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>Why?<|im_end|>\n"
            "<|im_start|>assistant\nFun.<|im_end|>\n");
  const TemplateOutput out = chat.apply(msgs, {}, {video});
  EXPECT_EQ(out.tokens, tok.encode(rendered));
  ASSERT_EQ(out.item_token_offsets.size(), 1u);
  EXPECT_EQ(out.tokens[out.item_token_offsets[0]], chat.ids().video_pad);
  EXPECT_EQ(out.tokens[out.item_token_offsets[0] - 1], chat.ids().vision_start);
}

TEST(ChatTemplate, CaptionMode) {
  const Tokenizer& tok = qwen_tokenizer();
  const ChatTemplate chat(tok);
  const TemplateOutput out = chat.caption(VisionGrid{VisionKind::image, 1, 2, 2, {}}, "A red square.");
  const SpecialTokenIds& id = chat.ids();
  const std::vector<int32_t> expected = concat({{id.vision_start, id.image_pad, id.vision_end},
                                                tok.encode("A red square."), {id.endoftext}});
  EXPECT_EQ(out.tokens, expected);
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(out.labels[i], i < 3 ? kIgnoreLabel : expected[i]);
  EXPECT_EQ(out.item_token_offsets, std::vector<int64_t>{1});
}

TEST(ChatTemplate, StraddlingTokenIsLabelled) {
  // Content that starts with a newline merges with the header's newline into one token ("\n\n").
  const Tokenizer& tok = qwen_tokenizer();
  const ChatTemplate chat(tok);
  const TemplateOutput out = chat.apply({{"user", "x"}, {"assistant", "\nok"}}, {}, {});
  const std::vector<int32_t> joint = tok.encode("assistant\n\nok");
  const std::vector<int32_t> header = tok.encode("assistant\n");
  ASSERT_NE(std::vector<int32_t>(joint.begin(), joint.begin() + header.size()), header);
  std::vector<int32_t> labelled;
  for (int32_t l : out.labels)
    if (l != kIgnoreLabel) labelled.push_back(l);
  EXPECT_EQ(labelled.back(), chat.ids().im_end);
  EXPECT_NE(tok.decode(labelled).find("ok"), std::string::npos);
}

SkipReason reason_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const SampleError& e) {
    return e.reason();
  }
  ADD_FAILURE() << "no SampleError thrown";
  return SkipReason::bad_json;
}

TEST(ChatTemplate, SampleErrors) {
  const ChatTemplate chat(qwen_tokenizer());
  const VisionGrid image{VisionKind::image, 1, 2, 2, {}};
  EXPECT_EQ(reason_of([&] { chat.apply({{"robot", "hi"}, {"assistant", "x"}}, {}, {}); }), SkipReason::unknown_role);
  EXPECT_EQ(reason_of([&] { chat.apply({{"user", "hi"}, {"assistant", ""}}, {}, {}); }), SkipReason::empty_assistant);
  EXPECT_EQ(reason_of([&] { chat.apply({{"user", "hi"}}, {}, {}); }), SkipReason::empty_assistant);
  EXPECT_EQ(reason_of([&] { chat.apply({{"user", "<image><image>"}, {"assistant", "x"}}, {image}, {}); }),
            SkipReason::tag_mismatch);
  EXPECT_EQ(reason_of([&] { chat.apply({{"user", "no tag"}, {"assistant", "x"}}, {image}, {}); }),
            SkipReason::tag_mismatch);
  EXPECT_EQ(reason_of([&] { chat.caption(image, ""); }), SkipReason::empty_assistant);
  test::expect_error([&] { chat.apply({{"user", "<image>"}, {"assistant", "x"}}, {{VisionKind::image, 1, 3, 2, {}}}, {}); },
                     "even h and w");
}

}  // namespace
}  // namespace q3vl::io
