"""Fetch transformers' own model test mixins for the installed version, so our classes run its common tests.

The wheel has no tests; the PyPI sdist of the same version ships `tests/test_modeling_common.py`,
`test_configuration_common.py` and `test_training_mixin.py`. They are extracted (not committed) into
`.cache/transformers-tests/<version>/hftests/`, with stubs for the helper modules the sdist lacks.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parent.parent
FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")
# Helper modules the mixins import that the sdist does not include.
STUBS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "dtype": "float16",\n'
        '    "tie_word_embeddings": True,\n'
        '    "is_encoder_decoder": True,\n'
        '    "problem_type": "regression",\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "bos_token_id": 2,\n'
        "}\n"
    ),
}


def target() -> Path:
    return ROOT / ".cache" / "transformers-tests" / transformers.__version__ / "hftests"


def main() -> int:
    package = target()
    if all((package / name).exists() for name in FILES):
        return 0
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "-d", scratch],
            check=True,
        )  # fmt: skip
        [archive] = Path(scratch).glob("transformers-*.tar.gz")
        staging = Path(scratch) / "hftests"
        with tarfile.open(archive) as sdist:
            for name in FILES:
                member = sdist.getmember(f"transformers-{version}/tests/{name}")
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(sdist.extractfile(member).read())
        for name, text in {"__init__.py": "", **STUBS}.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
            if name.count("/"):
                (staging / name).parent.joinpath("__init__.py").touch()
        package.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(package)  # in place only when complete
    print(f"transformers {version} test mixins in {package}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
