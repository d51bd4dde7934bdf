"""Which target families the serving engines run an EAGLE-3 draft for, and which layers they feed it.

An EAGLE-3 draft needs the target's model code in the engine to capture three aux hidden states: SGLang
calls the target's `set_eagle3_layers_to_capture` (a model without it cannot serve the draft), vLLM
requires the target's class to implement `SupportsEagle3` (`set_aux_hidden_state_layers`,
`get_eagle3_aux_hidden_state_layers`), and several vLLM releases also refuse any target whose
`model_type` does not contain one of the names in the speculative config's list (`eagle3_target_supported`,
later `aux_hidden_states_supported`: llama, qwen, minicpm, gpt_oss, ...). The table below was read from
the engines' model files (docs/serving.md: "What the engines serve", with the versions read); the export
warns when the target's family is not known to be served (`engine_warnings`).

Both engines' default ids are [2, N//2, N-3], the residual stream entering those layers (this project's
convention); explicit ids differ, see the layer-id trap in docs/serving.md. A leaf module: data and one
function, it imports nothing of the project.
"""
from __future__ import annotations

from dataclasses import dataclass

SERVED, NOT_SERVED, DEPENDS = "yes", "no", "depends on the version"
DEFAULT_IDS = "[2, N//2, N-3]"


@dataclass(frozen=True)
class Support:
    """One engine's EAGLE-3 support for a family: `served` (SERVED, NOT_SERVED, DEPENDS), the aux
    ids it captures by default (None: not established), what to know, and the engine file it was read from."""

    served: str
    ids: str | None
    source: str
    note: str = ""


@dataclass(frozen=True)
class Family:
    """A target family: its HF model_type, the architecture names its checkpoints declare, each engine's
    EAGLE-3 support."""

    name: str
    model_type: str
    architectures: tuple[str, ...]
    sglang: Support
    vllm: Support


_SG = "sgl-project/sglang python/sglang/srt/models/"
_VL = "vllm-project/vllm vllm/model_executor/models/"
_VLLM_LIST = ("vllm's speculative config (vllm/config/speculative.py) refuses this model_type in the "
              "releases that keep the model-type list (llama, qwen, minicpm, gpt_oss, ...); the newest "
              "copy read has no list and only requires SupportsEagle3")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Llama 3.x", "llama", ("LlamaForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "llama.py: LlamaForCausalLM.set_eagle3_layers_to_capture"),
           Support(SERVED, DEFAULT_IDS, _VL + "llama.py: LlamaForCausalLM(..., SupportsEagle3)")),
    Family("Qwen2.5", "qwen2", ("Qwen2ForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "qwen2.py: Qwen2ForCausalLM.set_eagle3_layers_to_capture"),
           Support(SERVED, DEFAULT_IDS, _VL + "qwen2.py: Qwen2ForCausalLM(..., SupportsEagle3)")),
    Family("Qwen3", "qwen3", ("Qwen3ForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "qwen3.py: Qwen3ForCausalLM.set_eagle3_layers_to_capture"),
           Support(SERVED, DEFAULT_IDS, _VL + "qwen3.py: Qwen3ForCausalLM(..., SupportsEagle3)")),
    Family("Qwen3-MoE", "qwen3_moe", ("Qwen3MoeForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "qwen3_moe.py: Qwen3MoeForCausalLM.set_eagle3_layers_to_capture"),
           Support(SERVED, DEFAULT_IDS, _VL + "qwen3_moe.py: Qwen3MoeForCausalLM(..., SupportsEagle3, "
                   "MixtureOfExperts)")),
    Family("Mixtral", "mixtral", ("MixtralForCausalLM",),
           Support(NOT_SERVED, None, _SG + "mixtral.py: MixtralForCausalLM has no set_eagle3_layers_to_capture"),
           Support(NOT_SERVED, None, _VL + "mixtral.py: MixtralForCausalLM(nn.Module, SupportsLoRA, SupportsPP), "
                   "no SupportsEagle3", "and `mixtral` is not in the model-type list")),
    Family("gpt-oss", "gpt_oss", ("GptOssForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "gpt_oss.py: GptOssForCausalLM.set_eagle3_layers_to_capture"),
           Support(SERVED, DEFAULT_IDS, _VL + "gpt_oss.py: GptOssForCausalLM(..., SupportsEagle3, ...)")),
    Family("Gemma-2", "gemma2", ("Gemma2ForCausalLM",),
           Support(NOT_SERVED, None, _SG + "gemma2.py (commit 00b08c4): Gemma2ForCausalLM has no "
                   "set_eagle3_layers_to_capture"),
           Support(NOT_SERVED, None, _VL + "gemma2.py: Gemma2ForCausalLM(nn.Module, SupportsLoRA, SupportsPP), "
                   "no SupportsEagle3")),
    Family("Gemma-3 (text)", "gemma3_text", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           Support(DEPENDS, DEFAULT_IDS, _SG + "gemma3_causal.py (commit 038c87d): "
                   "Gemma3ForCausalLM.set_eagle3_layers_to_capture",
                   "newer releases only; and its Gemma3TextModel captures the layer's output before the residual is "
                   "added (the residual is carried apart for the fused norms), not the residual stream this project "
                   "trains on, so the draft would be fed other features than it learned from"),
           Support(NOT_SERVED, None, _VL + "gemma3.py: Gemma3ForCausalLM(nn.Module, SupportsLoRA, SupportsPP), "
                   "no SupportsEagle3")),
    Family("Phi-3/4", "phi3", ("Phi3ForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "llama.py: Phi3ForCausalLM(LlamaForCausalLM), inherits "
                   "set_eagle3_layers_to_capture"),
           Support(DEPENDS, DEFAULT_IDS, _VL + "phi3.py: Phi3ForCausalLM(LlamaForCausalLM), inherits SupportsEagle3",
                   _VLLM_LIST)),
    Family("Mistral", "mistral", ("MistralForCausalLM",),
           Support(SERVED, DEFAULT_IDS, _SG + "mistral.py: MistralForCausalLM(LlamaForCausalLM), inherits "
                   "set_eagle3_layers_to_capture"),
           Support(DEPENDS, DEFAULT_IDS, _VL + "mistral.py: MistralForCausalLM(LlamaForCausalLM), inherits "
                   "SupportsEagle3", _VLLM_LIST)),
)}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]  # a Gemma-3 config's model_type; its text model's is gemma3_text

ENGINE_NAMES = {"sglang": "SGLang", "vllm": "vLLM"}


def family_of(architectures) -> Family | None:
    """The family whose checkpoints declare one of `architectures` (run_info.json's target_architectures),
    None for a target the table does not know."""
    for family in FAMILIES.values():
        if any(a in family.architectures for a in architectures or ()):
            return family
    return None


def engine_warnings(architectures, method: str | None, fmt: str = "eagle3") -> list[str]:
    """One line per engine that is not known to serve this export: an EAGLE-3 draft (`method` "eagle3", as
    the head's SERVE_METHOD names it for vLLM) for a target declaring `architectures`, in layout `fmt`
    (speculators: vLLM's alone). [] when every engine the layout is for serves the family, for other
    heads (the table covers EAGLE-3 only) and for a run that recorded no architectures."""
    if method != "eagle3" or not architectures:
        return []
    engines = ("vllm",) if fmt == "speculators" else ("sglang", "vllm")
    family = family_of(architectures)
    names = ", ".join(architectures)
    if family is None:
        return [f"{ENGINE_NAMES[e]}: target {names} is not in eagle_online's table of EAGLE-3 engine support "
                "(eagle_online/engines.py); check that its model file captures aux hidden states before serving "
                "(SGLang: set_eagle3_layers_to_capture; vLLM: SupportsEagle3)" for e in engines]
    lines = []
    for engine in engines:
        support: Support = getattr(family, engine)
        if support.served == SERVED:
            continue
        what = {NOT_SERVED: "does not serve EAGLE-3 drafts for", DEPENDS: "serves EAGLE-3 drafts for"}[support.served]
        extra = f" only in some versions ({support.note})" if support.served == DEPENDS else (
            f" ({support.note})" if support.note else "")
        todo = {"sglang": "the target model needs set_eagle3_layers_to_capture",
                "vllm": "the target model needs SupportsEagle3"}[engine]
        lines.append(f"{ENGINE_NAMES[engine]} {what} {family.name} ({names}){extra}: read from {support.source}. "
                     f"Before serving, check your engine version's model file ({todo}), or train for a served "
                     "family; the export is written either way.")
    return lines
