"""The shared Snapdragon table: checked before any work, and in step with ExecuTorch's own."""

from __future__ import annotations

import pytest

from s2dit_deploy.errors import UsageError
from s2dit_deploy.socs import SOCS, resolve_soc


@pytest.mark.parametrize("name", ["SM8750", "sm8750", " SM8750 ", "Snapdragon 8 Elite", "8elite"])
def test_resolve_soc_accepts_part_numbers_and_marketing_names(name):
    assert resolve_soc(name).name == "SM8750" and resolve_soc(name).htp_arch == 79


@pytest.mark.parametrize("name", ["SM9999", "", None, "8"])
def test_a_bad_soc_is_a_usage_error_naming_the_flag_and_the_choices(name):
    with pytest.raises(UsageError, match=r"--soc .* use one of: SM8550 .*SM8650 .*SM8750 .*SM8850") as err:
        resolve_soc(name)
    assert err.value.exit_code == 2


def test_the_table_matches_executorch_qnn():
    utils = pytest.importorskip("executorch.backends.qualcomm.utils.utils")
    chipsets, archs = utils.get_soc_to_chipset_map(), utils.get_soc_to_htp_arch_map()
    for soc in SOCS.values():
        assert int(chipsets[soc.name]) == soc.soc_model and int(archs[soc.name]) == soc.htp_arch, soc.name


def test_the_qnn_lowering_resolves_through_the_shared_table():
    lower = pytest.importorskip("s2dit_deploy.targets.qnn.lower")
    pytest.importorskip("executorch.backends.qualcomm.utils.utils")
    assert int(lower.resolve_soc("snapdragon 8 gen 3")) == 57
    with pytest.raises(UsageError, match="--soc 'SM1'"):
        lower.resolve_soc("SM1")
