"""The CUDA mixed-precision element walker, checked on the host (no GPU
needed): see tests/host/cuda_walker_emu.cpp."""
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "cuda", "multi_tensor_apply.cuh")
BEGIN = "// The updated float param in its storage type"
END = "// ------------------------------------------------- device scalar arguments"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_cuda_mixed_walker_matches_element_loop(tmp_path):
    text = open(HEADER).read()
    assert BEGIN in text and END in text, "walker markers moved: update this test"
    (tmp_path / "walker.inc").write_text(text[text.index(BEGIN):text.index(END)])
    exe = tmp_path / "emu"
    cmd = ["g++", "-O1", "-std=c++17", "-I", str(tmp_path), "-I", os.path.join(ROOT, "csrc")]
    for inc in cpp_extension.include_paths():
        cmd += ["-I", inc]
    cmd += [os.path.join(ROOT, "tests", "host", "cuda_walker_emu.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "768 cases, 0 mismatches", r.stdout + r.stderr
