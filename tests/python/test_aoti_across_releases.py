"""An AOTInductor package made by one PyTorch release, run by another.

`scripts/compat.sh` points TORCHMHA_FOREIGN_AOTI_PACKAGES at the packages that the main build's
PyTorch made (`build/aoti_fixtures/`, written by `tests/fixtures/make_aoti_packages.py`) while it
runs this suite on another release; elsewhere the test is skipped, and reported as skipped.
"""

import os
from pathlib import Path

import pytest
import torch
from interchange_models import greedy_generation

FOREIGN = os.environ.get("TORCHMHA_FOREIGN_AOTI_PACKAGES")


@pytest.mark.skipif(
    FOREIGN is None,
    reason="needs packages made by another PyTorch release (scripts/compat.sh gives them)",
)
@pytest.mark.parametrize("package", ["self_attention", "textbook"])
def test_package_made_by_another_release_gives_its_outputs(package: str) -> None:
    """The package loads and gives, at every length it was checked at, the outputs that the
    release which made it computed in Python."""
    folder = Path(str(FOREIGN))
    expected = torch.load(folder / "expected.pt")
    runner = torch._inductor.aoti_load_package(str(folder / f"{package}.pt2"))
    lengths = sorted({int(key.split("/")[1]) for key in expected if key.startswith("x/")})
    assert lengths, "expected.pt holds no inputs"
    second = "key_padding_mask" if package == "self_attention" else "mask"
    for length in lengths:
        output = runner(expected[f"x/{length}"], expected[f"{second}/{length}"])
        output = output[0] if isinstance(output, (list, tuple)) else output
        torch.testing.assert_close(
            output, expected[f"{package}/{length}"], atol=1e-5, rtol=1e-4, msg=f"length {length}"
        )


@pytest.mark.skipif(
    FOREIGN is None,
    reason="needs packages made by another PyTorch release (scripts/compat.sh gives them)",
)
def test_decoder_package_made_by_another_release_generates_its_tokens() -> None:
    """The greedy decoder that owns its key/value cache: the package's greedy generation from the
    saved prompts gives the tokens and logits that the release which made it computed."""
    folder = Path(str(FOREIGN))
    expected = torch.load(folder / "expected.pt")
    runner = torch._inductor.aoti_load_package(str(folder / "greedy_decoder.pt2"))
    tokens, logits = greedy_generation(
        runner,
        expected["decoder/prompt_tokens"],
        expected["decoder/prompt_padding"],
        generated=expected["decoder/tokens"].size(1),
    )
    assert torch.equal(tokens, expected["decoder/tokens"])
    torch.testing.assert_close(logits, expected["decoder/logits"], atol=1e-5, rtol=1e-4)
