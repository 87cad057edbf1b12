# Sourced by the multi-rank integration tests (after BUILD is set): BIN (the llama3
# binary), OUT (a scratch directory removed on exit), OMP_NUM_THREADS=1 (ranks oversubscribe
# the 2 cores), MPI (the mpirun command; MPI_TIMEOUT seconds, when set, bound a whole job).
# Without mpirun or the parallel command there is nothing to check: the script exits 0.
BIN="$BUILD/llama3"
if ! command -v mpirun >/dev/null || ! { "$BIN" parallel --help 2>&1 || true; } | grep -q mpirun; then
  echo "no mpirun or llama3 parallel: nothing to check"; exit 0
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMP_NUM_THREADS=1
MPI=(mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1)
if [[ -n ${MPI_TIMEOUT:-} ]]; then MPI=(timeout -k 5 "$MPI_TIMEOUT" "${MPI[@]}"); fi
