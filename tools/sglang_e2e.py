#!/usr/bin/env python3
"""End-to-end check of ``--attention-backend flashmla_ops`` in a real SGLang server, offline, on a Hopper GPU.

For each configuration (decode CUDA graphs on, then ``--disable-cuda-graph``; tensor parallel 1, and 2 with
``--tp 2``) and each backend (``flashmla_ops``, then SGLang's builtin ``flashmla``), the script:

1. launches ``python -m sglang.launch_server --attention-backend <backend> --page-size 64 ...`` on a tiny
   DeepSeek-V2 (MLA) model it writes itself, with the same ``--random-seed``;
2. sends one batch of greedy requests (prompt lengths chosen around the 64-token page boundaries) with
   ``return_logprob`` and ``top_logprobs_num``, and records every decode step's logprobs;
3. measures decode throughput: the same batch with ``max_new_tokens = N`` and ``= 1``, so
   ``decode tokens/s = batch * (N - 1) / (t_N - t_1)`` (prefill cancels out);
4. stops the server.

It then compares each backend's logprobs with the reference backend's (``flashmla`` by default) in the same
configuration, and prints a summary table and writes JSON (``--out``). Exit status 0 when every server ran and
every comparison is within tolerance.

Tolerance (``--atol``, ``--mean-atol``): both backends run the same model code and differ only in the
attention kernel of decode steps: the order of the fp32 accumulations and the split-KV combine, and the bf16
rounding of the attention output (half a bf16 ulp, 2^-9 relative). Passed through two layers and the LM head,
that moves logits by O(1e-2), and the logprobs by about as much. A logprob compared here must differ by at
most ``--atol`` = 0.1 (about 10 %, in probability), and the mean difference must stay within
``--mean-atol`` = 0.02. A kernel bug (a wrong page, a lost split, a wrong mask) moves logprobs by O(1) at some
position. Greedy decoding may legitimately diverge where two tokens are tied within that noise. Positions are
compared up to and including the first divergence, because after it the two contexts differ. For each
divergence the reference's top-2 gap there is reported (``tie_gap``). The builtin backend's own CUDA-graph vs
eager difference is reported as a noise floor.

Model: 2 layers, hidden 1024, 16 heads (``--num-heads``; 128 = DeepSeek-V3's head count), kv_lora_rank 512,
qk_rope_head_dim 64 (the MLA geometry FlashMLA supports), vocab 1024, all-dense MLPs. It has no tokenizer:
the server runs with ``--skip-tokenizer-init`` and requests carry ``input_ids``. Weights: ``random`` (default)
writes a safetensors checkpoint with transformers (std ``--init-std`` 0.05; that std makes the attention
clearly non-uniform, so the comparison is sensitive to the kernel). ``dummy`` uses SGLang's
``--load-format dummy`` (uniform +-1e-3, near-uniform attention: a smoke test only).

Requirements: a Hopper (sm_90) GPU; SGLang with its CUDA dependencies (tested against the 0.5.17 layout, the
newest release pinned to torch 2.11; 0.5.23 has the same flags); flashmla_ops installed with its CUDA
extension (the plugin is found through its ``sglang.srt.plugins`` entry point); transformers (for
``--weights random``). Nothing is downloaded: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set for the servers.
FlashInfer compiles its MLA prefill kernels at first use (minutes); ``--prefill-backend triton`` avoids
FlashInfer kernels (both backends then run as decode backends of a hybrid).

Usage::

    python tools/sglang_e2e.py --out sglang_e2e.json            # TP 1, CUDA graphs on and off
    python tools/sglang_e2e.py --tp 1 2 --out sglang_e2e.json    # TP 1 and TP 2 (two GPUs)
    python tools/sglang_e2e.py --dry-run                         # print the server commands only
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
import signal
import socket
import statistics
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


# ---- the server --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    args: argparse.Namespace, model: Path, backend: str, mode: str, tp: int, port: int
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
    cmd += ["--max-running-requests", str(max(args.batch, len(args.prompt_lens)) * 2), "--log-level", "info"]
    if mode == "cuda_graph":
        cmd += ["--cuda-graph-max-bs-decode", str(max(args.batch, len(args.prompt_lens)))]
    else:
        cmd += ["--disable-cuda-graph"]
    return cmd + args.extra_server_args


def http(url: str, payload: dict | None = None, timeout: float = 600.0) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Server:
    """``sglang.launch_server`` in its own process group (so that stopping it stops its workers too)."""

    def __init__(self, cmd: list[str], log_path: Path, workdir: Path, port: int) -> None:
        self.cmd, self.log_path, self.url = cmd, log_path, f"http://127.0.0.1:{port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
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
            }
        )
    return results


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
def add_comparisons(results: dict[str, Any], outputs: dict[tuple, list[dict]], args) -> None:
    """Append every comparison whose two sides have run and is not recorded yet: each backend against the
    reference in the same (tp, mode); the reference's CUDA-graph run against its eager run (noise floor)."""
    done = {(c["key"], c["backend"]) for c in results["comparisons"]}
    for (tp, mode, backend), got in outputs.items():
        key = f"tp{tp}-{mode}"
        ref = outputs.get((tp, mode, args.reference))
        if backend == args.reference or ref is None or (key, backend) in done:
            continue
        comparison = compare(ref, got, args.atol, args.mean_atol)
        results["comparisons"].append({"key": key, "backend": backend} | comparison)
    floors = {f["tp"] for f in results["noise_floor"]}
    for tp in args.tp:
        graph, eager = (outputs.get((tp, m, args.reference)) for m in ("cuda_graph", "eager"))
        if tp not in floors and graph is not None and eager is not None:
            floor = compare(graph, eager, args.atol, args.mean_atol)
            results["noise_floor"].append({"backend": args.reference, "tp": tp} | floor)


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
    p.add_argument("--out", default="sglang_e2e.json", help="JSON results file")
    p.add_argument("--workdir", default=None, help="model + server logs (default: a new temporary directory)")
    p.add_argument("--model-dir", default=None, help="use this model directory instead of writing one")
    p.add_argument("--weights", choices=["random", "dummy"], default="random")
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--backends", default=f"{BACKEND_UNDER_TEST},flashmla", help="first = under test")
    p.add_argument("--reference", default="flashmla", help="backend the others are compared with")
    p.add_argument("--prefill-backend", default=None, help="e.g. triton: hybrid prefill, avoids FlashInfer")
    p.add_argument(
        "--modes", default="cuda_graph,eager", help="cuda_graph and/or eager (--disable-cuda-graph)"
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
    p.add_argument("--extra-server-args", nargs=argparse.REMAINDER, default=[], help="passed to every server")
    p.add_argument("--dry-run", action="store_true", help="write the model, print the commands, stop")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    args.prompt_lens = [int(n) for n in args.prompt_lens.split(",") if n]
    if not set(args.modes) <= {"cuda_graph", "eager"}:
        p.error("--modes takes cuda_graph and/or eager")
    if args.reference not in args.backends:
        p.error("--reference must be one of --backends")
    return args


def print_table(results: dict[str, Any]) -> None:
    versus = "vs " + results["reference"]
    header = f"{'config':<16} {'backend':<14} {'decode tok/s':>12} {'ms/step':>8}  {versus:<46}"
    print("\n" + header + "\n" + "-" * len(header))
    for run in results["runs"]:
        config = f"tp{run['tp']} {run['mode']}"
        if not run["ok"]:
            print(f"{config:<16} {run['backend']:<14} {'FAILED: ' + run['error'].splitlines()[0][:60]}")
            continue
        tput = run["throughput"]
        cmp_ = next((c for c in results["comparisons"] if c["key"] == run["key"]), None)
        if run["backend"] == results["reference"]:
            verdict = "(reference)"
        elif cmp_ is None:
            verdict = "not compared"
        else:
            verdict = (
                f"max {cmp_['max_abs_diff']:.4f} mean {cmp_['mean_abs_diff']:.5f} "
                f"greedy {cmp_['identical_greedy_outputs']}/{cmp_['requests']} "
                f"{'PASS' if cmp_['passed'] else 'FAIL'}"
            )
        print(
            f"{config:<16} {run['backend']:<14} {tput['decode_tokens_per_s']:>12.0f} "
            f"{tput['ms_per_decode_step']:>8.3f}  {verdict}"
        )
    for floor in results["noise_floor"]:
        print(
            f"noise floor ({floor['backend']} tp{floor['tp']} cuda_graph vs eager): max "
            f"{floor['max_abs_diff']:.4f} mean {floor['mean_abs_diff']:.5f}"
        )
    print(f"\n{'PASSED' if results['passed'] else 'FAILED'}; details in {results['out']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sglang_e2e_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(json.dumps(env, indent=1))
    if args.model_dir:
        model = Path(args.model_dir).resolve()
        model_info: dict[str, Any] = {"path": str(model), "weights": "given"}
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    else:
        model = workdir / "tiny_dsv2"
        model_info = write_model(model, args.weights, args.num_heads, args.init_std, args.seed)
        vocab = model_info["config"]["vocab_size"]
    configs = [(tp, mode) for tp in args.tp for mode in args.modes]
    if args.dry_run:
        for tp, mode in configs:
            for backend in args.backends:
                print(" ".join(server_command(args, model, backend, mode, tp, 30000)))
        return 0
    problems = preflight_problems(env, args)
    if problems:
        print("cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    logprob_prompts = prompts(args.prompt_lens, vocab, args.seed)
    results: dict[str, Any] = {
        "environment": env,
        "model": {k: v for k, v in model_info.items() if k != "config"}
        | {"config": model_info.get("config")},
        "settings": {k: v for k, v in vars(args).items() if k != "extra_server_args"}
        | {"extra_server_args": args.extra_server_args},
        "reference": args.reference,
        "out": str(Path(args.out).resolve()),
        "runs": [],
        "comparisons": [],
        "noise_floor": [],
    }
    outputs: dict[tuple, list[dict]] = {}
    for tp, mode in configs:
        for backend in args.backends:
            key = f"tp{tp}-{mode}"
            port = free_port()
            cmd = server_command(args, model, backend, mode, tp, port)
            log_path = workdir / f"server_{backend}_{key}.log"
            run: dict[str, Any] = {"key": key, "tp": tp, "mode": mode, "backend": backend, "ok": False}
            run |= {"command": cmd, "log": str(log_path)}
            print(f"\n=== {key} {backend}: {' '.join(cmd)}", flush=True)
            started = time.monotonic()
            server = Server(cmd, log_path, workdir, port)
            try:
                server.wait_ready(args.startup_timeout)
                run["startup_s"] = time.monotonic() - started
                with contextlib.suppress(Exception):
                    info = http(server.url + "/get_server_info", timeout=30)
                    run["server_info"] = {
                        k: info.get(k)
                        for k in (
                            "attention_backend",
                            "decode_attention_backend",
                            "prefill_attention_backend",
                        )
                    } | {"page_size": info.get("page_size"), "version": info.get("version")}
                outputs[(tp, mode, backend)] = generate_with_logprobs(
                    server.url, logprob_prompts, args.new_tokens, args.top_logprobs
                )
                run["throughput"] = measure_decode_throughput(server.url, args, vocab)
                run["ok"] = True
            except Exception as e:  # record and go on with the next server
                run["error"] = f"{type(e).__name__}: {e}"
                print(run["error"], file=sys.stderr)
            finally:
                server.stop()
            text = log_path.read_text(errors="replace")
            run["plugin_registered_in_log"] = "flashmla_ops SGLang plugin:" in text
            run["flashmla_ops_backend_built_in_log"] = "built FlashMLAOpsBackend" in text
            results["runs"].append(run)
            # Compared and written after every server, so a run cut short (a time limit) still leaves the
            # comparisons of the configurations it finished.
            add_comparisons(results, outputs, args)
            Path(args.out).write_text(json.dumps(results | {"partial": True}, indent=1, default=str))
            if run["ok"]:
                tput = run["throughput"]
                print(
                    f"decode {tput['decode_tokens_per_s']:.0f} tok/s, "
                    f"{tput['ms_per_decode_step']:.3f} ms/step"
                )

    all_ran = all(run["ok"] for run in results["runs"])
    expected = len(configs) * (len(args.backends) - 1)
    results["passed"] = (
        all_ran
        and len(results["comparisons"]) == expected
        and all(c["passed"] for c in results["comparisons"])
    )
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
