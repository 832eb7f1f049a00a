"""sarvit.models: the architectures timm lacks are registered with timm as soon as timm is imported."""

import ast
import subprocess
import sys

import pytest

NAMES = ["t2t_vit_14", "t2t_vit_t_14", "pvt_tiny", "pvt_small", "cvt_13"]


@pytest.mark.parametrize("order", ["sarvit first", "timm first"])
def test_importing_sarvit_registers_its_models_with_timm(order):
    imports = "import sarvit, timm" if order == "sarvit first" else "import timm, sarvit"
    code = (f"import sys; {imports}; "
            "print(sorted(set(timm.list_models('t2t*') + timm.list_models('pvt_[st]*') + timm.list_models('cvt*'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout.strip()) == sorted(NAMES)


def test_import_sarvit_alone_imports_neither_torch_nor_timm():
    code = "import sys, sarvit; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
