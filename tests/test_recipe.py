"""Recipes: every shipped recipe validates; typos and bad values fail naming the key and file."""
from pathlib import Path

import pytest

from eagle_online.recipe import RECIPES_DIR, Recipe, RecipeError, load_recipe, resolve_asset

ALL_RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in ALL_RECIPES}
    assert {"tiny_eagle3", "llama3_eagle3", "qwen3_eagle3", "qwen2_5_eagle3"} <= names


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    # The resolved form round-trips: what a run writes can be loaded again as it is.
    again = Recipe.model_validate(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again == recipe


def test_shipped_recipes_name_their_targets_and_sizes():
    llama = load_recipe("llama3_eagle3")
    assert llama.target.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (llama.draft.draft_vocab_size, llama.draft.ttt_length, llama.training.lr, llama.data.max_length) == (
        32000, 7, 1e-4, 2048,
    )
    assert load_recipe("qwen3_eagle3").target.model == "Qwen/Qwen3-8B"
    assert load_recipe("qwen2_5_eagle3").target.model == "Qwen/Qwen2.5-7B-Instruct"
    moe = load_recipe("qwen3_30b_a3b_eagle3")
    assert (moe.target.model, moe.target.sharding, moe.data.chat_template_kwargs) == (
        "Qwen/Qwen3-30B-A3B", "zero3", {"enable_thinking": False})
    oss = load_recipe("gpt_oss_20b_eagle3")
    assert (oss.target.model, oss.target.sharding, oss.data.chat_template_kwargs) == (
        "openai/gpt-oss-20b", "none", {"reasoning_effort": "medium"})
    assert Path(resolve_asset(load_recipe("tiny_eagle3").target.model)).is_dir()


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES_DIR / "tiny_eagle3.yaml").read_text().replace("  lr:", "  learning_rate:"))
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert "training.learning_rate: unknown key" in str(e.value)
    assert str(bad) in str(e.value)


def test_unknown_section_and_bad_value(tmp_path):
    with pytest.raises(RecipeError, match=r"trainning: unknown key"):
        load_recipe("tiny_eagle3", ["trainning.lr=1"])
    with pytest.raises(RecipeError, match=r"training.lr: Input should be greater than 0"):
        load_recipe("tiny_eagle3", ["training.lr=-1"])
    with pytest.raises(RecipeError, match=r"target.aux_layer_ids"):
        load_recipe("tiny_eagle3", ["target.aux_layer_ids=[2,2,5]"])


def test_overrides_apply_and_revalidate():
    r = load_recipe("tiny_eagle3", ["training.lr=1e-4", "data.sources.0.max_rows=7", "draft.ttt_length=3"])
    assert (r.training.lr, r.data.sources[0].max_rows, r.draft.ttt_length) == (1e-4, 7, 3)
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe("tiny_eagle3", ["training.lr"])
    with pytest.raises(RecipeError, match=r"tokens_per_batch .* must be >= max_length"):
        load_recipe("tiny_eagle3", ["data.tokens_per_batch=16"])


def test_unknown_recipe_name_lists_known():
    with pytest.raises(RecipeError, match="tiny_eagle3"):
        load_recipe("no_such_recipe")


def test_builtin_assets_are_model_folders_only():
    from eagle_online.recipe import ASSETS_DIR, resolve_asset

    assert resolve_asset("builtin:tiny_chat") == str(ASSETS_DIR / "tiny_chat")
    assert (ASSETS_DIR / "smollm2_replies.jsonl.gz").is_file()  # data shipped beside the models is no target
    with pytest.raises(RecipeError, match=r"no built-in asset 'builtin:smollm2_replies.jsonl.gz' .*tiny_chat") as e:
        resolve_asset("builtin:smollm2_replies.jsonl.gz")
    assert "jsonl" not in str(e.value).split("built-in:")[-1]


@pytest.mark.parametrize("recipe, override, owner", [
    ("tiny_mlp", "draft.ttt_length=3", "LlamaForCausalLMEagle3"),
    ("tiny_eagle3", "draft.mlp_blocks=2", "EagleOnlineMLPDraft"),
    ("tiny_eagle3", "draft.feature_noise=0.2", "LlamaForCausalLMEagle"),
    ("tiny_eagle1", "draft.compile=true", "LlamaForCausalLMEagle3"),
])
def test_a_setting_of_another_head_is_refused_not_ignored(recipe, override, owner):
    key = override.split("=")[0].removeprefix("draft.")
    with pytest.raises(RecipeError, match=f"{key} is a setting of the {owner} head"):
        load_recipe(recipe, [override])
    assert load_recipe(recipe, []).draft.architecture != owner  # the recipe itself is another head's


def test_draft_architectures_are_the_registry():
    from eagle_online.heads import HEADS
    from eagle_online.recipe import DraftConfig

    assert DraftConfig.model_fields["architecture"].annotation.__args__ == tuple(HEADS)
    assert DraftConfig().architecture == "LlamaForCausalLMEagle3"
