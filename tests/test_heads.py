"""EAGLE-1/2 and MLP heads: their training forward against losses written out by hand, the registry,
and the generic head call the trainer makes (head(target_out, batch) -> HeadOutput)."""
import pytest
import torch
import torch.nn.functional as F

from eagle_online.data.packing import PackedBatch
from eagle_online.heads import EAGLE3, architecture_of, build_head, draft_config, head_class
from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
from eagle_online.heads.eagle import EagleHead
from eagle_online.heads.eagle3 import DocumentLayout
from eagle_online.heads.mlp import ARCHITECTURE as MLP
from eagle_online.heads.mlp import MLPHead
from eagle_online.losses import LOSSES, soft_cross_entropy
from eagle_online.recipe import DraftConfig
from eagle_online.target import TargetOutput
from tests.conftest import tiny_llama_config

V, VD, H = 97, 40, 32


def _batch_and_target(lengths=(8, 6)):
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    t = pos.shape[1]
    batch = PackedBatch(input_ids=torch.randint(0, V, (1, t), generator=g), position_ids=pos,
                        loss_mask=torch.ones(1, t, dtype=torch.long), num_conversations=len(lengths))
    target = TargetOutput(aux_hidden=torch.randn(1, t, 3 * H, generator=g),
                          last_hidden=torch.randn(1, t, H, generator=g),
                          teacher_logits=torch.randn(1, t, VD, generator=g),
                          teacher_in_draft=torch.ones(1, t, dtype=torch.bool))
    return batch, target


def _head(arch, **draft):
    dc = DraftConfig(architecture=arch, draft_vocab_size=VD, **draft)
    head = build_head(draft_config(arch, tiny_llama_config(), dc, V), dc)
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(V, generator=g)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    lm = torch.randn(V if head.LM_HEAD == "full" else VD, H, generator=g)
    head.init_from_target(torch.randn(V, H, generator=g), lm, ids - torch.arange(VD), t2d)
    return head, ids


def test_eagle1_loss_by_hand():
    """Pair t = (f_t, x_{t+1}) regresses f_{t+1} (SmoothL1) and matches the teacher at t+1 through the
    frozen lm_head's draft rows (0.1 soft-CE), inside each conversation only."""
    head, ids = _head(EAGLE, feature_noise=0.0)
    batch, target = _batch_and_target()
    out = head(target, batch)
    pos = batch.position_ids
    shifted = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], 1)
    pred = head.predict(target.last_hidden, shifted, pos, DocumentLayout.from_position_ids(pos))[0]
    rows = torch.tensor([t for t in range(14) if t + 2 < 8 or 8 <= t < 12])  # x_{t+2} in t's conversation
    assert out.metrics.counts == [len(rows)] == [(8 - 2) + (6 - 2)]
    goal = target.last_hidden[0, rows + 1]
    ce = soft_cross_entropy(pred[rows] @ head.lm_head.weight[ids].T, target.teacher_logits[0, rows + 1].softmax(-1))
    expected = F.smooth_l1_loss(pred[rows], goal) + 0.1 * ce
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert head.embed_tokens.weight.grad is None and head.lm_head.weight.grad is None
    assert head.fc.bias.grad.abs().sum() > 0 and head.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # Training noise perturbs the features; without noise the forward is deterministic.
    noisy, _ = _head(EAGLE, feature_noise=0.1)
    assert noisy(target, batch).loss.item() != pytest.approx(noisy.eval()(target, batch).loss.item())


def test_eagle1_attention_stays_inside_a_conversation():
    head, _ = _head(EAGLE)
    batch, target = _batch_and_target()
    pos = batch.position_ids
    both = head.predict(target.last_hidden, batch.input_ids, pos, DocumentLayout.from_position_ids(pos))
    second = head.predict(target.last_hidden[:, 8:], batch.input_ids[:, 8:], pos[:, 8:],
                          DocumentLayout.from_position_ids(pos[:, 8:]))
    torch.testing.assert_close(both[:, 8:], second)


def test_mlp_loss_by_hand():
    """Position t reads x_{t+1} alone and learns the teacher at t+1."""
    head, _ = _head(MLP)
    batch, target = _batch_and_target()
    out = head(target, batch)
    rows = torch.tensor([t for t in range(14) if t + 2 < 8 or 8 <= t < 12])
    logits = head.lm_head(head.blocks(head.embed_tokens(batch.input_ids[0, rows + 1])))
    expected = soft_cross_entropy(logits, target.teacher_logits[0, rows + 1].softmax(-1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        n for n, _ in head.named_parameters() if n.startswith("blocks.")}


@pytest.mark.parametrize("arch", [EAGLE3, EAGLE, MLP])
def test_every_head_trains_with_the_recipes_loss(arch):
    """draft.loss reaches the head through configure_training: on the same forward the losses differ,
    ᾱ (logged whatever the loss) does not; for the MLP, −log α and 1 − ᾱ by hand."""
    batch, target = _batch_and_target()
    outs = {}
    for loss in LOSSES:
        torch.manual_seed(0)  # the same initial head for every loss
        head, _ = _head(arch, feature_noise=0.0, loss=loss) if arch == EAGLE else _head(arch, loss=loss)
        assert head.objective.kind == loss
        outs[loss] = head(target, batch).metrics
    for loss in LOSSES[1:]:
        assert outs[loss].losses[0] != pytest.approx(outs["kl"].losses[0].item(), rel=1e-3)
        torch.testing.assert_close(outs[loss].alphas, outs["kl"].alphas)
    if arch == MLP:
        torch.manual_seed(0)
        head, _ = _head(MLP)
        rows = torch.tensor([t for t in range(14) if t + 2 < 8 or 8 <= t < 12])
        q = head.lm_head(head.blocks(head.embed_tokens(batch.input_ids[0, rows + 1]))).softmax(-1)
        alpha = torch.minimum(q, target.teacher_logits[0, rows + 1].softmax(-1)).sum(-1)
        assert outs["lk_alpha"].losses[0].item() == pytest.approx(-alpha.log().mean().item(), rel=1e-5)
        assert outs["tv"].losses[0].item() == pytest.approx(1 - alpha.mean().item(), rel=1e-5)
        assert outs["kl"].alphas[0].item() == pytest.approx(alpha.mean().item(), rel=1e-5)


def test_registry_and_generic_call():
    for arch, cls in ((EAGLE3, None), (EAGLE, EagleHead), (MLP, MLPHead)):
        head, _ = _head(arch)
        assert architecture_of(head.config) == arch and head_class(arch) is type(head)
        assert cls is None or type(head) is cls
        batch, target = _batch_and_target()
        out = head(target, batch)
        assert out.loss.requires_grad and len(out.metrics.counts) >= 1
    with pytest.raises(ValueError, match="EagleOnlineMLPDraft"):
        head_class("NoSuchHead")
