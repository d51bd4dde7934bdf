"""The frozen target (eagle_online.target): what it captures for the head (aux features, last hidden
state, the teacher over the draft vocabulary) equals the plain HF forward, packed rows stay apart, and
bad layer ids are refused."""
import os

import pytest
import torch

from eagle_online.target import FrozenTarget, default_aux_layer_ids
from tests.conftest import tiny_llama_config


def _packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_target_capture_matches_hidden_states(tiny_llama):
    draft_ids = torch.tensor([0, 3, 5, 7, 11, 13, 50, 96])
    target = FrozenTarget(tiny_llama, None, draft_ids)
    assert target.aux_layer_ids == default_aux_layer_ids(8) == [2, 4, 5]
    assert not any(p.requires_grad for p in target.parameters())
    ids = torch.randint(0, 97, (1, 12))
    pos = torch.arange(12)[None]
    out = target(ids, pos, vocab_chunk=10)  # several vocabulary chunks
    ref = tiny_llama(input_ids=ids, position_ids=pos, output_hidden_states=True)
    hs = ref.hidden_states
    torch.testing.assert_close(out.aux_hidden, torch.cat([hs[2], hs[4], hs[5]], -1))
    torch.testing.assert_close(out.last_hidden, hs[-1])
    torch.testing.assert_close(out.teacher_logits, ref.logits[..., draft_ids])
    in_draft = torch.isin(ref.logits.argmax(-1), draft_ids)
    assert torch.equal(out.teacher_in_draft, in_draft)


def test_target_packed_rows_do_not_attend_across_conversations(tiny_llama):
    """Packing: with position_ids restarting, the packed forward equals separate forwards."""
    target = FrozenTarget(tiny_llama, [1, 3, 6], torch.arange(10))
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = target(torch.cat([a, b], 1), _packed_positions([7, 5]))
    sep_a = target(a, torch.arange(7)[None])
    sep_b = target(b, torch.arange(5)[None])
    torch.testing.assert_close(packed.aux_hidden, torch.cat([sep_a.aux_hidden, sep_b.aux_hidden], 1))
    torch.testing.assert_close(packed.teacher_logits, torch.cat([sep_a.teacher_logits, sep_b.teacher_logits], 1))


def test_target_rejects_repeating_default_ids():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=6))
    with pytest.raises(ValueError, match="fewer than 7 layers"):
        FrozenTarget(model, None, torch.arange(4))


def test_loading_a_target_on_the_cpu_flushes_denormals():
    """Denormal floats halve a trained model's CPU speed, so every CPU run (train, eval, regenerate, the
    benches) flushes them from the moment its target loads. In a fresh process: this one's conftest
    already flushes."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from eagle_online.recipe import load_recipe\n"
            "from eagle_online.target import load_target_model\n"
            "tiny = torch.tensor([1e-39])\n"
            "print((tiny * 1.0).item() != 0)\n"
            "load_target_model(load_recipe('tiny_eagle1').target, torch.device('cpu'))\n"
            "print((tiny * 1.0).item() != 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
