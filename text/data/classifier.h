// A fastText-style text classifier for curation (paper 3.1.1, "model-based quality
// filtering", language identification, domain labels): the features of a text are hashed
// word unigrams, word bigrams and character n-grams of each word; a linear layer over their
// mean gives logits, softmax gives label probabilities, and plain SGD on the cross-entropy
// trains it. Small (buckets x labels floats), fast (a hash per feature), no dependencies.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llama3::data {

struct ClassifierOptions {
  int buckets_log2 = 18;           // feature hash table size 2^k
  int char_min = 3, char_max = 5;  // character n-gram lengths (of "<word>")
  bool word_bigrams = true;
  int epochs = 5;
  double lr = 0.5;
  uint64_t seed = 1;
};

struct LabelledText {
  std::string text, label;
};

class HashedClassifier {
 public:
  // Trains on the examples; the label set is the distinct labels in order of appearance.
  static HashedClassifier train(const std::vector<LabelledText>& data,
                                const ClassifierOptions& opts = {});
  // Loads labelled examples from JSONL lines {"text": ..., "label": ...}; errors name file:line.
  static std::vector<LabelledText> read_examples(const std::string& path);
  // Binary model file (magic "L3HCLF1\0", options, labels, weights); errors name the file.
  static HashedClassifier load(const std::string& path);
  void save(const std::string& path) const;

  std::vector<double> predict(std::string_view text) const;  // probabilities per label
  // Best label and its probability.
  std::pair<std::string, double> top(std::string_view text) const;
  const std::vector<std::string>& labels() const { return labels_; }
  int label_index(std::string_view label) const;  // -1 if unknown
  // Fraction of examples whose top label is their label.
  double accuracy(const std::vector<LabelledText>& data) const;

 private:
  std::vector<uint32_t> features(std::string_view text) const;
  ClassifierOptions o_;
  std::vector<std::string> labels_;
  std::vector<float> w_;  // (buckets, labels)
};

}  // namespace llama3::data
