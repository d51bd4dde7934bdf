"""The table of what the engines serve (eagle_online/engines.py) and the export's warning from it: a served
family exports silently, one no engine is known to serve exports with a line naming the engine."""
import json

import pytest

from eagle_online.engines import FAMILIES, NOT_SERVED, SERVED, engine_warnings, family_of
from eagle_online.export import export_run, export_warnings
from tests.families import FAMILIES as TINY_FAMILIES
from tests.families import _config
from tests.test_export import _fake_run, _head


def test_every_tiny_family_is_in_the_table():
    """Each family the tests build (tests/families.py) has an entry, found by its config's model_type and by
    the architecture transformers gives that model_type (what run_info.json records)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in TINY_FAMILIES:
        model_type = _config(name).model_type
        assert model_type in FAMILIES, name
        assert family_of([MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]) is FAMILIES[model_type], name


def test_every_claim_names_its_source_file():
    for family in FAMILIES.values():
        for support, repo in ((family.sglang, "sgl-project/sglang "), (family.vllm, "vllm-project/vllm ")):
            assert support.source.startswith(repo) and ".py" in support.source, family.name
            if support.served == SERVED:
                assert support.ids is not None, family.name
            if support.served == NOT_SERVED:
                assert support.ids is None, family.name


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_served_families_give_no_warning(arch):
    assert FAMILIES[family_of([arch]).model_type].sglang.served == SERVED
    for fmt in ("eagle3", "speculators", "both"):
        assert engine_warnings([arch], "eagle3", fmt) == []


def test_a_family_neither_engine_serves_names_both():
    lines = engine_warnings(["MixtralForCausalLM"], "eagle3")
    assert [line.split()[0] for line in lines] == ["SGLang", "vLLM"]
    assert all("does not serve EAGLE-3 drafts for Mixtral" in line for line in lines)
    assert "python/sglang/srt/models/mixtral.py" in lines[0] and "vllm/model_executor/models/mixtral.py" in lines[1]
    # a speculators export is for vLLM alone
    assert [line.split()[0] for line in engine_warnings(["MixtralForCausalLM"], "eagle3", "speculators")] == ["vLLM"]


def test_version_dependent_and_unknown_support_warn_for_that_engine_only():
    (line,) = engine_warnings(["MistralForCausalLM"], "eagle3")
    assert line.startswith("vLLM serves EAGLE-3 drafts for Mistral") and "only in some versions" in line
    lines = engine_warnings(["Gemma2ForCausalLM"], "eagle3")
    assert lines[0].startswith("SGLang does not serve") and lines[1].startswith("vLLM does not serve")
    sglang, _ = engine_warnings(["Gemma3ForCausalLM"], "eagle3")
    assert sglang.startswith("SGLang serves EAGLE-3 drafts for Gemma-3")
    assert "before the residual is added" in sglang  # it captures other features than the draft learned from


def test_unknown_targets_other_heads_and_unrecorded_architectures():
    (sg, vl) = engine_warnings(["FalconForCausalLM"], "eagle3")
    assert "not in eagle_online's table" in sg and sg.startswith("SGLang") and vl.startswith("vLLM")
    assert engine_warnings(["MixtralForCausalLM"], "eagle") == []  # the table covers EAGLE-3 only
    assert engine_warnings([], "eagle3") == [] and engine_warnings(None, "eagle3") == []


@pytest.mark.parametrize("arch, warned", [("LlamaForCausalLM", False), ("MixtralForCausalLM", True)])
def test_export_prints_the_warning(tmp_path, capsys, arch, warned):
    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", _head(seed=3))])
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "target_architectures": [arch]}))
    assert bool(export_warnings(run)) == warned
    out = export_run(run)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert printed == [f"warning: {line}" for line in export_warnings(run)]
    assert (len(printed) == 2) == warned
    assert (out / "config.json").exists()  # a warning, not a refusal
