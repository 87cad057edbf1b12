// safetensors reading and writing (the HF format: 8-byte little-endian header length, a
// JSON header of name -> {dtype, shape, data_offsets}, then the raw data). Reads validate
// every offset and size and name the file and tensor at fault.
#pragma once

#include <map>
#include <string>

#include "runtime/core/tensor.h"

namespace llama3::io {

using TensorMap = std::map<std::string, Tensor>;

// Writes tensors (converted to host, contiguous) with optional string metadata.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});
// Reads all tensors of a file onto the host.
TensorMap load_safetensors(const std::string& path,
                           std::map<std::string, std::string>* metadata = nullptr);

}  // namespace llama3::io
