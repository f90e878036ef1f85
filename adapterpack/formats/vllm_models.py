"""Which text-generation architectures vLLM serves with LoRA (``check --target vllm``).

Transcribed from vLLM's model table, ``docs/models/supported_models.md`` ("List of Text-only Language
Models", Text Generation, the LoRA column; vllm-project/vllm commit 0046f770d322), which marks the
model classes implementing ``SupportsLoRA`` (``vllm/model_executor/models/interfaces.py``). A name in
neither set is not in vLLM's table: it may still run through vLLM's Transformers backend.
"""

from __future__ import annotations

#: Architectures (config.json ``architectures``) vLLM serves LoRA adapters for.
VLLM_LORA = frozenset(
    """
    AfmoeForCausalLM ApertusForCausalLM ArceeForCausalLM BailingMoeForCausalLM BailingMoeV2ForCausalLM ChatGLMModel
    ChatGLMForConditionalGeneration CohereForCausalLM Cohere2ForCausalLM Cohere2MoeForCausalLM CwmForCausalLM DeciLMForCausalLM
    DeepseekForCausalLM DeepseekV2ForCausalLM DeepseekV3ForCausalLM DeepseekV32ForCausalLM DotsOCRForCausalLM Ernie4_5ForCausalLM
    Ernie4_5_MoeForCausalLM ExaoneForCausalLM Exaone4ForCausalLM Fairseq2LlamaForCausalLM FalconH1ForCausalLM GemmaForCausalLM
    Gemma2ForCausalLM Gemma3ForCausalLM Gemma4ForCausalLM GlmForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM Glm4MoeLiteForCausalLM
    GlmMoeDsaForCausalLM GptOssForCausalLM GraniteForCausalLM GraniteMoeForCausalLM GraniteMoeHybridForCausalLM
    GraniteMoeSharedForCausalLM GraniteMoeSWAForCausalLM GraniteSWAForCausalLM GritLM HunYuanDenseV1ForCausalLM
    HunYuanMoEV1ForCausalLM HYV3ForCausalLM HyperCLOVAXForCausalLM InternLM2ForCausalLM InternLM3ForCausalLM JambaForCausalLM
    Lfm2ForCausalLM Lfm2MoeForCausalLM LlamaForCausalLM LongcatFlashForCausalLM MiMoForCausalLM MiniCPMForCausalLM
    MiniCPM3ForCausalLM MiniMaxM2ForCausalLM MistralForCausalLM MistralLarge3ForCausalLM MixtralForCausalLM NemotronForCausalLM
    NemotronHForCausalLM Olmo3ForCausalLM OlmoHybridForCausalLM OPTForCausalLM PanguEmbeddedForCausalLM PanguProMoEV2ForCausalLM
    PanguUltraMoEForCausalLM Param2MoEForCausalLM PhiForCausalLM Phi3ForCausalLM PhiMoEForCausalLM Plamo3ForCausalLM
    Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM Qwen3NextForCausalLM SarvamMoEForCausalLM
    SeedOssForCausalLM SolarForCausalLM Step1ForCausalLM TeleChat2ForCausalLM TeleChat3ForCausalLM TeleFLMForCausalLM
    GPTBigCodeForCausalLM OlmoForCausalLM Olmo2ForCausalLM SmolLM3ForCausalLM Starcoder2ForCausalLM VaultGemmaForCausalLM
    """.split()
)

#: Architectures vLLM runs, but without LoRA (an adapter for them is refused when the server loads it).
VLLM_NO_LORA = frozenset(
    """
    ArcticForCausalLM AXK1ForCausalLM BailingMoeV2_5ForCausalLM BailingMoeV3ForCausalLM BloomForCausalLM DbrxForCausalLM
    DeepseekV4ForCausalLM ExaoneMoeForCausalLM FalconForCausalLM FalconMambaForCausalLM FlexOlmoForCausalLM Gemma3nForCausalLM
    GPT2LMHeadModel GPTJForCausalLM GPTNeoXForCausalLM HrmTextForCausalLM IQuestCoderForCausalLM IQuestLoopCoderForCausalLM
    Jais2ForCausalLM KimiLinearForCausalLM MambaForCausalLM Mamba2ForCausalLM MellumForCausalLM MiMoV2FlashForCausalLM
    MiMoV2ForCausalLM MiniMaxM3SparseForCausalLM MPTForCausalLM OlmoeForCausalLM OrionForCausalLM RWForCausalLM Rnj1ForCausalLM
    SarvamMLAForCausalLM StableLmForCausalLM StableLMEpochForCausalLM Step3p5ForCausalLM Zamba2ForCausalLM
    """.split()
)


def vllm_lora_support(architecture: str | None) -> bool | None:
    """True when vLLM serves LoRA for ``architecture``, False when it runs it without LoRA, None when unknown."""
    if architecture in VLLM_LORA:
        return True
    if architecture in VLLM_NO_LORA:
        return False
    return None
