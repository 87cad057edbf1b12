#include "runtime/dist/parallel_dims.h"

namespace llama3::dist {

std::string ParallelDims::str() const {
  return fmt::format("dp_replicate {} x dp_shard {} x cp {} x tp {} x pp {}", dp_replicate, dp_shard, cp, tp, pp);
}

ParallelDims ParallelDims::parse(const std::string& spec) {
  ParallelDims d;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    LLAMA3_CHECK(eq != std::string::npos, "parallel layout '{}': item '{}' is not key=degree", spec, item);
    const std::string key = item.substr(0, eq), val = item.substr(eq + 1);
    int v = 0;
    try {
      size_t used = 0;
      v = std::stoi(val, &used);
      LLAMA3_CHECK(used == val.size(), "trailing characters");
    } catch (const std::exception&) {
      fail("parallel layout '{}': degree '{}' of {} is not an integer", spec, val, key);
    }
    int* slot = key == "dp_replicate" ? &d.dp_replicate
                : key == "dp_shard"   ? &d.dp_shard
                : key == "cp"         ? &d.cp
                : key == "tp"         ? &d.tp
                : key == "pp"         ? &d.pp
                                      : nullptr;
    LLAMA3_CHECK(slot, "parallel layout '{}': unknown key '{}' (keys: dp_replicate, dp_shard, cp, tp, pp)", spec,
                 key);
    LLAMA3_CHECK(v >= 1, "parallel layout '{}': {} must be >= 1, got {}", spec, key, v);
    *slot = v;
  }
  return d;
}

void ParallelDims::validate(int world) const {
  for (auto [name, v] : {std::pair{"dp_replicate", dp_replicate}, std::pair{"dp_shard", dp_shard},
                         std::pair{"cp", cp}, std::pair{"tp", tp}, std::pair{"pp", pp}})
    LLAMA3_CHECK(v >= 1, "parallel dims: {} must be >= 1, got {}", name, v);
  LLAMA3_CHECK(world_size() == world, "parallel dims: {} = {} != world size {}", str(), world_size(), world);
}

void validate_for_model(const ParallelDims& d, const ModelShape& m) {
  LLAMA3_CHECK(m.n_heads % d.tp == 0, "parallel dims: n_heads {} is not divisible by tp {}", m.n_heads, d.tp);
  LLAMA3_CHECK(m.n_kv_heads % d.tp == 0, "parallel dims: n_kv_heads {} is not divisible by tp {}", m.n_kv_heads,
               d.tp);
  LLAMA3_CHECK(m.ffn_hidden % d.tp == 0, "parallel dims: ffn_hidden {} is not divisible by tp {}", m.ffn_hidden,
               d.tp);
  LLAMA3_CHECK(m.vocab % d.tp == 0, "parallel dims: vocab {} is not divisible by tp {}", m.vocab, d.tp);
  const int64_t stages = int64_t(d.pp) * m.virtual_stages;
  // First and last stage may hold one layer fewer: stages * ceil(L / stages) - L <= 2.
  LLAMA3_CHECK(m.n_layers >= stages, "parallel dims: {} layers cannot fill pp {} x virtual stages {} = {} stages",
               m.n_layers, d.pp, m.virtual_stages, stages);
  const int64_t per = (m.n_layers + stages - 1) / stages;
  LLAMA3_CHECK(stages == 1 || per * stages - m.n_layers <= 2,
               "parallel dims: {} layers are not divisible across pp {} x virtual stages {} = {} stages "
               "({} x {} = {}; only the first and last stage may hold one layer fewer)",
               m.n_layers, d.pp, m.virtual_stages, stages, stages, per, per * stages);
  if (m.seq_len > 0)
    LLAMA3_CHECK(m.seq_len % d.seq_len_divisor() == 0, "parallel dims: seq {} is not divisible by 2 x cp {} = {}",
                 m.seq_len, d.cp, d.seq_len_divisor());
  if (m.global_batch > 0) {
    LLAMA3_CHECK(m.global_batch % (int64_t(d.dp()) * m.microbatches) == 0,
                 "parallel dims: global batch {} is not divisible by dp {} (dp_replicate {} x dp_shard {}) x "
                 "micro-batches {} = {}",
                 m.global_batch, d.dp(), d.dp_replicate, d.dp_shard, m.microbatches, int64_t(d.dp()) * m.microbatches);
  }
  LLAMA3_CHECK(m.microbatches >= 1, "parallel dims: micro-batches must be >= 1, got {}", m.microbatches);
  if (d.pp > 1 && m.virtual_stages > 1)
    LLAMA3_CHECK(m.microbatches % d.pp == 0,
                 "parallel dims: interleaved 1F1B needs micro-batches {} divisible by pp {}", m.microbatches, d.pp);
}

Coords coords_of(const ParallelDims& d, int rank) {
  Coords c;
  c.tp = rank % d.tp;
  rank /= d.tp;
  c.cp = rank % d.cp;
  rank /= d.cp;
  c.dp_shard = rank % d.dp_shard;
  rank /= d.dp_shard;
  c.dp_replicate = rank % d.dp_replicate;
  rank /= d.dp_replicate;
  c.pp = rank;
  return c;
}

int rank_of(const ParallelDims& d, const Coords& c) {
  return c.tp + d.tp * (c.cp + d.cp * (c.dp_shard + d.dp_shard * (c.dp_replicate + d.dp_replicate * c.pp)));
}

ProcessGroups make_process_groups(const ParallelDims& d, std::shared_ptr<Communicator> world) {
  d.validate(world->size());
  ProcessGroups g;
  g.dims = d;
  g.world = world;
  const int r = world->rank();
  g.coords = coords_of(d, r);
  // A group = the ranks that agree on every other coordinate: color = rank with this
  // coordinate zeroed; key = the coordinate itself (its rank inside the group).
  auto group = [&](int Coords::*field, const char* name) {
    Coords c = g.coords;
    const int key = c.*field;
    c.*field = 0;
    return world->split(rank_of(d, c), key, name);
  };
  g.tp = group(&Coords::tp, "tp");
  g.cp = group(&Coords::cp, "cp");
  g.dp_shard = group(&Coords::dp_shard, "dp_shard");
  g.dp_replicate = group(&Coords::dp_replicate, "dp_replicate");
  g.pp = group(&Coords::pp, "pp");
  {
    Coords c = g.coords;
    const int key = c.dp_replicate * d.dp_shard + c.dp_shard;
    c.dp_replicate = c.dp_shard = 0;
    g.dp = world->split(rank_of(d, c), key, "dp");
  }
  return g;
}

}  // namespace llama3::dist
