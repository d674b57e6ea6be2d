import pytest
import torch

from s2dit_deploy.model_zoo.config import DiTConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_dit_config(layout: str = "LSSL", **kw) -> DiTConfig:
    base = dict(dim=32, num_heads=2, ffn_dim=64, layout=layout, text_dim=16)
    base.update(kw)
    return DiTConfig(**base)


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    rmse = (ref.double() - x.double()).pow(2).mean().sqrt().item()
    return float("inf") if rmse == 0 else 20 * torch.log10(ref.abs().max().double() / rmse).item()


@pytest.fixture(scope="session")
def qnn():
    """The executorch-qnn target with its QNN host libraries (HTP emulation); skip without them."""
    pytest.importorskip("executorch", reason="executorch is not installed")
    from s2dit_deploy.targets.base import get_target
    from s2dit_deploy.targets.qnn import libs

    try:
        libs.ensure_qnn()
    except libs.QnnLibrariesMissing as exc:
        pytest.skip(f"no QNN host libraries: {exc}")
    return get_target("executorch-qnn")


@pytest.fixture(scope="session")
def tiny_xnnpack_bundle(tmp_path_factory):
    """A complete s2dit-tiny executorch-xnnpack bundle, compiled once (about 2 min on 2 cores)."""
    pytest.importorskip("executorch", reason="executorch is not installed")
    import s2dit_deploy as sd

    out = tmp_path_factory.mktemp("tiny_xnnpack") / "bundle"
    sd.compile("s2dit-tiny", target="executorch-xnnpack", out_dir=out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_coreai_bundle(tmp_path_factory):
    """A complete s2dit-tiny coreai bundle with fp32 programs, compiled once (about 40 s)."""
    pytest.importorskip("coreai_torch", reason="coreai-torch is not installed")
    import s2dit_deploy as sd

    out = tmp_path_factory.mktemp("tiny_coreai") / "bundle"
    sd.compile("s2dit-tiny", target="coreai", out_dir=out, progress=False, precision="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_coreml_export(tmp_path_factory):
    """`s2dit-deploy export s2dit-tiny --device iphone-16-pro-max` run once (about 1 min): the
    report folder and its --json summary. Its bundle/ is a plain s2dit-tiny coreml bundle."""
    pytest.importorskip("coremltools", reason="coremltools is not installed")
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("export") / "tiny-16pm"
    r = subprocess.run([sys.executable, "-m", "s2dit_deploy.cli", "export", "s2dit-tiny", "--device",
                        "iphone-16-pro-max", "-o", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout)
