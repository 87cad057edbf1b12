// Adapts data::MixingLoader (the mixing data loader) to the trainer's BatchSource.
#pragma once

#include "text/data/loader.h"
#include "text/train/trainer.h"

namespace llama3::text {

// Adapts data::MixingLoader to BatchSource.
class LoaderSource : public BatchSource {
 public:
  explicit LoaderSource(const data::LoaderConfig& cfg) : cfg_(cfg), loader_(cfg) {}
  data::Batch next() override { return loader_.next(); }
  nlohmann::json state() const override { return loader_.state(); }
  void restore(const nlohmann::json& s) override { loader_.restore(s); }
  data::MixingLoader& loader() { return loader_; }
  const data::LoaderConfig& loader_config() const { return cfg_; }

 private:
  data::LoaderConfig cfg_;
  data::MixingLoader loader_;
};

}  // namespace llama3::text
