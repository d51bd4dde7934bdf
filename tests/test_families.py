"""The target families people train drafts for, each as a tiny random instance (tests/families.py): what
the frozen target captures equals the plain HF forward, packed rows equal each conversation alone through
the families' sliding windows, attention sinks and soft-caps (and a path that drops one of those fails
the same comparison), the teacher equals the model's own logits, and KV-cached decoding equals the
forward. The trainer's few steps, the export and ZeRO-3 on these instances: tests/test_train.py and
tests/test_distributed.py."""
import pytest
import torch

from eagle_online.attention import VARLEN, register_varlen_attention, varlen_attention_forward
from eagle_online.target import FrozenTarget, resolve_attn_implementation
from tests.families import FAMILIES, WINDOW, WINDOWED, build_family

LENGTHS = [13, 20, 7, 16]  # three of the four conversations outgrow the 8-token windows
DRAFT_IDS = torch.arange(0, 4096, 7)


def _target(family: str, attn: str = VARLEN, aux_layer_ids=None) -> FrozenTarget:
    register_varlen_attention()
    return FrozenTarget(build_family(family, attn), aux_layer_ids, DRAFT_IDS)


def _conversations(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 4096, (1, n), generator=gen) for n in LENGTHS]


def _packed(conversations):
    ids = torch.cat(conversations, 1)
    pos = torch.cat([torch.arange(c.shape[1]) for c in conversations])[None]
    return ids, pos


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_and_teacher_equal_the_plain_forward(family):
    """On one conversation: the aux features at the default ids are output_hidden_states at those indices
    (the residual entering each layer), the last hidden state is the final post-norm one, and the teacher's
    logits over the draft rows are the model's own logits there (Gemma-2's final soft-cap included)."""
    target = _target(family)
    reference = build_family(family, "eager")
    ids = _conversations()[1]
    pos = torch.arange(ids.shape[1])[None]
    out = target(ids, pos, vocab_chunk=1000)
    ref = reference(input_ids=ids, position_ids=pos, output_hidden_states=True)
    hs = ref.hidden_states
    _close(out.aux_hidden, torch.cat([hs[i] for i in target.aux_layer_ids], -1))
    _close(out.last_hidden, hs[-1])
    _close(out.teacher_logits, ref.logits[..., DRAFT_IDS])
    assert torch.equal(out.teacher_in_draft, torch.isin(ref.logits.argmax(-1), DRAFT_IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_equals_each_conversation_alone(family):
    """Four conversations packed in one row (position ids restarting) through our varlen attention give
    what transformers' eager attention gives for each conversation run alone."""
    target = _target(family, aux_layer_ids=[1, 4, 6])
    alone = FrozenTarget(build_family(family, "eager"), [1, 4, 6], DRAFT_IDS)
    conversations = _conversations()
    packed = target(*_packed(conversations))
    refs = [alone(c, torch.arange(c.shape[1])[None]) for c in conversations]
    _close(packed.aux_hidden, torch.cat([r.aux_hidden for r in refs], 1))
    _close(packed.teacher_logits, torch.cat([r.teacher_logits for r in refs], 1))


DROPPED = [(family, "sliding_window") for family in WINDOWED] + [("gemma2", "softcap"), ("gpt_oss", "s_aux")]


@pytest.mark.parametrize(("family", "extra"), DROPPED)
def test_a_packed_path_that_drops_the_family_extra_is_caught(family, extra):
    """The comparison above has teeth: the same varlen attention with the family's window, soft-cap or
    sinks dropped gives packed features far from each conversation's alone."""
    from transformers import AttentionInterface

    dropped = []

    def dropping(module, query, key, value, attention_mask, **kwargs):
        dropped.append(kwargs.get(extra) is not None)
        return varlen_attention_forward(module, query, key, value, attention_mask, **{**kwargs, extra: None})

    AttentionInterface.register("varlen_dropping", dropping)
    target = FrozenTarget(build_family(family, "varlen_dropping"), [1, 4, 6], DRAFT_IDS)
    alone = FrozenTarget(build_family(family, "eager"), [1, 4, 6], DRAFT_IDS)
    conversations = _conversations()
    packed = target(*_packed(conversations))
    refs = torch.cat([alone(c, torch.arange(c.shape[1])[None]).aux_hidden for c in conversations], 1)
    assert any(dropped), f"{family} passes no {extra}"
    assert (packed.aux_hidden - refs).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss", "qwen3_moe"])
def test_cached_decoding_equals_the_forward(family):
    """Speculative decoding's verification path: a KV-cached forward over new tokens (with the window,
    soft-cap and sinks computed over the cache) gives the logits and features of one plain forward."""
    from transformers import DynamicCache

    target = _target(family)
    ids = _conversations()[1][0]
    pos = torch.arange(len(ids))
    cache = DynamicCache()
    first = target.decode(ids[:11], pos[:11], cache)
    rest = target.decode(ids[11:], pos[11:], cache)
    ref = build_family(family, "eager")(input_ids=ids[None], output_hidden_states=True)
    _close(torch.cat([first.logits, rest.logits]), ref.logits[0])
    hs = ref.hidden_states
    _close(rest.aux_hidden, torch.cat([hs[i][0, 11:] for i in target.aux_layer_ids], -1))


def test_tree_verification_refuses_a_binding_window():
    """A draft tree's nodes sit at positions their cache indices do not give, so a window counted in
    indices would be wrong: refused once the sequence outgrows the window."""
    from transformers import DynamicCache

    target = _target("mistral")
    ids = _conversations()[1][0]
    cache = DynamicCache()
    target.decode(ids[:12], torch.arange(12), cache)
    mask = torch.zeros(1, 1, 2, 14)
    with pytest.raises(ValueError, match="sliding window"):
        target.decode(ids[12:14], torch.tensor([12, 12]), cache, mask)


def test_auto_attention_keeps_sinks_and_refuses_flash_attention_for_them():
    """gpt-oss's sinks: `auto` never picks flash_attention_2 (flash-attn 2 drops them without a word),
    and asking for it is refused; windowed and soft-capped families run our varlen."""
    gpt_oss = build_family("gpt_oss").config
    assert resolve_attn_implementation("auto", torch.device("cpu"), gpt_oss) == VARLEN
    assert resolve_attn_implementation("auto", torch.device("cpu"), build_family("gemma2").config) == VARLEN
    with pytest.raises(ValueError, match="sinks"):
        resolve_attn_implementation("flash_attention_2", torch.device("cuda"), gpt_oss)
    assert WINDOW < max(LENGTHS)


def _close(actual, expected):
    """Equal up to fp32 rounding at the tensor's own scale (0.2-spread weights make features of size ~10)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_learns_on_the_family_and_exports_its_shapes(family, tmp_path, capsys):
    """The whole trainer on the instance saved as an HF checkpoint (the tiny chat tokenizer): the loss
    falls over a few steps on the same small data, τ is measured by speculative decoding through the
    family's attention over a KV cache, and the export's config carries the target's shapes, with a
    warning where no engine is known to serve the family."""
    import json

    from eagle_online.engines import engine_warnings
    from eagle_online.export import export_run
    from eagle_online.metrics import read_metrics
    from eagle_online.recipe import load_recipe
    from eagle_online.trainer import Trainer
    from tests.families import save_family

    target_dir = save_family(family, tmp_path / "target")
    run = tmp_path / "run"
    recipe = load_recipe("tiny_eagle3", [
        f"target.model={target_dir}", f"run.output_dir={run}", "draft.ttt_length=2", "draft.draft_vocab_size=512",
        "data.sources.0.max_rows=6", "data.tokens_per_batch=512", "data.max_length=256", "training.max_steps=8",
        "training.epochs=8", "training.lr=1e-2", "training.warmup_ratio=0", "training.log_every=1",
        "training.checkpoint_every=8", "training.progress_bar=false", "eval.every=8", "eval.floors=false",
        "eval.num_prompts=2", "eval.max_new_tokens=6", "eval.final_temperatures=[]"])
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.train()
    rows = read_metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    assert any(r.get("eval_tau", 0) >= 1 for r in rows)
    config = json.loads((export_run(run) / "config.json").read_text())
    source = json.loads((target_dir / "config.json").read_text())
    assert config["target_hidden_size"] == source["hidden_size"] == 64
    assert config["vocab_size"] == source["vocab_size"] and config["draft_vocab_size"] == 512
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warned) == len(engine_warnings(source["architectures"], "eagle3", "eagle3"))
