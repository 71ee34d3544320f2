"""torchrun runs ``qwenvl/train/train_qwen.py`` as a script, so Python puts ``qwenvl/train/`` first on
``sys.path``: a module there named like a standard-library module hides it from every library the
run imports (a ``secrets.py`` here broke ``import transformers`` through huggingface_hub)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "qwenvl" / "train"


def test_no_module_of_the_script_folder_shadows_the_standard_library():
    ours = {p.stem for p in TRAIN.glob("*.py")} | {p.name for p in TRAIN.iterdir() if (p / "__init__.py").exists()}
    assert not ours & set(sys.stdlib_module_names)


def test_entry_point_imports_as_a_script():
    # As torchrun starts it: the script's folder first on sys.path, then transformers' import chain.
    code = ("import runpy, sys; sys.argv = ['train_qwen.py', '--help']; "
            f"sys.path.insert(0, {str(TRAIN)!r}); runpy.run_path({str(TRAIN / 'train_qwen.py')!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--dataset_use" in out.stdout
