#!/usr/bin/env bash
# Creates benchmarks/.venv-peer with TransformerLens and PEFT for the peer side of the benchmark suite.
# The venv sees the main environment's packages (torch 2.13 CPU, transformers, numpy) so nothing
# is downloaded twice; what TransformerLens needs on top is installed into the venv only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-peer"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "torch==2.13.0" transformer-lens accelerate peft
"$venv/bin/python" -c "import transformer_lens, peft, torch; print('peer venv ready: torch', torch.__version__, 'peft', peft.__version__)"
