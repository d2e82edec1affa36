"""SGLang on CPU for the tests: the torchvision fake and the import of SGLang's CPU-importable modules.

* **torchvision**: ``sglang.srt.layers.attention.attention_registry`` and the DeepSeek handler module import
  ``sglang.srt.configs``, which imports ``torchvision.transforms`` (0.5.17: even ``sglang.srt.server_args``,
  via ``torchvision.io``); the PyPI torchvision wheel does not load against a ``+cpu`` torch
  (``operator torchvision::nms does not exist``) and a CPU build is not on PyPI. When ``import
  torchvision.transforms`` fails, :func:`ensure_torchvision_importable` installs a fake ``torchvision``
  before SGLang and transformers are imported (a meta-path finder; its functions raise when called). On
  these import paths SGLang and transformers only bind names from it; nothing calls it. Where the real
  torchvision imports (a GPU machine), it is used.
"""

from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types

SGLANG_SKIP_REASON = (
    "sglang is not installed; CI installs it in a venv: python3 -m venv --system-site-packages V && "
    "V/bin/pip install --no-deps -r tools/sglang_cpu_requirements.txt"
)
HANDLER_MODULE = "sglang.srt.models.deepseek_common.attention_backend_handler"


SGLANG_INSTALLED = importlib.util.find_spec("sglang") is not None  # no import at collection time


# ---- fakes ------------------------------------------------------------------------------------------------
class _FakeInterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _FakeTorchvisionModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return _FakeInterpolationMode

        def _unavailable(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"fake torchvision (CPU tests): {self.__name__}.{name} is not available")

        _unavailable.__name__ = name
        return _unavailable


class _FakeTorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _FakeTorchvisionModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0+fake"


def ensure_torchvision_importable() -> str:
    """Use the real torchvision if it imports, else install the fake one. Returns ``"real"`` or ``"fake"``.

    Must run before transformers is imported: transformers probes for torchvision (finding the fake, with its
    ``__version__``), and SGLang 0.5.17 registers image processors that transformers only accepts then.
    """
    if any(isinstance(f, _FakeTorchvisionFinder) for f in sys.meta_path):
        return "fake"
    try:
        importlib.import_module("torchvision.transforms")
        return "real"
    except Exception:  # not installed, or the CUDA wheel failing against a +cpu torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _FakeTorchvisionFinder())
    return "fake"


def import_sglang_on_cpu() -> str:
    """Import SGLang's argument / plugin modules (with the torchvision fake where needed); return its kind.

    Raises ImportError when SGLang or one of the CPU requirements is missing.
    """
    torchvision = ensure_torchvision_importable()
    importlib.import_module("sglang.srt.server_args")
    importlib.import_module("sglang.srt.plugins")
    return torchvision
