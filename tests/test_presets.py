"""The named-slice presets (configs/*.py with a `slice` section): at least a v5p and a v6e one, full fine-tuning and
LoRA, each consistent with its slice (mesh, batch, heads, tokens, accelerator type); inconsistencies are named."""

import copy

from launch import aot_presets


def test_presets_cover_both_chips_and_both_trainings_and_are_consistent():
    found = aot_presets.presets()
    kinds = {(c.slice.topology.split(":")[0], c.lora.rank > 0) for c in found.values()}
    assert {"v5p", "v6e"} <= {chip for chip, _ in kinds} and {True, False} <= {lora for _, lora in kinds}
    assert {("v5p", True), ("v5p", False), ("v6e", True), ("v6e", False)} <= kinds
    for name, config in found.items():
        assert aot_presets.problems(config) == [], name
        assert config.slice.measured, name   # the AOT table's figure it was sized by


def test_inconsistent_presets_are_named():
    config = aot_presets.presets()["v5p_8_lora"]
    broken = copy.deepcopy(config)
    broken.data.global_batch_size = 3
    broken.slice.accelerator_type = "v5p-16"
    assert aot_presets.problems(broken) == [
        "data.global_batch_size 3 does not fill the 2 data-parallel groups",
        "accelerator_type v5p-16 is not the 4-chip slice v5p-8 of topology v5p:2x2x1"]
    broken = copy.deepcopy(config)
    broken.mesh.ici = (1, 2, 4, 1)
    assert aot_presets.problems(broken) == [
        "mesh: mesh.ici (1, 2, 4, 1) holds 8 devices, but there are 4 per slice (4 devices, 1 slices)"]
    broken = copy.deepcopy(config)
    broken.slice.height = 724
    assert aot_presets.problems(broken) == ["slice video: height and width must be multiples of 16, got 724x1280"]
