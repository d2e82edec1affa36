#!/usr/bin/env python3
"""End-to-end check of ``--attention-backend flashmla_ops`` in a real SGLang server, offline, on a Hopper GPU.

For each configuration (``--modes``; tensor parallel 1, and 2 with ``--tp 2``) and each server of that
configuration, the script:

1. launches ``python -m sglang.launch_server --attention-backend <backend> --page-size 64 ...`` on a tiny
   DeepSeek (MLA) model it writes itself, with the same ``--random-seed``;
2. sends one batch of greedy requests (prompt lengths chosen around the 64-token page boundaries) with
   ``return_logprob`` and ``top_logprobs_num``, and records every decode step's logprobs;
3. measures decode throughput: the same batch with ``max_new_tokens = N`` and ``= 1``, so
   ``decode tokens/s = batch * (N - 1) / (t_N - t_1)`` (prefill cancels out);
4. stops the server.

Configurations (``--modes``, default ``cuda_graph,eager``):

* ``cuda_graph`` / ``eager``: ``flashmla_ops`` and the builtin ``flashmla`` (``--backends``) with decode CUDA
  graphs on / ``--disable-cuda-graph``, on the DeepSeek-V2 model; each compared with ``--reference``.
* ``mtp``: speculative decoding the way DeepSeek-V3 is served: ``--speculative-algorithm NEXTN`` with the
  model's NextN (MTP) layer as the draft (``--speculative-draft-model-path``), ``--speculative-eagle-topk 1``,
  CUDA graphs on. The target model's verify step (s_q = ``--speculative-num-draft-tokens`` query tokens per
  request, causal) runs on the backend under test; the draft steps run on
  ``--speculative-draft-attention-backend flashmla`` (SGLang's draft-backend tables are closed dictionaries).
  ``flashmla_ops`` is compared with the builtin ``flashmla`` in the same configuration: logprobs, and the
  acceptance length of both (``completion_tokens / spec_verify_ct`` of the responses' ``meta_info``, SGLang's
  own ``spec_accept_length``). With random weights the draft rarely agrees with the target, so the acceptance
  length is close to 1 for both; it shows that speculative decoding ran and the two agree.
* ``torch_compile``: ``flashmla_ops`` with ``--enable-torch-compile`` (CUDA graphs on, captured, and so
  compiled, at the two batch sizes the script sends unless ``--cuda-graph-bs`` says otherwise), compared
  with ``flashmla_ops`` without it at the same sizes (the ``cuda_graph`` run of the same invocation is
  reused when it captured the same sizes, here and in ``fp8``). The compiled server runs with
  ``TORCH_LOGS=graph_breaks``; the script counts the graph breaks in its log, and those attributed to the
  attention backend (a location or reason naming flashmla_ops, SGLang's ``flashmla_backend.py`` or
  ``flash_mla``) must be zero: the adapter is designed to trace without one. ``--torch-compile-mode`` sets
  SGLang's compile mode (``SGLANG_TORCH_COMPILE_MODE``; SGLang's default, max-autotune-no-cudagraphs, spends
  about 85 s per captured size on an H100 in Inductor's autotuning, ``default`` a fraction of that).

* ``fp8``: ``--kv-cache-dtype fp8_e4m3`` (SGLang stores unscaled e4m3 unless the checkpoint has a k scale),
  CUDA graphs on: ``flashmla_ops`` (bf16 q, the e4m3 pool read directly) against the builtin ``flashmla``
  (which quantises q to e4m3 too and runs FlashMLA's dense-FP8 kernel) and against ``flashmla_ops`` on a bf16
  cache, all three compared with ``flashmla_ops+fp8``; decode throughput of each. FP8 rounds every cached
  value (relative error up to 2^-4), which moves logprobs by much more than bf16 noise: these comparisons use
  ``--fp8-atol`` / ``--fp8-mean-atol``.
* ``deterministic``: one ``flashmla_ops`` server with ``--enable-deterministic-inference`` (CUDA graphs on),
  which makes the backend plan every decode with flashmla_ops' batch-invariant schedule (the server log
  must say so). One target prompt (``--deterministic-prompt-len``) is decoded alone, then inside a batch of
  the other prompts (``--deterministic-other-lens``, different lengths; the target in the middle), then in
  a smaller batch of every second one of them (another batch size, so another CUDA graph; the target
  last), each time greedily for ``--new-tokens`` tokens with top-``--top-logprobs`` logprobs. It passes when
  the target's output ids, token logprobs and top-k logprobs (ids and values) are identical in all three:
  bit-for-bit equality, no tolerance. SGLang's deterministic mode makes the rest of the model
  batch-invariant; the prefill is SGLang's FlashInfer MLA path (``--prefill-backend`` to choose another),
  so a difference from the first generated token on points at the prefill, later ones at the decode.
  ``--deterministic-control`` adds the same check on a ``flashmla_ops`` server without the flag (reported,
  not required: with the default schedule the batch changes how a request is split).

It then compares each server's logprobs with its configuration's reference, prints a summary table, writes
all results to ``--out`` (one JSON, as before) and one ``<configuration>.json`` per configuration to
``--out-dir``. Exit status 0 when every server ran and every configuration passed.

Tolerance (``--atol``, ``--mean-atol``): both backends run the same model code and differ only in the
attention kernel of decode steps: the order of the fp32 accumulations and the split-KV combine, and the bf16
rounding of the attention output (half a bf16 ulp, 2^-9 relative). Passed through two layers and the LM head,
that moves logits by O(1e-2), and the logprobs by about as much. A logprob compared here must differ by at
most ``--atol`` = 0.1 (about 10 %, in probability), and the mean difference must stay within
``--mean-atol`` = 0.02. A kernel bug (a wrong page, a lost split, a wrong mask) moves logprobs by O(1) at some
position. Greedy decoding may legitimately diverge where two tokens are tied within that noise. Positions are
compared up to and including the first divergence, because after it the two contexts differ. For each
divergence the reference's top-2 gap there is reported (``tie_gap``). The builtin backend's own CUDA-graph vs
eager difference is reported as a noise floor. ``torch_compile`` uses the same tolerances: Inductor's fused
kernels round bf16 intermediates differently, which is noise of the same order.

Models: 2 layers, hidden 1024, 16 heads (``--num-heads``; 128 = DeepSeek-V3's head count), kv_lora_rank 512,
qk_rope_head_dim 64 (the MLA geometry FlashMLA supports), vocab 1024, dense MLPs. ``cuda_graph``, ``eager``
and ``torch_compile`` use a DeepSeek-V2 model (``DeepseekV2ForCausalLM``); ``mtp`` uses a DeepSeek-V3 model
(``DeepseekV3ForCausalLM``, ``num_nextn_predict_layers`` 1, sigmoid ``noaux_tc`` routing) whose checkpoint
also holds the NextN layer as ``model.layers.2.*`` (the DeepSeek-V3 layout: ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head``, and an MoE MLP of 16 experts in 4 groups), plus a standalone draft checkpoint
(``DeepseekV3ForCausalLMNextN``, ``num_hidden_layers`` 1, the layer renamed ``model.layers.0.*``, without
the embedding and head, which the draft shares with the target), the layout of SGLang's
``export_deepseek_nextn.py``. ``--mtp-draft target`` points the draft at the target checkpoint instead. No
tokenizer: the servers run with ``--skip-tokenizer-init`` and requests carry ``input_ids``. Weights:
``random`` (default; std ``--init-std`` 0.05, which makes the attention clearly non-uniform, so the
comparison is sensitive to the kernel): the V2 checkpoint is written with transformers, the V3 / NextN
checkpoints directly as safetensors (torch only). ``dummy`` uses SGLang's ``--load-format dummy`` (uniform
+-1e-3, near-uniform attention: a smoke test only).

Requirements: a Hopper (sm_90) GPU; SGLang with its CUDA dependencies (tested against the 0.5.17 layout, the
newest release pinned to torch 2.11; 0.5.23 has the same flags); flashmla_ops installed with its CUDA
extension (the plugin is found through its ``sglang.srt.plugins`` entry point); transformers (for
``--weights random``). Nothing is downloaded: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set for the servers.
FlashInfer compiles its MLA prefill kernels at first use (minutes); ``--prefill-backend triton`` avoids
FlashInfer kernels (both backends then run as decode backends of a hybrid; ``mtp`` then adds
``--speculative-attention-mode decode`` so that the verify step still runs on the backend under test).

Usage::

    python tools/sglang_e2e.py --out sglang_e2e.json            # TP 1, CUDA graphs on and off
    python tools/sglang_e2e.py --tp 1 2 --out sglang_e2e.json    # TP 1 and TP 2 (two GPUs)
    python tools/sglang_e2e.py --modes mtp,torch_compile --out-dir e2e  # e2e/mtp.json, e2e/torch_compile.json
    python tools/sglang_e2e.py --modes fp8 --out-dir e2e                 # e2e/fp8.json
    python tools/sglang_e2e.py --modes deterministic --out-dir e2e       # e2e/deterministic.json
    python tools/sglang_e2e.py --modes cuda_graph,eager,mtp,torch_compile,fp8 --dry-run   # the commands only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BACKEND_UNDER_TEST = "flashmla_ops"
PAGE_SIZE = 64
DEFAULT_PROMPT_LENS = "1,7,63,64,65,100,127,128,129,191,200,256,257,300,511,700"
MODES = ("cuda_graph", "eager", "mtp", "torch_compile", "fp8", "deterministic")
DEFAULT_MODES = "cuda_graph,eager"
# What the draft steps of ``mtp`` run on: SGLang's draft-backend tables (speculative/draft_utils.py,
# DraftBackendFactory) are closed dictionaries that do not know flashmla_ops.
DRAFT_ATTENTION_BACKEND = "flashmla"
COMPILED = f"{BACKEND_UNDER_TEST}+torch_compile"
FP8_SUFFIX = "+fp8"  # a server with --kv-cache-dtype fp8_e4m3
FP8_UNDER_TEST = BACKEND_UNDER_TEST + FP8_SUFFIX
DETERMINISTIC = f"{BACKEND_UNDER_TEST}+deterministic"  # a server with --enable-deterministic-inference
# ``deterministic`` keys the target's outputs in a batch as ``<server>@batch<i>``; ``<server>`` is it alone
IN_BATCH = "@batch"
DEFAULT_DETERMINISTIC_OTHER_LENS = "1,7,63,64,65,100,127,128,129,191,200,256,257,511,700"


# ---- the tiny model ----------------------------------------------------------------------------------------
def model_config(num_heads: int, init_std: float) -> dict[str, Any]:
    """A DeepSeek-V2 MLA config with FlashMLA's geometry (latent 512 + RoPE 64) and all-dense MLPs."""
    layers = 2
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 1024,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        # MoE fields SGLang's DeepSeek model reads; first_k_dense_replace == layers makes every MLP dense
        "moe_intermediate_size": 256,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": layers,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "ep_size": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": init_std,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def write_model(path: Path, weights: str, num_heads: int, init_std: float, seed: int) -> dict[str, Any]:
    """Write the model directory (config, generation config, and for ``random`` a safetensors checkpoint)."""
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(num_heads, init_std)
    info: dict[str, Any] = {"path": str(path), "weights": weights, "config": config}
    if weights == "random":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        (path / "config.json").write_text(json.dumps(config, indent=1))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        del model
    # (re)write our config last: save_pretrained may rewrite it in its own format
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return info


# ---- the tiny model with an MTP (NextN) layer, for ``mtp`` -------------------------------------------------
# What SGLang expects, read from sglang 0.5.23 (srt/configs/model_config.py ``_config_draft_model``,
# srt/arg_groups/speculative_hook.py ``_handle_eagle_family``, srt/models/deepseek_nextn.py,
# srt/models/deepseek_common/deepseek_weight_loader.py ``_initialize_nextn_conf`` / ``do_load_weights``):
# * the target is ``DeepseekV3ForCausalLM`` with ``num_nextn_predict_layers`` = 1; loading it skips every
#   ``model.layers.<i>`` with i >= num_hidden_layers, so the NextN layer may sit in the same checkpoint;
# * a draft model's ``DeepseekV3ForCausalLM`` architecture is rewritten to ``DeepseekV3ForCausalLMNextN``
#   (which a standalone draft checkpoint names itself); its loader reads only ``model.layers.<N>.*`` with
#   N = 0 if num_hidden_layers == 1 else num_hidden_layers, maps ``enorm``, ``hnorm``, ``eh_proj`` and
#   ``shared_head.norm`` to ``model.*`` and everything else to ``model.decoder.*``, and skips
#   ``embed_tokens`` and ``shared_head.head`` (the EAGLE worker gives the draft the target's embedding and LM
#   head);
# * the NextN decoder layer is always an MoE layer (``DeepseekV2DecoderLayer._is_layer_sparse``: is_nextn);
#   its gate has ``e_score_correction_bias`` (fp32) when ``topk_method`` is ``noaux_tc``.
def mtp_model_config(num_heads: int, init_std: float) -> dict[str, Any]:
    """A DeepSeek-V3 config (same attention geometry as :func:`model_config`) with one NextN layer.

    The two target layers stay dense (``first_k_dense_replace`` = 2); the NextN layer's MoE has 16 experts in
    4 groups (top-2 groups, top-2 experts, sigmoid scores with a correction bias: DeepSeek-V3's routing), a
    shape SGLang's fused grouped-top-k kernels accept (power-of-two experts, <= 32 per group)."""
    config = model_config(num_heads, init_std)
    config |= {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
    }
    for key in ("aux_loss_alpha", "seq_aux"):  # DeepSeek-V2 fields only
        config.pop(key)
    return config


def nextn_draft_config(target: dict[str, Any]) -> dict[str, Any]:
    """The standalone draft's config: the target's, one hidden layer, the NextN architecture."""
    return target | {"num_hidden_layers": 1, "architectures": ["DeepseekV3ForCausalLMNextN"]}


def _decoder_layer_weights(prefix: str, c: dict[str, Any], moe: bool) -> dict[str, tuple[tuple, str, str]]:
    """name -> (shape, safetensors dtype, init) of one DeepSeek decoder layer (MLA without q LoRA)."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    w: dict[str, tuple[tuple, str, str]] = {
        "input_layernorm.weight": ((hidden,), "BF16", "ones"),
        "post_attention_layernorm.weight": ((hidden,), "BF16", "ones"),
        "self_attn.q_proj.weight": ((heads * (nope + rope), hidden), "BF16", "normal"),
        "self_attn.kv_a_proj_with_mqa.weight": ((rank + rope, hidden), "BF16", "normal"),
        "self_attn.kv_a_layernorm.weight": ((rank,), "BF16", "ones"),
        "self_attn.kv_b_proj.weight": ((heads * (nope + v), rank), "BF16", "normal"),
        "self_attn.o_proj.weight": ((hidden, heads * v), "BF16", "normal"),
    }

    def mlp(name: str, inter: int) -> None:
        w[f"{name}.gate_proj.weight"] = ((inter, hidden), "BF16", "normal")
        w[f"{name}.up_proj.weight"] = ((inter, hidden), "BF16", "normal")
        w[f"{name}.down_proj.weight"] = ((hidden, inter), "BF16", "normal")

    if moe:
        experts = c["n_routed_experts"]
        w["mlp.gate.weight"] = ((experts, hidden), "BF16", "normal")
        w["mlp.gate.e_score_correction_bias"] = ((experts,), "F32", "zeros")
        for e in range(experts):
            mlp(f"mlp.experts.{e}", c["moe_intermediate_size"])
        mlp("mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
    else:
        mlp("mlp", c["intermediate_size"])
    return {prefix + k: val for k, val in w.items()}


def mtp_weight_layout(c: dict[str, Any]) -> dict[str, tuple[tuple, str, str]]:
    """Every tensor of the target checkpoint: the dense target layers, then the NextN layer as
    ``model.layers.<num_hidden_layers>.*`` (with its own copy of the embedding and head, as DeepSeek-V3 ships
    it; SGLang skips both)."""
    hidden, vocab, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    w: dict[str, tuple[tuple, str, str]] = {"model.embed_tokens.weight": ((vocab, hidden), "BF16", "normal")}
    for i in range(n):
        w |= _decoder_layer_weights(f"model.layers.{i}.", c, moe=False)
    w["model.norm.weight"] = ((hidden,), "BF16", "ones")
    w["lm_head.weight"] = ((vocab, hidden), "BF16", "normal")
    nextn = f"model.layers.{n}."
    w[nextn + "embed_tokens.weight"] = ((vocab, hidden), "BF16", "normal")
    w[nextn + "enorm.weight"] = ((hidden,), "BF16", "ones")
    w[nextn + "hnorm.weight"] = ((hidden,), "BF16", "ones")
    w[nextn + "eh_proj.weight"] = ((hidden, 2 * hidden), "BF16", "normal")
    w |= _decoder_layer_weights(nextn, c, moe=True)
    w[nextn + "shared_head.norm.weight"] = ((hidden,), "BF16", "ones")
    w[nextn + "shared_head.head.weight"] = ((vocab, hidden), "BF16", "normal")
    return w


def nextn_draft_names(target_names: list[str], num_hidden_layers: int) -> dict[str, str]:
    """target checkpoint name -> standalone draft name: ``model.layers.<N>`` -> ``model.layers.0``, without
    the embedding and head (the renaming of SGLang's ``scripts/export_deepseek_nextn.py``)."""
    prefix = f"model.layers.{num_hidden_layers}."
    return {
        name: "model.layers.0." + name[len(prefix) :]
        for name in target_names
        if name.startswith(prefix) and "embed_tokens" not in name and "shared_head.head" not in name
    }


def write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """Write torch tensors (bf16 / fp32) as one safetensors file: an 8-byte little-endian header size, a JSON
    header (dtype, shape, byte offsets per tensor; 8-byte aligned), then the raw little-endian data."""
    import torch

    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def write_mtp_model(
    path: Path, draft_path: Path, weights: str, num_heads: int, init_std: float, seed: int
) -> dict[str, Any]:
    """Write the DeepSeek-V3 target (with its NextN layer) and the standalone NextN draft checkpoint.

    ``random``: every matrix ~ N(0, init_std) (bf16), norms 1, the gate's correction bias 0; the draft holds
    the same NextN tensors as the target. Needs torch (and numpy), not transformers."""
    config = mtp_model_config(num_heads, init_std)
    draft_config = nextn_draft_config(config)
    layout = mtp_weight_layout(config)
    renamed = nextn_draft_names(list(layout), config["num_hidden_layers"])
    info: dict[str, Any] = {
        "path": str(path),
        "draft_path": str(draft_path),
        "weights": weights,
        "config": config,
        "draft_config": draft_config,
    }
    for directory, cfg in ((path, config), (draft_path, draft_config)):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(cfg, indent=1))
        (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    if weights == "random":
        import torch

        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, (shape, dtype, init) in layout.items():
            if init == "normal":
                t = torch.randn(shape, generator=generator) * init_std
            else:
                t = torch.ones(shape) if init == "ones" else torch.zeros(shape)
            tensors[name] = t.to(torch.bfloat16 if dtype == "BF16" else torch.float32)
        write_safetensors(path / "model.safetensors", tensors)
        write_safetensors(
            draft_path / "model.safetensors", {new: tensors[old] for old, new in renamed.items()}
        )
        info["parameters"] = sum(t.numel() for t in tensors.values())
        info["draft_parameters"] = sum(tensors[old].numel() for old in renamed)
    return info


# ---- the server --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_batch(args: argparse.Namespace) -> int:
    """The largest batch any configuration sends: every decode of it runs in a captured CUDA graph."""
    return max(args.batch, len(args.prompt_lens), len(args.deterministic_other_lens) + 1)


def graph_batch_sizes(args: argparse.Namespace, mode: str) -> list[int]:
    """The decode batch sizes a server captures CUDA graphs for; empty: SGLang's own list up to
    :func:`max_batch`. ``--cuda-graph-bs`` for every graphed configuration; without it ``torch_compile``
    captures only the two batch sizes the script sends (the logprob batch and the throughput batch):
    Inductor's max-autotune compiles each captured size separately, about 85 s each on an H100, so SGLang's
    20 sizes would take half an hour. Smaller batches (requests that finished early) run padded to the next
    size."""
    if args.cuda_graph_bs:
        return sorted(set(args.cuda_graph_bs))
    if mode == "torch_compile":
        return sorted({len(args.prompt_lens), args.batch})
    return []


def server_command(
    args: argparse.Namespace,
    model: Path,
    backend: str,
    mode: str,
    tp: int,
    port: int,
    *,
    draft_model: Path | None = None,
    torch_compile: bool = False,
    kv_fp8: bool = False,
    deterministic: bool = False,
) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model)]
    cmd += ["--load-format", "dummy" if args.weights == "dummy" else "auto", "--dtype", "bfloat16"]
    if args.prefill_backend:
        cmd += ["--prefill-attention-backend", args.prefill_backend, "--decode-attention-backend", backend]
    else:
        cmd += ["--attention-backend", backend]
    cmd += ["--page-size", str(PAGE_SIZE), "--tp", str(tp), "--random-seed", str(args.seed)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--disable-radix-cache"]
    cmd += ["--mem-fraction-static", str(args.mem_fraction), "--context-length", "4096"]
    cmd += ["--max-running-requests", str(max_batch(args) * 2), "--log-level", "info"]
    if mode == "eager":
        cmd += ["--disable-cuda-graph"]
    else:  # cuda_graph, mtp, torch_compile, fp8, deterministic: decode (and verify) CUDA graphs on
        sizes = graph_batch_sizes(args, mode)
        if sizes:
            cmd += ["--cuda-graph-bs-decode", *map(str, sizes)]
        else:
            cmd += ["--cuda-graph-max-bs-decode", str(max_batch(args))]
    if mode == "mtp":
        if draft_model is None:
            raise ValueError("mode mtp needs a draft model")
        # NEXTN is SGLang's alias of EAGLE (speculative_hook._resolve_speculative_algorithm_alias); topk 1 is
        # what the flashmla draft backend supports (FlashMLAMultiStepDraftBackend).
        cmd += ["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", str(draft_model)]
        cmd += ["--speculative-num-steps", str(args.spec_steps), "--speculative-eagle-topk", "1"]
        cmd += ["--speculative-num-draft-tokens", str(args.spec_steps + 1)]
        cmd += ["--speculative-draft-attention-backend", DRAFT_ATTENTION_BACKEND]
        if args.prefill_backend:
            # a hybrid backend sends target_verify to its prefill backend unless told otherwise
            # (HybridAttnBackend._select_backend)
            cmd += ["--speculative-attention-mode", "decode"]
    if torch_compile:
        cmd += ["--enable-torch-compile", "--torch-compile-max-bs", str(args.torch_compile_max_bs)]
    if kv_fp8:
        cmd += ["--kv-cache-dtype", "fp8_e4m3"]
    if deterministic:
        cmd += ["--enable-deterministic-inference"]
    return cmd + args.extra_server_args


def torch_logs_env(environ: dict[str, str] | None = None, compile_mode: str | None = None) -> dict[str, str]:
    """The environment a ``torch_compile`` server gets on top of ours: TORCH_LOGS with ``graph_breaks``, and
    with ``compile_mode`` SGLang's ``SGLANG_TORCH_COMPILE_MODE`` (SGLang's default:
    max-autotune-no-cudagraphs)."""
    current = (os.environ if environ is None else environ).get("TORCH_LOGS", "")
    parts = [p for p in current.split(",") if p]
    if "graph_breaks" not in parts and "+graph_breaks" not in parts:
        parts.append("graph_breaks")
    env = {"TORCH_LOGS": ",".join(parts)}
    if compile_mode:
        env["SGLANG_TORCH_COMPILE_MODE"] = compile_mode
    return env


def http(url: str, payload: dict | None = None, timeout: float = 600.0) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Server:
    """``sglang.launch_server`` in its own process group (so that stopping it stops its workers too)."""

    def __init__(
        self,
        cmd: list[str],
        log_path: Path,
        workdir: Path,
        port: int,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.cmd, self.log_path, self.url = cmd, log_path, f"http://127.0.0.1:{port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        env |= extra_env or {}
        # NVLink multicast stays off unless the caller turned it on: shared multi-GPU hosts ask for that, a
        # two-rank test does not need it.
        for var, value in (
            ("NCCL_NVLS_ENABLE", "0"),
            ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
            ("NVSHMEM_DISABLE_NVLS", "1"),
        ):
            env.setdefault(var, value)
        self.log = open(log_path, "w")  # closed in stop()
        # cwd = workdir: never the repository root, whose flashmla_ops/ source folder (no compiled
        # extension) would shadow the installed package in the server's sys.path.
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                http(self.url + "/get_model_info", timeout=5)
                # one short generation: the first request also runs lazy initialisation (and JIT builds)
                http(
                    self.url + "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
                )
                return
            time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


# ---- requests ----------------------------------------------------------------------------------------------
def prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def generate_with_logprobs(url: str, input_ids: list[list[int]], new_tokens: int, top_k: int) -> list[dict]:
    response = http(
        url + "/generate",
        {
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True},
            "return_logprob": True,
            "top_logprobs_num": top_k,
        },
    )
    results = []
    for item in response if isinstance(response, list) else [response]:
        meta = item["meta_info"]
        results.append(
            {
                "output_ids": item.get("output_ids") or [t[1] for t in meta["output_token_logprobs"]],
                "token_logprobs": [t[0] for t in meta["output_token_logprobs"]],
                "top_logprobs": [
                    {str(entry[1]): entry[0] for entry in position} if position else {}
                    for position in meta["output_top_logprobs"]
                ],
                "meta": {k: meta[k] for k in SPEC_META_FIELDS if k in meta},
            }
        )
    return results


# meta_info fields of speculative decoding (sglang 0.5.23 TokenizerManager._calculate_spec_decoding_metrics:
# spec_accept_length = completion_tokens / spec_verify_ct, the bonus token included)
SPEC_META_FIELDS = ("completion_tokens", "spec_verify_ct", "spec_accept_length", "spec_accept_rate")


def acceptance_length(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance length of a batch from its responses' ``meta_info``: total completion tokens / total verify
    steps (SGLang's ``spec_accept_length`` per request, summed over the batch), and the mean of the
    per-request values. ``measured`` is False when no response carries ``spec_verify_ct`` > 0 (speculative
    decoding did not run)."""
    spec = [m for m in metas if m.get("spec_verify_ct") and m.get("completion_tokens") is not None]
    if not spec:
        return {"measured": False, "requests": len(metas)}
    completion = sum(m["completion_tokens"] for m in spec)
    verify = sum(m["spec_verify_ct"] for m in spec)
    per_request = [m.get("spec_accept_length") or m["completion_tokens"] / m["spec_verify_ct"] for m in spec]
    rates = [m["spec_accept_rate"] for m in spec if m.get("spec_accept_rate") is not None]
    return {
        "measured": True,
        "requests": len(metas),
        "requests_with_verify": len(spec),
        "completion_tokens": completion,
        "verify_steps": verify,
        "accept_length": completion / verify,
        "mean_request_accept_length": statistics.fmean(per_request),
        "mean_accept_rate": statistics.fmean(rates) if rates else None,
    }


# ---- graph breaks (TORCH_LOGS=graph_breaks) ----------------------------------------------------------------
# torch._dynamo logs one record per graph break (torch 2.13 symbolic_convert.py, the "graph_breaks" artifact):
# "Graph break in user code at <file>:<line>" or, for a repeat, "Graph break (user stack suppressed due to
# duplicate graph break) in user code at <file>:<line>", each followed by "Graph Break Reason: <reason>".
# A frame Dynamo gives up on entirely logs "WON'T CONVERT <function> <file> line <n>" (exc.py).
_GRAPH_BREAK = re.compile(
    r"Graph break (?:\(user stack suppressed due to duplicate graph break\) )?in user code at (\S+?):(\d+)"
)
_GRAPH_BREAK_REASON = re.compile(r"Graph Break Reason: (.*)")
_WONT_CONVERT = re.compile(r"WON'T CONVERT (\S+) (\S+) line (\d+)")
# a graph break is the attention backend's when its location or reason names one of these
ATTENTION_MARKERS = ("flashmla_ops", "flashmla_backend", "flash_mla", "sglang_backend.py")


def count_graph_breaks(log_text: str) -> dict[str, Any]:
    """Count Dynamo graph breaks in a server log written with ``TORCH_LOGS=graph_breaks``."""
    lines = log_text.splitlines()
    breaks = []
    for i, line in enumerate(lines):
        match = _GRAPH_BREAK.search(line)
        if match is None:
            continue
        reason = next(
            (m.group(1).strip() for m in map(_GRAPH_BREAK_REASON.search, lines[i : i + 4]) if m), None
        )
        breaks.append(
            {
                "location": f"{match.group(1)}:{match.group(2)}",
                "reason": reason,
                "duplicate": "duplicate graph break" in line,
            }
        )
    wont_convert = [
        {"function": m.group(1), "location": f"{m.group(2)}:{m.group(3)}"}
        for m in map(_WONT_CONVERT.search, lines)
        if m
    ]

    def attention(entry: dict[str, Any]) -> bool:
        text = " ".join(str(v) for v in entry.values()).lower()
        return any(marker in text for marker in ATTENTION_MARKERS)

    locations: dict[str, int] = {}
    for b in breaks:
        locations[b["location"]] = locations.get(b["location"], 0) + 1
    attention_breaks = [b for b in breaks if attention(b)] + [w for w in wont_convert if attention(w)]
    return {
        "total": len(breaks),
        "unique_locations": len(locations),
        "locations": locations,
        "reasons": sorted({b["reason"] for b in breaks if b["reason"]}),
        "wont_convert": wont_convert,
        "attention": len(attention_breaks),
        "attention_details": attention_breaks,
    }


def measure_decode_throughput(url: str, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    batch = prompts([args.throughput_prompt_len] * args.batch, vocab, args.seed + 1)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        http(
            url + "/generate",
            {"input_ids": batch, "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True}},
        )
        return time.perf_counter() - start

    timed(args.throughput_tokens)  # warm-up
    t_full = statistics.median(timed(args.throughput_tokens) for _ in range(args.rounds))
    t_one = statistics.median(timed(1) for _ in range(args.rounds))
    steps = args.throughput_tokens - 1
    decode_s = max(t_full - t_one, 1e-9)
    return {
        "batch": args.batch,
        "prompt_len": args.throughput_prompt_len,
        "new_tokens": args.throughput_tokens,
        "seconds_full": t_full,
        "seconds_first_token": t_one,
        "decode_tokens_per_s": args.batch * steps / decode_s,
        "ms_per_decode_step": 1e3 * decode_s / steps,
    }


# ---- comparison --------------------------------------------------------------------------------------------
def mode_variants(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The servers of one configuration: name (what results are keyed by), backend, torch_compile, kv_fp8,
    and for ``deterministic`` whether the server runs with ``--enable-deterministic-inference`` and whether
    it is the (optional, not required) control without it."""
    if mode == "deterministic":
        plain = {"backend": BACKEND_UNDER_TEST, "torch_compile": False, "kv_fp8": False}
        variants = [plain | {"name": DETERMINISTIC, "deterministic": True, "control": False}]
        if args.deterministic_control:
            variants.append(plain | {"name": BACKEND_UNDER_TEST, "deterministic": False, "control": True})
        return variants
    if mode == "torch_compile":
        return [
            {"name": COMPILED, "backend": BACKEND_UNDER_TEST, "torch_compile": True, "kv_fp8": False},
            {
                "name": BACKEND_UNDER_TEST,
                "backend": BACKEND_UNDER_TEST,
                "torch_compile": False,
                "kv_fp8": False,
            },
        ]
    if mode == "fp8":
        fp8 = [
            {"name": b + FP8_SUFFIX, "backend": b, "torch_compile": False, "kv_fp8": True}
            for b in args.backends
        ]
        bf16 = {
            "name": BACKEND_UNDER_TEST,
            "backend": BACKEND_UNDER_TEST,
            "torch_compile": False,
            "kv_fp8": False,
        }
        return fp8 + [bf16]
    return [{"name": b, "backend": b, "torch_compile": False, "kv_fp8": False} for b in args.backends]


def mode_reference(mode: str, args: argparse.Namespace) -> str:
    """The server every other server of the configuration is compared with."""
    if mode == "torch_compile":
        return BACKEND_UNDER_TEST
    if mode == "deterministic":  # the target alone; each server's batches are compared with its own
        return DETERMINISTIC
    return FP8_UNDER_TEST if mode == "fp8" else args.reference


def mode_tolerance(mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """(atol, mean_atol) of a configuration's comparisons."""
    return (args.fp8_atol, args.fp8_mean_atol) if mode == "fp8" else (args.atol, args.mean_atol)


def config_key(tp: int, mode: str) -> str:
    return f"tp{tp}-{mode}"


def config_file_name(mode: str, tp: int) -> str:
    """``<configuration>.json``; TP > 1 adds ``_tp<N>``."""
    return f"{mode}.json" if tp == 1 else f"{mode}_tp{tp}.json"


def add_comparisons(results: dict[str, Any], outputs: dict[tuple, list[dict]], args) -> None:
    """Append every comparison whose two sides have run and is not recorded yet: each server against its
    configuration's reference; the reference's CUDA-graph run against its eager run (noise floor)."""
    done = {(c["key"], c["backend"]) for c in results["comparisons"]}
    for (tp, mode, name), got in outputs.items():
        key, reference = config_key(tp, mode), mode_reference(mode, args)
        if mode == "deterministic":
            alone = name.split(IN_BATCH)[0]
            if alone != name and (tp, mode, alone) in outputs and (key, name) not in done:
                comparison = compare_identical(outputs[(tp, mode, alone)], got)
                control = alone != DETERMINISTIC
                results["comparisons"].append(
                    {"key": key, "backend": name, "reference": alone, "control": control} | comparison
                )
            continue
        ref = outputs.get((tp, mode, reference))
        if name == reference or ref is None or (key, name) in done:
            continue
        comparison = compare(ref, got, *mode_tolerance(mode, args))
        results["comparisons"].append({"key": key, "backend": name, "reference": reference} | comparison)
    floors = {f["tp"] for f in results["noise_floor"]}
    for tp in args.tp:
        graph, eager = (outputs.get((tp, m, args.reference)) for m in ("cuda_graph", "eager"))
        if tp not in floors and graph is not None and eager is not None:
            floor = compare(graph, eager, args.atol, args.mean_atol)
            results["noise_floor"].append({"backend": args.reference, "tp": tp} | floor)


def configuration_result(results: dict[str, Any], tp: int, mode: str, args) -> dict[str, Any]:
    """One configuration's record (the ``<configuration>.json`` file): its servers, comparisons, the
    acceptance lengths (``mtp``) or graph breaks (``torch_compile``), and whether it passed."""
    key = config_key(tp, mode)
    runs = [r for r in results["runs"] if r["key"] == key]
    comparisons = [c for c in results["comparisons"] if c["key"] == key]
    variants = mode_variants(mode, args)
    checks = {
        "all_servers_ran": len(runs) == len(variants) and all(r["ok"] for r in runs),
        "all_compared": len(comparisons) == len(variants) - 1,
        "comparisons_passed": bool(comparisons) and all(c["passed"] for c in comparisons),
    }
    data: dict[str, Any] = {
        "configuration": mode,
        "tp": tp,
        "key": key,
        "reference": mode_reference(mode, args),
        "environment": results["environment"],
        "model": results["models"]["mtp" if mode == "mtp" else "default"],
        "settings": results["settings"],
        "runs": runs,
        "comparisons": comparisons,
    }
    if mode in ("cuda_graph", "eager"):
        data["noise_floor"] = [f for f in results["noise_floor"] if f["tp"] == tp]
    if mode == "mtp":
        data["acceptance"] = {r["backend"]: r.get("acceptance") for r in runs}
        measured = [a for a in data["acceptance"].values() if a and a.get("measured")]
        checks["speculative_decoding_ran"] = len(measured) == len(variants)
        if len(measured) == 2:
            lengths = [a["accept_length"] for a in measured]
            data["accept_length_diff"] = abs(lengths[0] - lengths[1])
    if mode == "torch_compile":
        compiled = next((r for r in runs if r["backend"] == COMPILED), {})
        data["graph_breaks"] = compiled.get("graph_breaks")
        checks["no_attention_graph_breaks"] = (
            data["graph_breaks"] is not None and data["graph_breaks"]["attention"] == 0
        )
    if mode == "deterministic":
        # the target in each batch against the target alone, on the deterministic server; the control
        # server's comparisons are reported apart and decide nothing
        required = [c for c in comparisons if not c.get("control")]
        checks["all_compared"] = len(required) == DETERMINISTIC_BATCHES
        checks["comparisons_passed"] = bool(required) and all(c["passed"] for c in required)
        served = next((r for r in runs if r["backend"] == DETERMINISTIC), {})
        checks["batch_invariant_schedule_in_log"] = bool(served.get("batch_invariant_schedule_in_log"))
        data["determinism"] = served.get("determinism")
        data["control"] = [
            {k: c.get(k) for k in ("backend", "reference", "identical", "first_difference", "max_abs_diff")}
            for c in comparisons
            if c.get("control")
        ]
    data["checks"] = checks
    data["passed"] = all(checks.values())
    return data


def write_configuration_json(out_dir: Path, data: dict[str, Any], partial: bool = False) -> Path:
    """Write one configuration's record to ``out_dir/<configuration>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / config_file_name(data["configuration"], data["tp"])
    path.write_text(json.dumps(data | ({"partial": True} if partial else {}), indent=1, default=str))
    return path


def compare(reference: list[dict], other: list[dict], atol: float, mean_atol: float) -> dict[str, Any]:
    diffs: list[float] = []
    worst: dict[str, Any] = {"diff": 0.0}
    divergences = []
    identical = 0
    nonfinite = 0
    for r, (ref, oth) in enumerate(zip(reference, other, strict=True)):
        ids_ref, ids_oth = ref["output_ids"], oth["output_ids"]
        n = min(len(ids_ref), len(ids_oth))
        first = next((j for j in range(n) if ids_ref[j] != ids_oth[j]), None)
        identical += first is None and len(ids_ref) == len(ids_oth)
        last = n - 1 if first is None else first  # same context up to and including the first divergence
        for j in range(last + 1):
            pairs = []
            if j != first:
                pairs.append((ref["token_logprobs"][j], oth["token_logprobs"][j], ids_ref[j]))
            top_ref, top_oth = ref["top_logprobs"][j], oth["top_logprobs"][j]
            pairs += [(top_ref[t], top_oth[t], int(t)) for t in top_ref.keys() & top_oth.keys()]
            for a, b, token in pairs:
                if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                    nonfinite += 1
                    continue
                d = abs(a - b)
                diffs.append(d)
                if d > worst["diff"]:
                    worst = {"diff": d, "request": r, "position": j, "token": token, "ref": a, "other": b}
        if first is not None:
            ranked = sorted(ref["top_logprobs"][first].values(), reverse=True)
            gap = ranked[0] - ranked[1] if len(ranked) > 1 else None
            divergences.append({"request": r, "position": first, "tie_gap": gap})
    max_abs = max(diffs, default=math.nan)
    mean_abs = statistics.fmean(diffs) if diffs else math.nan
    passed = bool(diffs) and nonfinite == 0 and max_abs <= atol and mean_abs <= mean_atol
    return {
        "compared_values": len(diffs),
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "worst": worst,
        "nonfinite": nonfinite,
        "identical_greedy_outputs": identical,
        "requests": len(reference),
        "divergences": divergences,
        "atol": atol,
        "mean_atol": mean_atol,
        "passed": passed,
    }


def compare_identical(reference: list[dict], other: list[dict]) -> dict[str, Any]:
    """Bit-for-bit comparison of two runs of the same requests (``deterministic``): at every position the
    output id, the token logprob and the top-k logprobs (the same token ids with the same values) must be
    equal; a missing or non-finite value counts as a difference. Reports the first difference (request,
    position, which fields, both sides) and, for information, the largest logprob difference seen up to it
    (token logprobs and the top-k entries of the same token)."""
    first: dict[str, Any] | None = None
    identical_positions, max_abs = 0, 0.0

    def at(values: list, j: int) -> Any:
        return values[j] if j < len(values) else None

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b and (not isinstance(a, float) or math.isfinite(a))

    for r, (ref, oth) in enumerate(zip(reference, other, strict=True)):
        for j in range(max(len(ref["output_ids"]), len(oth["output_ids"]))):
            sides = {
                field: (at(ref[src], j), at(oth[src], j))
                for field, src in (
                    ("output_id", "output_ids"),
                    ("token_logprob", "token_logprobs"),
                    ("top_logprobs", "top_logprobs"),
                )
            }
            pairs = [sides["token_logprob"]]
            top_ref, top_oth = sides["top_logprobs"]
            if top_ref and top_oth:
                pairs += [(top_ref[t], top_oth[t]) for t in top_ref.keys() & top_oth.keys()]
            for a, b in pairs:
                if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
                    max_abs = max(max_abs, abs(a - b))
            differs = [field for field, (a, b) in sides.items() if not same(a, b)]
            if differs:
                first = {
                    "request": r,
                    "position": j,
                    "fields": differs,
                    "reference": {f: sides[f][0] for f in differs},
                    "other": {f: sides[f][1] for f in differs},
                }
                break
            identical_positions += 1
        if first is not None:
            break
    return {
        "requests": len(reference),
        "identical_positions": identical_positions,
        "identical": first is None,
        "first_difference": first,
        "max_abs_diff": max_abs,
        "passed": first is None and identical_positions > 0,
    }


# ---- deterministic: one prompt alone and inside batches ---------------------------------------------------
#: The batches ``deterministic`` sends the target prompt in (see :func:`deterministic_batches`).
DETERMINISTIC_BATCHES = 2


def deterministic_batches(target: list[int], others: list[list[int]]) -> list[dict[str, Any]]:
    """The batches the target prompt is decoded in besides alone: every other prompt with the target in the
    middle, then every second other prompt with the target last (another batch size, so another captured
    CUDA graph, and another position)."""
    half = len(others) // 2
    every_second = others[1::2] + [target]
    return [
        {"input_ids": others[:half] + [target] + others[half:], "target_index": half},
        {"input_ids": every_second, "target_index": len(every_second) - 1},
    ]


def deterministic_prompts(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]]]:
    """The target prompt and the other prompts (their own seeds: no prompt repeats the target)."""
    target = prompts([args.deterministic_prompt_len], vocab, args.seed + 7)[0]
    return target, prompts(args.deterministic_other_lens, vocab, args.seed + 8)


def run_deterministic(
    url: str, args: argparse.Namespace, vocab: int, name: str
) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Decode the target prompt alone, then in each batch: ``(record, {label: [the target's result]})``,
    labels ``name`` (alone) and ``name@batch<i>``."""
    target, others = deterministic_prompts(args, vocab)
    outputs = {name: generate_with_logprobs(url, [target], args.new_tokens, args.top_logprobs)}
    record: dict[str, Any] = {"target_len": len(target), "batches": []}
    for i, batch in enumerate(deterministic_batches(target, others), 1):
        label = f"{name}{IN_BATCH}{i}"
        got = generate_with_logprobs(url, batch["input_ids"], args.new_tokens, args.top_logprobs)
        outputs[label] = [got[batch["target_index"]]]
        record["batches"].append(
            {
                "label": label,
                "batch_size": len(batch["input_ids"]),
                "target_index": batch["target_index"],
                "prompt_lens": [len(ids) for ids in batch["input_ids"]],
            }
        )
    return record, outputs


# ---- main --------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    for dist in ("sglang", "flashmla_ops", "torch", "flashinfer-python", "sglang-kernel", "sgl-flash-mla"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    env["entry_point"] = [
        ep.value
        for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")
        if ep.name == BACKEND_UNDER_TEST
    ]
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["capability"] = list(torch.cuda.get_device_capability(0))
    except ImportError:
        env["cuda_available"] = False
    try:
        import flashmla_ops

        env["flashmla_ops_cuda_extension"] = flashmla_ops.cuda_extension_available()
    except ImportError as e:
        env["flashmla_ops_cuda_extension"] = f"import failed: {e}"
    return env


def preflight_problems(env: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    if env["sglang"] is None:
        problems.append("sglang is not installed")
    if env["flashmla_ops"] is None or not env["entry_point"]:
        problems.append("flashmla_ops is not installed (or lacks its sglang.srt.plugins entry point)")
    if env.get("flashmla_ops_cuda_extension") is not True:
        problems.append(f"flashmla_ops has no CUDA extension: {env.get('flashmla_ops_cuda_extension')}")
    if not env.get("cuda_available"):
        problems.append("no CUDA device")
    elif env.get("capability") != [9, 0]:
        problems.append(f"needs a Hopper (sm_90) GPU, found sm_{env.get('capability')}")
    elif max(args.tp) > len(env.get("gpus", [])):
        problems.append(f"--tp {max(args.tp)} needs {max(args.tp)} GPUs, found {len(env.get('gpus', []))}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="sglang_e2e.json", help="JSON results file (every configuration)")
    p.add_argument(
        "--out-dir", default=None, help="one <configuration>.json per configuration (default: <out>.d/)"
    )
    p.add_argument("--workdir", default=None, help="model + server logs (default: a new temporary directory)")
    p.add_argument("--model-dir", default=None, help="use this model directory instead of writing one")
    p.add_argument("--mtp-model-dir", default=None, help="mtp: use this target (with its NextN layer)")
    p.add_argument("--mtp-draft-dir", default=None, help="mtp: use this draft checkpoint")
    p.add_argument(
        "--mtp-draft",
        choices=["nextn", "target"],
        default="nextn",
        help="mtp draft: the standalone NextN checkpoint, or the target checkpoint itself",
    )
    p.add_argument("--weights", choices=["random", "dummy"], default="random")
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--backends", default=f"{BACKEND_UNDER_TEST},flashmla", help="first = under test")
    p.add_argument("--reference", default="flashmla", help="backend the others are compared with")
    p.add_argument("--prefill-backend", default=None, help="e.g. triton: hybrid prefill, avoids FlashInfer")
    p.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help="comma-separated configurations: cuda_graph, eager (--disable-cuda-graph), mtp (NEXTN "
        "speculative decoding), torch_compile (--enable-torch-compile), fp8 (--kv-cache-dtype fp8_e4m3), "
        "deterministic (--enable-deterministic-inference: one prompt alone and in batches)",
    )
    p.add_argument("--spec-steps", type=int, default=3, help="mtp: draft steps (draft tokens = steps + 1)")
    p.add_argument(
        "--torch-compile-max-bs", type=int, default=None, help="default: the largest captured batch size"
    )
    p.add_argument(
        "--torch-compile-mode",
        default=None,
        help="torch_compile: the torch.compile mode SGLang uses (SGLANG_TORCH_COMPILE_MODE), e.g. default: "
        "Inductor without max-autotune compiles each captured size in a fraction of the time (default: "
        "SGLang's, max-autotune-no-cudagraphs)",
    )
    p.add_argument(
        "--cuda-graph-bs",
        type=int,
        nargs="+",
        default=None,
        help="decode batch sizes to capture (every graphed server; default: SGLang's list, torch_compile: "
        "the two batch sizes sent)",
    )
    p.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes, e.g. --tp 1 2")
    p.add_argument("--prompt-lens", default=DEFAULT_PROMPT_LENS, help="logprob batch: one request per length")
    p.add_argument("--new-tokens", type=int, default=48, help="decode steps of the logprob batch")
    p.add_argument("--top-logprobs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="throughput batch size")
    p.add_argument("--throughput-prompt-len", type=int, default=512)
    p.add_argument("--throughput-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-fraction", type=float, default=0.5)
    p.add_argument("--startup-timeout", type=float, default=1200.0, help="s; the first run may JIT-compile")
    p.add_argument("--atol", type=float, default=0.1, help="max |logprob difference| allowed")
    p.add_argument("--mean-atol", type=float, default=0.02, help="max mean |logprob difference| allowed")
    p.add_argument("--fp8-atol", type=float, default=0.5, help="fp8: max |logprob difference| allowed")
    p.add_argument("--fp8-mean-atol", type=float, default=0.08, help="fp8: max mean |logprob difference|")
    p.add_argument(
        "--deterministic-prompt-len", type=int, default=300, help="deterministic: the target prompt's length"
    )
    p.add_argument(
        "--deterministic-other-lens",
        default=DEFAULT_DETERMINISTIC_OTHER_LENS,
        help="deterministic: the lengths of the other prompts of the batch (at least 2)",
    )
    p.add_argument(
        "--deterministic-control",
        action="store_true",
        help="deterministic: also run the check on a flashmla_ops server without the flag (reported only)",
    )
    p.add_argument("--extra-server-args", nargs=argparse.REMAINDER, default=[], help="passed to every server")
    p.add_argument("--dry-run", action="store_true", help="write the models, print the commands, stop")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    args.prompt_lens = [int(n) for n in args.prompt_lens.split(",") if n]
    args.deterministic_other_lens = [int(n) for n in args.deterministic_other_lens.split(",") if n]
    if not args.modes or not set(args.modes) <= set(MODES):
        p.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    if args.reference not in args.backends:
        p.error("--reference must be one of --backends")
    for mode in ("torch_compile", "fp8"):
        if mode in args.modes and BACKEND_UNDER_TEST not in args.backends:
            p.error(f"--modes {mode} needs {BACKEND_UNDER_TEST} in --backends")
    if args.spec_steps < 1:
        p.error("--spec-steps must be >= 1")
    if (
        len(args.deterministic_other_lens) < 2
        or min(args.deterministic_other_lens + [args.deterministic_prompt_len]) < 1
    ):
        p.error("--deterministic-other-lens needs at least 2 lengths; every length must be >= 1")
    if args.batch < 1 or not args.prompt_lens or min(args.prompt_lens) < 1:
        p.error("--batch must be >= 1 and --prompt-lens needs at least one length, every length >= 1")
    if args.cuda_graph_bs and min(args.cuda_graph_bs) < 1:
        p.error("--cuda-graph-bs sizes must be >= 1")
    if args.cuda_graph_bs and max(args.cuda_graph_bs) < max_batch(args):
        # a larger batch would decode without a graph (and, under torch_compile, uncompiled): not what is
        # being checked
        p.error(f"--cuda-graph-bs must include a size >= {max_batch(args)}, the largest batch sent")
    if args.torch_compile_max_bs is None:
        args.torch_compile_max_bs = max(graph_batch_sizes(args, "torch_compile"))
    if args.out_dir is None:
        out = Path(args.out)
        args.out_dir = str(out.with_name(out.stem + ".d"))
    return args


def deterministic_verdict(results: dict[str, Any], run: dict[str, Any]) -> str:
    """``alone vs batches: identical k/n PASS``, for a ``deterministic`` server (the control's marked)."""
    mine = [c for c in results["comparisons"] if c["key"] == run["key"] and c["reference"] == run["backend"]]
    same = sum(c["identical"] for c in mine)
    if run["backend"] != DETERMINISTIC:
        return f"control (no flag): alone vs batches identical {same}/{len(mine)}"
    ok = bool(mine) and all(c["passed"] for c in mine) and run.get("batch_invariant_schedule_in_log")
    return f"alone vs batches: identical {same}/{len(mine)} {'PASS' if ok else 'FAIL'}"


def print_table(results: dict[str, Any]) -> None:
    header = f"{'config':<18} {'server':<26} {'decode tok/s':>12} {'ms/step':>8}  {'vs reference':<60}"
    print("\n" + header + "\n" + "-" * len(header))
    for run in results["runs"]:
        config = f"tp{run['tp']} {run['mode']}"
        if not run["ok"]:
            print(f"{config:<18} {run['backend']:<26} {'FAILED: ' + run['error'].splitlines()[0][:60]}")
            continue
        tput = run["throughput"]
        cmp_ = next(
            (c for c in results["comparisons"] if c["key"] == run["key"] and c["backend"] == run["backend"]),
            None,
        )
        if run["mode"] == "deterministic":
            verdict = deterministic_verdict(results, run)
        elif cmp_ is None:
            verdict = "(reference)" if run.get("is_reference") else "not compared"
        else:
            verdict = (
                f"vs {cmp_['reference']}: max {cmp_['max_abs_diff']:.4f} mean {cmp_['mean_abs_diff']:.5f} "
                f"greedy {cmp_['identical_greedy_outputs']}/{cmp_['requests']} "
                f"{'PASS' if cmp_['passed'] else 'FAIL'}"
            )
        if run.get("acceptance", {}).get("measured"):
            verdict += f"; accept length {run['acceptance']['accept_length']:.3f}"
        if run.get("graph_breaks") is not None:
            gb = run["graph_breaks"]
            verdict += f"; graph breaks {gb['total']} (attention {gb['attention']})"
        print(
            f"{config:<18} {run['backend']:<26} {tput['decode_tokens_per_s']:>12.0f} "
            f"{tput['ms_per_decode_step']:>8.3f}  {verdict}"
        )
    for floor in results["noise_floor"]:
        print(
            f"noise floor ({floor['backend']} tp{floor['tp']} cuda_graph vs eager): max "
            f"{floor['max_abs_diff']:.4f} mean {floor['mean_abs_diff']:.5f}"
        )
    for key, config in results["configurations"].items():
        failed = [name for name, ok in config["checks"].items() if not ok]
        print(f"{key}: {'PASS' if config['passed'] else 'FAIL (' + ', '.join(failed) + ')'}")
    verdict = "PASSED" if results["passed"] else "FAILED"
    print(f"\n{verdict}; details in {results['out']} and {results['out_dir']}")


def prepare_models(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    """Write (or take) the models the configurations need: ``default`` (DeepSeek-V2) and, for ``mtp``, ``mtp``
    (the DeepSeek-V3 target; ``draft_path`` is what ``--speculative-draft-model-path`` gets)."""
    models: dict[str, dict[str, Any]] = {}
    if any(m != "mtp" for m in args.modes):
        if args.model_dir:
            path = Path(args.model_dir).resolve()
            config = json.loads((path / "config.json").read_text())
            models["default"] = {"path": str(path), "weights": "given", "config": config}
        else:
            models["default"] = write_model(
                workdir / "tiny_dsv2", args.weights, args.num_heads, args.init_std, args.seed
            )
    if "mtp" in args.modes:
        if args.mtp_model_dir:
            path = Path(args.mtp_model_dir).resolve()
            config = json.loads((path / "config.json").read_text())
            draft = Path(args.mtp_draft_dir).resolve() if args.mtp_draft_dir else path
            models["mtp"] = {
                "path": str(path),
                "draft_path": str(draft),
                "weights": "given",
                "config": config,
            }
        else:
            models["mtp"] = write_mtp_model(
                workdir / "tiny_dsv3_mtp",
                workdir / "tiny_dsv3_mtp_nextn",
                args.weights,
                args.num_heads,
                args.init_std,
                args.seed,
            )
        if args.mtp_draft == "target":
            models["mtp"]["draft_path"] = models["mtp"]["path"]
    return models


def server_plan(args: argparse.Namespace, models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every server to start, in order: its configuration (tp, mode), variant, model, draft model (``mtp``)
    and extra environment (``TORCH_LOGS`` for the compiled server); :func:`plan_command` makes its command."""
    plan = []
    for tp in args.tp:
        for mode in args.modes:
            model = models["mtp" if mode == "mtp" else "default"]
            for variant in mode_variants(mode, args):
                draft = Path(model["draft_path"]) if mode == "mtp" else None
                plan.append(
                    {
                        "tp": tp,
                        "mode": mode,
                        "key": config_key(tp, mode),
                        "variant": variant,
                        "model": Path(model["path"]),
                        "draft": draft,
                        "env": (
                            torch_logs_env(compile_mode=args.torch_compile_mode)
                            if variant["torch_compile"]
                            else {}
                        ),
                    }
                )
    return plan


def plan_command(args: argparse.Namespace, server: dict[str, Any], port: int) -> list[str]:
    variant = server["variant"]
    return server_command(
        args,
        server["model"],
        variant["backend"],
        server["mode"],
        server["tp"],
        port,
        draft_model=server["draft"],
        torch_compile=variant["torch_compile"],
        kv_fp8=variant.get("kv_fp8", False),
        deterministic=variant.get("deterministic", False),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sglang_e2e_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir).resolve()
    env = environment()
    print(json.dumps(env, indent=1))
    models = prepare_models(args, workdir)
    vocab = next(iter(models.values()))["config"]["vocab_size"]
    plan = server_plan(args, models)
    if args.dry_run:
        for server in plan:
            prefix = "".join(f"{k}={v} " for k, v in server["env"].items())
            print(f"# {server['key']} {server['variant']['name']}")
            print(prefix + " ".join(plan_command(args, server, 30000)))
        return 0
    problems = preflight_problems(env, args)
    if problems:
        print("cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    logprob_prompts = prompts(args.prompt_lens, vocab, args.seed)
    results: dict[str, Any] = {
        "environment": env,
        "model": models.get("default"),
        "models": models,
        "settings": {k: v for k, v in vars(args).items() if k != "extra_server_args"}
        | {"extra_server_args": args.extra_server_args},
        "reference": args.reference,
        "out": str(Path(args.out).resolve()),
        "out_dir": str(out_dir),
        "runs": [],
        "comparisons": [],
        "noise_floor": [],
        "configurations": {},
    }
    outputs: dict[tuple, list[dict]] = {}
    for server in plan:
        tp, mode, key, variant = server["tp"], server["mode"], server["key"], server["variant"]
        name = variant["name"]
        run: dict[str, Any] = {"key": key, "tp": tp, "mode": mode, "backend": name, "ok": False}
        run["is_reference"] = name == mode_reference(mode, args)
        # torch_compile's reference and fp8's bf16 server are the cuda_graph server of flashmla_ops: reuse it
        # when it ran with the same capture sizes.
        plain = not variant["torch_compile"] and not variant["kv_fp8"]
        same_graphs = graph_batch_sizes(args, mode) == graph_batch_sizes(args, "cuda_graph")
        reuse = (
            (tp, "cuda_graph", name) if mode in ("torch_compile", "fp8") and plain and same_graphs else None
        )
        if reuse in outputs:
            previous = next(
                r
                for r in results["runs"]
                if r["key"] == config_key(tp, "cuda_graph") and r["backend"] == name
            )
            outputs[(tp, mode, name)] = outputs[reuse]
            results["runs"].append(previous | run | {"ok": True, "reused_from": previous["key"]})
        else:
            run_server(server, run, args, workdir, logprob_prompts, vocab, outputs)
            results["runs"].append(run)
        # Compared and written after every server, so a run cut short (a time limit) still leaves the
        # comparisons of the configurations it finished.
        add_comparisons(results, outputs, args)
        results["configurations"][key] = configuration_result(results, tp, mode, args)
        write_configuration_json(out_dir, results["configurations"][key], partial=True)
        Path(args.out).write_text(json.dumps(results | {"partial": True}, indent=1, default=str))

    results["config_files"] = []
    for config in results["configurations"].values():
        results["config_files"].append(str(write_configuration_json(out_dir, config)))
    results["passed"] = len(results["configurations"]) == len(args.tp) * len(args.modes) and all(
        c["passed"] for c in results["configurations"].values()
    )
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0 if results["passed"] else 1


def run_server(
    server: dict[str, Any],
    run: dict[str, Any],
    args: argparse.Namespace,
    workdir: Path,
    logprob_prompts: list[list[int]],
    vocab: int,
    outputs: dict[tuple, list[dict]],
) -> None:
    """Start one server, collect its logprobs, acceptance length and throughput into ``run``, stop it."""
    tp, mode, key, name = server["tp"], server["mode"], server["key"], server["variant"]["name"]
    port = free_port()
    cmd = plan_command(args, server, port)
    log_path = workdir / f"server_{name.replace('+', '_')}_{key}.log"
    run |= {"command": cmd, "env": server["env"], "log": str(log_path)}
    print(f"\n=== {key} {name}: {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    proc = Server(cmd, log_path, workdir, port, extra_env=server["env"])
    try:
        proc.wait_ready(args.startup_timeout)
        run["startup_s"] = time.monotonic() - started
        with contextlib.suppress(Exception):
            info = http(proc.url + "/get_server_info", timeout=30)
            run["server_info"] = {
                k: info.get(k)
                for k in (
                    "attention_backend",
                    "decode_attention_backend",
                    "prefill_attention_backend",
                    "speculative_algorithm",
                    "speculative_draft_attention_backend",
                    "enable_torch_compile",
                    "enable_deterministic_inference",
                    "disable_radix_cache",
                )
            } | {"page_size": info.get("page_size"), "version": info.get("version")}
        if mode == "deterministic":
            run["determinism"], by_label = run_deterministic(proc.url, args, vocab, name)
            outputs.update({(tp, mode, label): got for label, got in by_label.items()})
        else:
            got = generate_with_logprobs(proc.url, logprob_prompts, args.new_tokens, args.top_logprobs)
            outputs[(tp, mode, name)] = got
        if mode == "mtp":
            run["acceptance"] = acceptance_length([r["meta"] for r in got])
        run["throughput"] = measure_decode_throughput(proc.url, args, vocab)
        if mode == "mtp":
            with contextlib.suppress(Exception):  # SGLang's own running average, all requests so far
                info = http(proc.url + "/get_server_info", timeout=30)
                states = info.get("internal_states") or [{}]
                run["avg_spec_accept_length"] = states[0].get("avg_spec_accept_length")
        run["ok"] = True
    except Exception as e:  # record and go on with the next server
        run["error"] = f"{type(e).__name__}: {e}"
        print(run["error"], file=sys.stderr)
    finally:
        proc.stop()
    text = log_path.read_text(errors="replace")
    run["plugin_registered_in_log"] = "flashmla_ops SGLang plugin:" in text
    run["flashmla_ops_backend_built_in_log"] = "built FlashMLAOpsBackend" in text
    run["batch_invariant_schedule_in_log"] = "decode schedule: batch-invariant" in text
    if server["variant"]["torch_compile"]:
        run["graph_breaks"] = count_graph_breaks(text)
    if run["ok"]:
        tput = run["throughput"]
        print(f"decode {tput['decode_tokens_per_s']:.0f} tok/s, {tput['ms_per_decode_step']:.3f} ms/step")


if __name__ == "__main__":
    sys.exit(main())
