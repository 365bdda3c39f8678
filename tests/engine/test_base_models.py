"""Base-model specs in the engine: the lookups the service's policy uses, and the operator's local files."""

from __future__ import annotations

from pathlib import Path

from must_engine.base_models import is_architecture, is_pretrained_tag, is_shipped_model, parse_base_model


def test_lookups_answer_from_names_alone() -> None:
    assert is_shipped_model("proxy-cifar10-tiny")
    for name in ("../base_models/proxy-cifar10-tiny", "proxy-cifar10-tiny/", "", "ViT-B-16"):
        assert not is_shipped_model(name), name
    assert is_architecture("ViT-B-16") and is_architecture("ViT-L-14")
    assert not is_architecture("proxy-cifar10-tiny") and not is_architecture("ViT-B-16:openai")
    assert is_pretrained_tag("ViT-B-16", "openai")
    assert not is_pretrained_tag("ViT-B-16", "/etc/passwd") and not is_pretrained_tag("no-such-arch", "openai")


def test_the_engine_still_takes_any_local_file(tmp_path: Path) -> None:
    """`must adapt --base-model ARCH:/path` is the operator's tool: the service's directory policy is not here."""
    weights = tmp_path / "anywhere" / "weights.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"not read by parsing")
    parsed = parse_base_model(f"ViT-B-16:{weights}")
    assert parsed.model_name == "ViT-B-16" and parsed.pretrained == str(weights)
    assert parse_base_model("ViT-B-16", pretrained=str(weights)).spec == f"ViT-B-16:{weights}"
