"""New tokens in a model's text encoders: what textual inversion adds, and what loads it back into a pipeline.

A model conditions on one text encoder (SD 1.x/2.x) or several (SD3: CLIP-L, CLIP-G and T5 when present; FLUX.1:
CLIP-L's pooled embedding and T5's states), so a new token needs a row in every one of them, each of its own width.
The file format follows the published conventions: one encoder, diffusers' textual-inversion file {token: [D]}
(a stock pipeline's `load_textual_inversion` reads it); several, one vector per encoder under the keys `clip_l`,
`clip_g`, `t5` (the SDXL community convention, which `load_textual_inversion` reads one encoder at a time where a
pipeline has it, e.g. FLUX.1's), with the token in the file's metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = ""  # the key of the only text encoder of a one-encoder model
# key -> (tokenizer attribute, text encoder attribute) of each multi-encoder pipeline
SLOTS = {StableDiffusion3Pipeline: {"clip_l": ("tokenizer", "text_encoder"),
                                    "clip_g": ("tokenizer_2", "text_encoder_2"),
                                    "t5": ("tokenizer_3", "text_encoder_3")},
         FluxPipeline: {"clip_l": ("tokenizer", "text_encoder"), "t5": ("tokenizer_2", "text_encoder_2")}}


def text_encoders(model) -> dict[str, tuple]:
    """{key: (tokenizer, text encoder)} of every text encoder `model` conditions on (a family bundle or a stock
    pipeline); an SD3 checkpoint without T5 has no `t5`."""
    pipe = getattr(model, "pipeline", model)
    slots = next((s for cls, s in SLOTS.items() if isinstance(pipe, cls)), {SINGLE: ("tokenizer", "text_encoder")})
    return {key: (getattr(pipe, tok), getattr(pipe, enc)) for key, (tok, enc) in slots.items()
            if getattr(pipe, enc, None) is not None}


def add_token(tokenizer, encoder: torch.nn.Module, token: str) -> int:
    """Adds `token` to `tokenizer` and makes sure `encoder`'s embedding table has its row; returns its id. The table
    grows only when the id falls outside it (T5's has spare rows past its vocabulary, which must not be cut)."""
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"{token!r} is already a token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= encoder.get_input_embeddings().weight.shape[0]:
        encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)  # the caller sets the new row
    return token_id


def save_token_embeddings(path: Path, token: str, vectors: dict[str, torch.Tensor]) -> None:
    """`vectors` {key: [D]} of one token (keys of `text_encoders`) in the module docstring's format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if set(vectors) == {SINGLE}:
        save_file({token: vectors[SINGLE].float().contiguous()}, str(path))
    else:
        save_file({k: v.float().contiguous() for k, v in vectors.items()}, str(path), metadata={"token": token})


def load_token_embeddings(model, path: Path) -> str:
    """Adds the token saved at `path` to every text encoder of `model` with its vector; returns the token. A file
    that lacks one of the model's encoders, or whose vector has another width, is refused (ValueError)."""
    encoders = text_encoders(model)
    with safe_open(str(path), "pt") as f:
        keys, token = list(f.keys()), (f.metadata() or {}).get("token")
        tensors = {k: f.get_tensor(k) for k in keys}
    if set(encoders) == {SINGLE}:
        if len(keys) != 1:
            raise ValueError(f"{path}: a one-encoder model takes one {{token: vector}} entry, the file has {keys}")
        token, vectors = keys[0], {SINGLE: tensors[keys[0]]}
    else:
        missing = sorted(set(encoders) - set(keys))
        if token is None or missing:
            raise ValueError(f"{path}: needs the token in its metadata and a vector for each of {sorted(encoders)} "
                             f"(missing: {missing or 'the token'})")
        vectors = tensors
    for key, (_, encoder) in encoders.items():   # every vector checked before any encoder changes
        rows = encoder.get_input_embeddings().weight.shape[1:]
        if vectors[key].shape != rows:
            raise ValueError(f"{path}: the {key or 'token'} vector has shape {tuple(vectors[key].shape)}, the text "
                             f"encoder's rows {tuple(rows)}")
    for key, (tokenizer, encoder) in encoders.items():
        token_id = add_token(tokenizer, encoder, token)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[token_id] = vectors[key].to(table.dtype)
    return token
