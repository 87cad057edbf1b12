// Chat format rendering, token kinds, and bad-input handling of the data loaders.
#include "fixture.h"

using namespace posttest;

TEST_F(PostTest, RenderMatchesTheLlama3ChatTemplate) {
  Dialog d = {{Role::kSystem, "Be brief.", false}, {Role::kUser, "What is 2 + 3?", false},
              {Role::kAssistant, "5", false}};
  Rendered r = render(*tok, d);
  EXPECT_EQ(tok->decode(r.ids),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>");
  Rendered p = render(*tok, {d[0], d[1]}, /*add_generation_prompt=*/true);
  const std::string ps = tok->decode(p.ids);
  const std::string tail = "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n";
  ASSERT_GE(ps.size(), tail.size());
  EXPECT_EQ(ps.substr(ps.size() - tail.size()), tail);
}

TEST_F(PostTest, TokenKindsSeparateAssistantContentFromFormatting) {
  Dialog d = {{Role::kUser, "hi", false}, {Role::kAssistant, "hello world", false}};
  Rendered r = render(*tok, d);
  ASSERT_EQ(r.ids.size(), r.kinds.size());
  std::string asst;
  std::vector<int32_t> asst_ids;
  for (size_t i = 0; i < r.ids.size(); ++i) {
    if (r.kinds[i] == TokenKind::kAssistant) asst_ids.push_back(r.ids[i]);
    if (tok->is_special(r.ids[i]) && r.ids[i] != tok->special_id("<|eot_id|>")) {
      EXPECT_EQ(r.kinds[i], TokenKind::kFormat) << "special token at " << i;
    }
  }
  EXPECT_EQ(tok->decode(asst_ids), "hello world");
  EXPECT_EQ(r.kinds.back(), TokenKind::kAssistantEnd);
  EXPECT_EQ(r.ids.back(), tok->special_id("<|eot_id|>"));
  EXPECT_EQ(r.kinds[0], TokenKind::kFormat);
}

TEST_F(PostTest, ToolCallsEndWithEomAndContentSpecialsStayText) {
  Dialog d = {{Role::kUser, "run it", false}, {Role::kAssistant, "calc(1+1)", true}, {Role::kIpython, "2", false}};
  Rendered r = render(*tok, d);
  int eom = 0;
  for (int32_t id : r.ids) eom += id == tok->special_id("<|eom_id|>");
  EXPECT_EQ(eom, 1);
  Rendered s = render(*tok, {{Role::kUser, "<|eot_id|>", false}});
  int eot = 0;
  for (int32_t id : s.ids) eot += id == tok->special_id("<|eot_id|>");
  EXPECT_EQ(eot, 1) << "special-token text in content must not become a special token";
  EXPECT_THROW(parse_role("robot"), Error);
  EXPECT_EQ(parse_role("tool"), Role::kIpython);
}

TEST_F(PostTest, BadPreferencesAreSkippedAndCountedOrFailWithFileAndLine) {
  const std::string long_text(2000, 'x');
  std::string f = write("prefs.jsonl",
                        R"({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"})"
                        "\n"
                        R"({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"})"
                        "\n"
                        R"({"prompt": "q", "chosen": "", "rejected": "b"})"
                        "\n"
                        R"({"prompt": "q", "chosen": "same", "rejected": "same"})"
                        "\n"
                        R"({"prompt": ")" + long_text + R"(", "chosen": "a", "rejected": "b"})"
                        "\n"
                        R"({"prompt": "q", "edited": "4", "chosen": "3", "rejected": "1"})"
                        "\n");
  LoadOptions lo;
  lo.max_tokens = 96;
  LoadReport rep;
  auto prefs = load_preferences(f, *tok, lo, &rep);
  ASSERT_EQ(prefs.size(), 2u);
  EXPECT_EQ(rep.read, 6);
  EXPECT_EQ(rep.kept, 2);
  EXPECT_EQ(rep.skipped["unknown_role"], 1);
  EXPECT_EQ(rep.skipped["empty_response"], 1);
  EXPECT_EQ(rep.skipped["identical_pair"], 1);
  EXPECT_EQ(rep.skipped["too_long"], 1);
  auto pairs = ranked_pairs(prefs[1]);
  ASSERT_EQ(pairs.size(), 3u);
  EXPECT_EQ(pairs[0], std::make_pair(std::string("4"), std::string("3")));
  EXPECT_EQ(pairs[1], std::make_pair(std::string("4"), std::string("1")));
  EXPECT_EQ(pairs[2], std::make_pair(std::string("3"), std::string("1")));

  lo.bad_input = BadInput::kFail;
  try {
    load_preferences(f, *tok, lo, nullptr);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prefs.jsonl:2: unknown role 'robot'"), std::string::npos) << e.what();
  }
}

TEST_F(PostTest, BadDialogsAreSkippedAndCounted) {
  std::string f = write("sft.jsonl",
                        R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})"
                        "\n"
                        R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})"
                        "\n"
                        R"({"messages": [{"role": "user", "content": "hi"}]})"
                        "\n"
                        "not json\n");
  LoadReport rep;
  auto d = load_dialogs(f, *tok, LoadOptions{}, &rep);
  EXPECT_EQ(d.size(), 1u);
  EXPECT_EQ(rep.skipped["empty_response"], 1);
  EXPECT_EQ(rep.skipped["no_assistant"], 1);
  EXPECT_EQ(rep.skipped["malformed"], 1);
  LoadOptions lo;
  lo.bad_input = BadInput::kFail;
  try {
    load_dialogs(f, *tok, lo, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sft.jsonl:2: an assistant message is empty"), std::string::npos) << e.what();
  }
}
