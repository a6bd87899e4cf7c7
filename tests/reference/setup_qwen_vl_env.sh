#!/usr/bin/env bash
# Builds the reference environment that runs the ORIGINAL Qwen-VL-Chat remote code (written for
# transformers 4.32), used only to record the parity fixtures in tests/fixtures/qwen_vl/.
# CI never needs it: the tests compare against the committed fixtures.
#
#   bash tests/reference/setup_qwen_vl_env.sh [ENV_DIR]        # default: ../qwen-vl-refenv
#
# Needs python3.11 (tokenizers 0.13.3 has no wheels for 3.12+) and the project's own environment
# already installed (torch is borrowed from it through a .pth file instead of a second download;
# both environments must use the same torch so that the seeded weights are identical).
set -euo pipefail
env_dir=${1:-$(cd "$(dirname "$0")/../.." && pwd)/../qwen-vl-refenv}
python3.11 -m venv "$env_dir"
torch_site=$(python3 -c "import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)")
site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Appended after the venv's own site-packages, so the venv's older packages win over the project's.
echo "$torch_site" > "$site/zz_project_torch.pth"
"$env_dir/bin/python" -m pip install -q \
  transformers==4.32.1 tokenizers==0.13.3 huggingface_hub==0.17.3 safetensors peft==0.6.2 \
  accelerate==0.24.1 tiktoken einops transformers_stream_generator==0.0.4 "numpy<2" "matplotlib<3.9" pillow
"$env_dir/bin/python" -c "import transformers, torch, peft; print('reference env:', transformers.__version__, torch.__version__, peft.__version__)"
