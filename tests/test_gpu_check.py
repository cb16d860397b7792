"""benchmarks/gpu_check.py on a machine without CUDA: it stops at once, says why, and writes nothing.

Its GPU checks themselves can only run where a CUDA device is lent (issue 15 item 3); here the CPU path
and the classification of profiled attention ops are tested.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run its checks")
def test_without_cuda_it_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "results" / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "wrote nothing" in proc.stderr
    assert not out.exists() and not out.parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_profiled_ops_name_the_backend():
    backend_of = load_script().attention_backend_of
    assert backend_of(["aten::_scaled_dot_product_flash_attention", "pytorch_flash::flash_fwd_kernel"]) == "flash"
    assert backend_of(["aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16_aligned_64x64"]) \
        == "efficient"
    assert backend_of(["aten::_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa"]) == "cudnn"
    assert backend_of(["aten::_scaled_dot_product_attention_math", "aten::_softmax"]) == "math"
    # cuDNN's kernels may call themselves "flash": the ATen op decides
    assert backend_of(["aten::_scaled_dot_product_cudnn_attention", "sm90_flash_fprop_wgmma_f16_knob_3"]) == "cudnn"
    assert backend_of(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "efficient"
    assert backend_of(["aten::mm"]) == "unknown"
