// The 256 Llama 3 special tokens, placed at ids n_base .. n_base+255 after the BPE ranks
// (128000..128255 for the real 128K vocabulary). Names and order follow Meta's reference.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace llama3::text {

inline constexpr size_t kNumSpecialTokens = 256;

// Index k is the name of id n_base + k: <|begin_of_text|>, <|end_of_text|>,
// <|reserved_special_token_0|>, <|reserved_special_token_1|>, <|finetune_right_pad_id|>,
// <|step_id|>, <|start_header_id|>, <|end_header_id|>, <|eom_id|>, <|eot_id|>,
// <|python_tag|>, then <|reserved_special_token_2|> .. <|reserved_special_token_246|>.
std::vector<std::string> llama3_special_names();

}  // namespace llama3::text
