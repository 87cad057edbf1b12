// Version string of the build, shown by `llama3 --version` and written into checkpoints.
namespace llama3 {
const char* version() { return "0.1.0"; }
}  // namespace llama3
