"""``tools/sglang_e2e.py`` (the GPU end-to-end check) on CPU, without SGLang and without a GPU.

What runs here: ``--dry-run`` prints the server command of every configuration with the right flags; the
model writer writes the DeepSeek-V3 target with its NextN (MTP) layer and the standalone draft checkpoint,
with the config fields and safetensors names SGLang's loaders expect; the graph-break counter and the
acceptance-length parser on fixed samples; the per-configuration JSON; the ``deterministic`` configuration's
batches, its bitwise comparison and its verdict (against a stand-in for the server's ``/generate``). What
SGLang expects was read from the sglang 0.5.23 source (cited next to each expectation below), not imported:
CI's main suite has no SGLang.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sglang_e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("sglang_e2e_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def flag(cmd: list[str], name: str) -> str | None:
    """The value after ``name`` in a command (None when absent)."""
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ---- --dry-run ---------------------------------------------------------------------------------------------
def dry_run(e2e, capsys, tmp_path, *extra: str) -> dict[tuple[str, str], tuple[dict, list[str]]]:
    argv = ["--dry-run", "--weights", "dummy", "--workdir", str(tmp_path), "--out", str(tmp_path / "o.json")]
    assert e2e.main([*argv, *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    servers = {}
    for header, command in zip(lines, lines[1:], strict=False):
        if header.startswith("# tp"):
            words = shlex.split(command)
            env = dict(w.split("=", 1) for w in words[: words.index(sys.executable)])
            servers[tuple(header[2:].split())] = (env, words[words.index(sys.executable) :])
    return servers


def test_default_modes_unchanged(e2e):
    args = e2e.parse_args([])
    assert args.modes == ["cuda_graph", "eager"]
    assert args.out == "sglang_e2e.json" and args.out_dir == "sglang_e2e.d"
    assert args.torch_compile_max_bs == max(args.batch, len(args.prompt_lens))
    with pytest.raises(SystemExit):
        e2e.parse_args(["--modes", "cuda_graph,speculative"])


def test_dry_run_prints_every_configuration(e2e, capsys, tmp_path):
    servers = dry_run(e2e, capsys, tmp_path, "--modes", "cuda_graph,eager,mtp,torch_compile")
    assert list(servers) == [
        ("tp1-cuda_graph", "flashmla_ops"),
        ("tp1-cuda_graph", "flashmla"),
        ("tp1-eager", "flashmla_ops"),
        ("tp1-eager", "flashmla"),
        ("tp1-mtp", "flashmla_ops"),
        ("tp1-mtp", "flashmla"),
        ("tp1-torch_compile", "flashmla_ops+torch_compile"),
        ("tp1-torch_compile", "flashmla_ops"),
    ]
    for (key, name), (env, cmd) in servers.items():
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        assert flag(cmd, "--attention-backend") == name.split("+")[0]
        assert flag(cmd, "--page-size") == "64" and flag(cmd, "--tp") == "1"
        assert "--skip-tokenizer-init" in cmd and flag(cmd, "--load-format") == "dummy"
        graphs = "--disable-cuda-graph" not in cmd
        assert graphs == (key != "tp1-eager")
        if key == "tp1-torch_compile":
            # both servers capture (and the compiled one compiles) only the batch sizes the script sends
            assert cmd[cmd.index("--cuda-graph-bs-decode") + 1 : cmd.index("--cuda-graph-bs-decode") + 3] == [
                "16",
                "32",
            ]
            assert "--cuda-graph-max-bs-decode" not in cmd
        else:
            assert "--cuda-graph-bs-decode" not in cmd
            assert (flag(cmd, "--cuda-graph-max-bs-decode") == "32") == graphs
        assert (flag(cmd, "--torch-compile-max-bs") == "32") == name.endswith("+torch_compile")
        spec = key == "tp1-mtp"
        assert ("--speculative-algorithm" in cmd) == spec
        compiled = name.endswith("+torch_compile")
        assert ("--enable-torch-compile" in cmd) == compiled
        assert env == ({"TORCH_LOGS": "graph_breaks"} if compiled else {})
        model = Path(flag(cmd, "--model-path"))
        assert model == tmp_path / ("tiny_dsv3_mtp" if spec else "tiny_dsv2")
        assert json.loads((model / "config.json").read_text())["architectures"] == [
            "DeepseekV3ForCausalLM" if spec else "DeepseekV2ForCausalLM"
        ]
        if spec:
            # NEXTN: SGLang's alias of EAGLE; topk 1: what FlashMLAMultiStepDraftBackend supports; the draft
            # steps on the builtin flashmla (draft_utils.DraftBackendFactory's tables are closed).
            assert flag(cmd, "--speculative-algorithm") == "NEXTN"
            assert flag(cmd, "--speculative-draft-model-path") == str(tmp_path / "tiny_dsv3_mtp_nextn")
            assert flag(cmd, "--speculative-eagle-topk") == "1"
            assert flag(cmd, "--speculative-num-steps") == "3"
            assert flag(cmd, "--speculative-num-draft-tokens") == "4"
            assert flag(cmd, "--speculative-draft-attention-backend") == "flashmla"
            assert "--speculative-attention-mode" not in cmd  # one backend: verify runs on it
        if compiled:
            assert flag(cmd, "--torch-compile-max-bs") == "32"
    # the non-compiled torch_compile server is the cuda_graph server but for its capture sizes (so main()
    # reuses the cuda_graph results only when those agree: with --cuda-graph-bs)
    plain = servers[("tp1-torch_compile", "flashmla_ops")][1]
    cuda_graph = servers[("tp1-cuda_graph", "flashmla_ops")][1]
    i = plain.index("--cuda-graph-bs-decode")
    j = cuda_graph.index("--cuda-graph-max-bs-decode")
    assert plain[:i] + plain[i + 3 :] == cuda_graph[:j] + cuda_graph[j + 2 :]


def test_dry_run_hybrid_prefill_and_tp(e2e, capsys, tmp_path):
    servers = dry_run(
        e2e, capsys, tmp_path, "--modes", "mtp", "--prefill-backend", "triton", "--tp", "1", "2",
        "--mtp-draft", "target", "--spec-steps", "2",
    )  # fmt: skip
    assert [k for k, _ in servers] == ["tp1-mtp", "tp1-mtp", "tp2-mtp", "tp2-mtp"]
    for (key, name), (_, cmd) in servers.items():
        assert flag(cmd, "--tp") == key[2]
        assert flag(cmd, "--prefill-attention-backend") == "triton"
        assert flag(cmd, "--decode-attention-backend") == name and "--attention-backend" not in cmd
        # a hybrid backend sends target_verify to its prefill backend unless the mode is "decode"
        assert flag(cmd, "--speculative-attention-mode") == "decode"
        assert flag(cmd, "--speculative-draft-model-path") == flag(cmd, "--model-path")
        assert flag(cmd, "--speculative-num-draft-tokens") == "3"
    assert not (tmp_path / "tiny_dsv2").exists()  # only the model the configurations need


def test_torch_logs_env(e2e):
    assert e2e.torch_logs_env({}) == {"TORCH_LOGS": "graph_breaks"}
    assert e2e.torch_logs_env({"TORCH_LOGS": "recompiles"}) == {"TORCH_LOGS": "recompiles,graph_breaks"}
    assert e2e.torch_logs_env({"TORCH_LOGS": "+graph_breaks"}) == {"TORCH_LOGS": "+graph_breaks"}
    assert e2e.torch_logs_env({}, compile_mode="default") == {
        "TORCH_LOGS": "graph_breaks",
        "SGLANG_TORCH_COMPILE_MODE": "default",
    }


# ---- the model writer --------------------------------------------------------------------------------------
# The names SGLang's DeepSeek loaders look up, read from sglang 0.5.23:
# * models/deepseek_v2.py: DeepseekV2AttentionMLA without q LoRA has q_proj, kv_a_proj_with_mqa,
#   kv_a_layernorm, kv_b_proj, o_proj; DeepseekV2MLP gate_proj / up_proj (stacked into gate_up_proj by the
#   loader) and down_proj; DeepseekV2MoE has gate (MoEGate: weight [experts, hidden], e_score_correction_bias
#   [experts] fp32 when topk_method == "noaux_tc"), experts.<e>.{gate,up,down}_proj (FusedMoE's expert
#   mapping) and shared_experts (intermediate moe_intermediate_size * n_shared_experts); the decoder layer's
#   input_layernorm and post_attention_layernorm; model.embed_tokens, model.norm, lm_head.
# * models/deepseek_nextn.py: DeepseekModelNextN has enorm, hnorm, eh_proj (Linear 2*hidden -> hidden),
#   decoder (a DeepseekV2DecoderLayer with is_nextn=True: always MoE) and shared_head.norm.
# * models/deepseek_common/deepseek_weight_loader.py: with is_nextn the loader keeps only names under
#   model.layers.<N> (N = 0 if num_hidden_layers == 1 else num_hidden_layers), skips embed_tokens and
#   shared_head.head, maps shared_head.norm / eh_proj / enorm / hnorm to "model" and the rest to
#   "model.decoder"; without it, names model.layers.<i>, i >= num_hidden_layers, are skipped.
# * configs/model_config.py _config_draft_model: a draft "DeepseekV3ForCausalLM" becomes
#   "DeepseekV3ForCausalLMNextN" (the EntryClass of deepseek_nextn.py).
def layer_names(prefix: str, moe: bool, experts: int = 16) -> set[str]:
    names = {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight",
    }
    mlps = [f"mlp.experts.{e}" for e in range(experts)] + ["mlp.shared_experts"] if moe else ["mlp"]
    names |= {f"{m}.{p}_proj.weight" for m in mlps for p in ("gate", "up", "down")}
    if moe:
        names |= {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}
    return {prefix + n for n in names}


NEXTN_ONLY = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}


def sglang_nextn_name(name: str, num_hidden_layers: int) -> str | None:
    """The parameter a draft checkpoint name loads into (the loader's renaming, restated)."""
    layer = 0 if num_hidden_layers == 1 else num_hidden_layers
    prefix = f"model.layers.{layer}."
    if not name.startswith(prefix) or "embed_tokens" in name or "shared_head.head" in name:
        return None
    rest = name[len(prefix) :]
    return ("model." if rest in NEXTN_ONLY else "model.decoder.") + rest


def test_mtp_model_config(e2e):
    c = e2e.mtp_model_config(16, 0.05)
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "deepseek_v3"
    assert c["num_nextn_predict_layers"] == 1  # the loader asserts exactly 1
    assert c["num_hidden_layers"] == 2 and c["first_k_dense_replace"] == 2  # dense target layers
    assert c["q_lora_rank"] is None and (c["kv_lora_rank"], c["qk_rope_head_dim"]) == (512, 64)
    assert c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid"
    # fused grouped top-k (layers/moe/topk.py): power-of-two experts, <= 32 per group, groups cover top-k
    experts, groups = c["n_routed_experts"], c["n_group"]
    assert experts & (experts - 1) == 0 and experts // groups <= 32
    assert c["topk_group"] * groups >= c["num_experts_per_tok"]
    draft = e2e.nextn_draft_config(c)
    assert draft["architectures"] == ["DeepseekV3ForCausalLMNextN"] and draft["num_hidden_layers"] == 1
    assert {k: v for k, v in draft.items() if k not in ("architectures", "num_hidden_layers")} == {
        k: v for k, v in c.items() if k not in ("architectures", "num_hidden_layers")
    }
    # the default (DeepSeek-V2) model is unchanged
    assert e2e.model_config(16, 0.05)["architectures"] == ["DeepseekV2ForCausalLM"]
    assert "num_nextn_predict_layers" not in e2e.model_config(16, 0.05)


def test_mtp_writer_checkpoints(e2e, tmp_path):
    target, draft = tmp_path / "target", tmp_path / "draft"
    info = e2e.write_mtp_model(target, draft, "random", 16, 0.05, seed=0)
    config = json.loads((target / "config.json").read_text())
    draft_config = json.loads((draft / "config.json").read_text())
    assert config == info["config"] and draft_config == info["draft_config"]
    hidden, vocab, heads = config["hidden_size"], config["vocab_size"], config["num_attention_heads"]

    header = e2e.read_safetensors_header(target / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= layer_names("model.layers.0.", moe=False) | layer_names("model.layers.1.", moe=False)
    expected |= layer_names("model.layers.2.", moe=True)
    expected |= {
        f"model.layers.2.{n}" for n in NEXTN_ONLY | {"embed_tokens.weight", "shared_head.head.weight"}
    }
    assert set(header) == expected
    shapes = {name: tuple(h["shape"]) for name, h in header.items()}
    assert shapes["model.layers.2.eh_proj.weight"] == (hidden, 2 * hidden)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (heads * 192, hidden)
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (576, hidden)
    assert shapes["model.layers.1.self_attn.kv_b_proj.weight"] == (heads * 256, 512)
    assert shapes["model.layers.2.mlp.gate.weight"] == (16, hidden)
    assert shapes["model.layers.2.mlp.experts.15.down_proj.weight"] == (hidden, 256)
    assert shapes["model.layers.2.mlp.shared_experts.gate_proj.weight"] == (256, hidden)
    assert shapes["lm_head.weight"] == (vocab, hidden)
    assert header["model.layers.2.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    assert {h["dtype"] for n, h in header.items() if "correction_bias" not in n} == {"BF16"}
    # contiguous, in order, covering the data: what safetensors readers check
    spans = sorted(h["data_offsets"] for h in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    header_size = (target / "model.safetensors").stat().st_size - spans[-1][1] - 8
    assert header_size % 8 == 0  # the data starts 8-byte aligned

    # the target loader skips the NextN layer; the draft loader reads it from either checkpoint
    n = config["num_hidden_layers"]
    nextn_params = layer_names("model.decoder.", moe=True) | {f"model.{x}" for x in NEXTN_ONLY}
    assert {sglang_nextn_name(x, n) for x in header} - {None} == nextn_params
    draft_header = e2e.read_safetensors_header(draft / "model.safetensors")
    draft_header.pop("__metadata__")
    assert {sglang_nextn_name(x, draft_config["num_hidden_layers"]) for x in draft_header} == nextn_params
    assert info["parameters"] == sum(math.prod(h["shape"]) for h in header.values())
    assert info["draft_parameters"] == sum(math.prod(h["shape"]) for h in draft_header.values())

    # the draft holds the target's NextN tensors, byte for byte; weights are random, norms one
    def raw(path: Path, hdr: dict, name: str) -> bytes:
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            begin, end = hdr[name]["data_offsets"]
            f.seek(start + begin)
            return f.read(end - begin)

    for old in ("model.layers.2.eh_proj.weight", "model.layers.2.mlp.experts.3.up_proj.weight"):
        new = old.replace("model.layers.2.", "model.layers.0.")
        assert raw(target / "model.safetensors", header, old) == raw(
            draft / "model.safetensors", draft_header, new
        )

    import torch

    norm = raw(target / "model.safetensors", header, "model.layers.2.enorm.weight")
    assert torch.frombuffer(bytearray(norm), dtype=torch.bfloat16).eq(1).all()
    w = torch.frombuffer(
        bytearray(raw(target / "model.safetensors", header, "lm_head.weight")), dtype=torch.bfloat16
    )
    assert abs(w.float().std().item() - 0.05) < 0.005
    try:  # the reference reader agrees, where it is installed
        from safetensors import safe_open
    except ImportError:
        return
    with safe_open(str(draft / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(draft_header)
        assert torch.equal(
            f.get_tensor("model.layers.0.enorm.weight"), torch.ones(hidden, dtype=torch.bfloat16)
        )


def test_mtp_writer_dummy_and_config_parse(e2e, tmp_path):
    info = e2e.write_mtp_model(tmp_path / "t", tmp_path / "d", "dummy", 16, 0.05, seed=0)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", "generation_config.json"]
    assert "parameters" not in info
    transformers = pytest.importorskip("transformers", reason="transformers absent: config parse not checked")
    for path, arch in (
        (tmp_path / "t", "DeepseekV3ForCausalLM"),
        (tmp_path / "d", "DeepseekV3ForCausalLMNextN"),
    ):
        config = transformers.AutoConfig.from_pretrained(path)
        assert type(config).__name__ == "DeepseekV3Config" and config.architectures == [arch]
        assert config.q_lora_rank is None and config.num_nextn_predict_layers == 1


# ---- graph breaks and acceptance length --------------------------------------------------------------------
GRAPH_BREAK_LOG = """\
[2026-01-01 10:00:00] Capture cuda graph begin. This can take up to several minutes.
V0101 10:00:01.000 4242 torch/_dynamo/symbolic_convert.py:5118] [0/0] [__graph_breaks] Graph break in user \
code at /venv/sglang/srt/layers/logits_processor.py:310
V0101 10:00:01.000 4242 torch/_dynamo/symbolic_convert.py:5118] [0/0] [__graph_breaks] Graph Break Reason: \
Unsupported Tensor.item() call with capture_scalar_outputs=False
V0101 10:00:01.000 4242 torch/_dynamo/symbolic_convert.py:5118] [0/0] [__graph_breaks] User code traceback:
  File "/venv/sglang/srt/layers/logits_processor.py", line 310, in forward
V0101 10:00:02.000 4242 torch/_dynamo/symbolic_convert.py:5132] [1/0] [__graph_breaks] Graph break (user \
stack suppressed due to duplicate graph break) in user code at /venv/sglang/srt/layers/logits_processor.py:310
Graph Break Reason: Unsupported Tensor.item() call with capture_scalar_outputs=False
[2026-01-01 10:00:09] Capture cuda graph end. Time elapsed: 8.00 s.
"""
ATTENTION_BREAK = """\
V0101 10:00:03.000 4242 torch/_dynamo/symbolic_convert.py:5118] [2/0] [__graph_breaks] Graph break in user \
code at /venv/flashmla_ops/integration/sglang_backend.py:321
Graph Break Reason: Data-dependent branching
V0101 10:00:04.000 4242 torch/_dynamo/convert_frame.py:1] WON'T CONVERT forward_decode \
/venv/sglang/srt/layers/attention/flashmla_backend.py line 420
"""


def test_graph_break_counter(e2e):
    clean = e2e.count_graph_breaks("[2026-01-01] Capture cuda graph end.\nThe server is fired up and ready\n")
    assert clean["total"] == 0 and clean["attention"] == 0 and clean["wont_convert"] == []
    elsewhere = e2e.count_graph_breaks(GRAPH_BREAK_LOG)
    assert elsewhere["total"] == 2 and elsewhere["unique_locations"] == 1 and elsewhere["attention"] == 0
    assert elsewhere["locations"] == {"/venv/sglang/srt/layers/logits_processor.py:310": 2}
    assert elsewhere["reasons"] == ["Unsupported Tensor.item() call with capture_scalar_outputs=False"]
    attention = e2e.count_graph_breaks(GRAPH_BREAK_LOG + ATTENTION_BREAK)
    assert attention["total"] == 3 and attention["attention"] == 2  # the break and the frame not converted
    assert attention["wont_convert"] == [
        {
            "function": "forward_decode",
            "location": "/venv/sglang/srt/layers/attention/flashmla_backend.py:420",
        }
    ]
    assert attention["attention_details"][0]["reason"] == "Data-dependent branching"


def test_acceptance_length(e2e):
    # sglang 0.5.23 meta_info (TokenizerManager._calculate_spec_decoding_metrics); older releases report
    # spec_verify_ct and completion_tokens only
    metas = [
        {"completion_tokens": 48, "spec_verify_ct": 24, "spec_accept_length": 2.0, "spec_accept_rate": 1 / 3},
        {"completion_tokens": 48, "spec_verify_ct": 40},
        {"completion_tokens": 1, "spec_verify_ct": 0},  # finished at prefill: no verify step
    ]
    got = e2e.acceptance_length(metas)
    assert got["measured"] and got["requests"] == 3 and got["requests_with_verify"] == 2
    assert got["completion_tokens"] == 96 and got["verify_steps"] == 64 and got["accept_length"] == 1.5
    assert got["mean_request_accept_length"] == pytest.approx((2.0 + 1.2) / 2)
    assert got["mean_accept_rate"] == pytest.approx(1 / 3)
    assert e2e.acceptance_length([{"completion_tokens": 48}]) == {"measured": False, "requests": 1}
    # generate_with_logprobs keeps exactly these fields of meta_info
    assert set(e2e.SPEC_META_FIELDS) == {
        "completion_tokens",
        "spec_verify_ct",
        "spec_accept_length",
        "spec_accept_rate",
    }


# ---- per-configuration JSON --------------------------------------------------------------------------------
def fake_results(e2e, args, graph_breaks: int = 0, accept: bool = True) -> dict:
    def run(key, mode, backend, **extra):
        return {"key": key, "tp": 1, "mode": mode, "backend": backend, "ok": True} | extra

    def comparison(key, backend, reference, passed=True):
        return {
            "key": key,
            "backend": backend,
            "reference": reference,
            "passed": passed,
            "max_abs_diff": 0.05,
        }

    acceptance = {"measured": accept, "accept_length": 1.02} if accept else {"measured": False}
    breaks = e2e.count_graph_breaks(ATTENTION_BREAK if graph_breaks else "")
    return {
        "environment": {"sglang": "0.5.17"},
        "models": {"default": {"path": "/m/v2"}, "mtp": {"path": "/m/v3", "draft_path": "/m/nextn"}},
        "settings": {"atol": 0.1},
        "runs": [
            run("tp1-cuda_graph", "cuda_graph", "flashmla_ops"),
            run("tp1-cuda_graph", "cuda_graph", "flashmla"),
            run("tp1-mtp", "mtp", "flashmla_ops", acceptance=acceptance),
            run("tp1-mtp", "mtp", "flashmla", acceptance={"measured": True, "accept_length": 1.0}),
            run("tp1-torch_compile", "torch_compile", "flashmla_ops+torch_compile", graph_breaks=breaks),
            run("tp1-torch_compile", "torch_compile", "flashmla_ops", reused_from="tp1-cuda_graph"),
        ],
        "comparisons": [
            comparison("tp1-cuda_graph", "flashmla_ops", "flashmla"),
            comparison("tp1-mtp", "flashmla_ops", "flashmla"),
            comparison("tp1-torch_compile", "flashmla_ops+torch_compile", "flashmla_ops"),
        ],
        "noise_floor": [{"backend": "flashmla", "tp": 1, "max_abs_diff": 0.04}],
    }


def test_configuration_json(e2e, tmp_path):
    args = e2e.parse_args(["--modes", "cuda_graph,mtp,torch_compile"])
    results = fake_results(e2e, args)
    written = {}
    for mode in args.modes:
        data = e2e.configuration_result(results, 1, mode, args)
        written[mode] = e2e.write_configuration_json(tmp_path / "out", data)
    assert {m: p.name for m, p in written.items()} == {
        "cuda_graph": "cuda_graph.json",
        "mtp": "mtp.json",
        "torch_compile": "torch_compile.json",
    }
    assert e2e.config_file_name("mtp", 2) == "mtp_tp2.json"
    cuda_graph, mtp, compiled = (json.loads(written[m].read_text()) for m in args.modes)
    for data in (cuda_graph, mtp, compiled):
        assert data["passed"] is True and all(data["checks"].values()) and "partial" not in data
        assert len(data["runs"]) == 2 and len(data["comparisons"]) == 1
    assert cuda_graph["noise_floor"] == results["noise_floor"] and cuda_graph["model"] == {"path": "/m/v2"}
    assert mtp["model"]["draft_path"] == "/m/nextn" and mtp["reference"] == "flashmla"
    assert mtp["acceptance"]["flashmla_ops"]["accept_length"] == 1.02
    assert mtp["accept_length_diff"] == pytest.approx(0.02)
    assert compiled["reference"] == "flashmla_ops" and compiled["graph_breaks"]["total"] == 0
    assert "noise_floor" not in mtp and "graph_breaks" not in mtp

    partial = e2e.write_configuration_json(
        tmp_path / "p", e2e.configuration_result(results, 1, "mtp", args), True
    )
    assert json.loads(partial.read_text())["partial"] is True

    # what fails a configuration
    failing = e2e.configuration_result(fake_results(e2e, args, graph_breaks=1), 1, "torch_compile", args)
    assert not failing["passed"] and failing["checks"]["no_attention_graph_breaks"] is False
    failing = e2e.configuration_result(fake_results(e2e, args, accept=False), 1, "mtp", args)
    assert not failing["passed"] and failing["checks"]["speculative_decoding_ran"] is False
    results["comparisons"][1]["passed"] = False
    assert e2e.configuration_result(results, 1, "mtp", args)["checks"]["comparisons_passed"] is False
    results["runs"].pop(0)
    assert e2e.configuration_result(results, 1, "cuda_graph", args)["checks"]["all_servers_ran"] is False


def test_comparisons_use_each_configurations_reference(e2e):
    args = e2e.parse_args(["--modes", "mtp,torch_compile"])

    def out(lp):
        return [
            {"output_ids": [5, 6], "token_logprobs": [lp, -1.0], "top_logprobs": [{"5": lp}, {"6": -1.0}]}
        ]

    outputs = {
        (1, "mtp", "flashmla"): out(-0.50),
        (1, "mtp", "flashmla_ops"): out(-0.52),
        (1, "torch_compile", "flashmla_ops"): out(-0.50),
        (1, "torch_compile", "flashmla_ops+torch_compile"): out(-0.90),
    }
    results = {"comparisons": [], "noise_floor": []}
    e2e.add_comparisons(results, outputs, args)
    by_key = {c["key"]: c for c in results["comparisons"]}
    assert set(by_key) == {"tp1-mtp", "tp1-torch_compile"}
    assert by_key["tp1-mtp"]["reference"] == "flashmla" and by_key["tp1-mtp"]["passed"]
    assert by_key["tp1-torch_compile"]["backend"] == "flashmla_ops+torch_compile"
    assert by_key["tp1-torch_compile"]["reference"] == "flashmla_ops"
    assert not by_key["tp1-torch_compile"]["passed"]  # 0.4 > atol
    e2e.add_comparisons(results, outputs, args)  # idempotent
    assert len(results["comparisons"]) == 2


def test_dry_run_fp8_configuration(e2e, capsys, tmp_path):
    servers = dry_run(e2e, capsys, tmp_path, "--modes", "cuda_graph,fp8")
    assert list(servers) == [
        ("tp1-cuda_graph", "flashmla_ops"),
        ("tp1-cuda_graph", "flashmla"),
        ("tp1-fp8", "flashmla_ops+fp8"),
        ("tp1-fp8", "flashmla+fp8"),
        ("tp1-fp8", "flashmla_ops"),
    ]
    for (_key, name), (_, cmd) in servers.items():
        assert flag(cmd, "--attention-backend") == name.split("+")[0]
        assert (flag(cmd, "--kv-cache-dtype") == "fp8_e4m3") == name.endswith("+fp8")
        assert "--disable-cuda-graph" not in cmd
    # the fp8 configuration's bf16 server is the cuda_graph server (main() reuses its results)
    assert servers[("tp1-fp8", "flashmla_ops")][1] == servers[("tp1-cuda_graph", "flashmla_ops")][1]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--modes", "fp8", "--backends", "flashmla", "--reference", "flashmla"])


def test_fp8_comparisons_use_the_fp8_reference_and_tolerances(e2e):
    args = e2e.parse_args(["--modes", "fp8"])
    assert e2e.mode_reference("fp8", args) == "flashmla_ops+fp8"
    assert e2e.mode_tolerance("fp8", args) == (0.5, 0.08) and e2e.mode_tolerance("cuda_graph", args) == (
        0.1,
        0.02,
    )

    def out(lp):
        return [
            {"output_ids": [5, 6], "token_logprobs": [lp, -1.0], "top_logprobs": [{"5": lp}, {"6": -1.0}]}
        ]

    outputs = {
        (1, "fp8", "flashmla_ops+fp8"): out(-0.50),
        (1, "fp8", "flashmla+fp8"): out(-0.64),  # 0.14 off: within the FP8 tolerance, not the bf16 one
        (1, "fp8", "flashmla_ops"): out(-1.50),  # 1.0 off: a failure
    }
    results = {"comparisons": [], "noise_floor": []}
    e2e.add_comparisons(results, outputs, args)
    by_backend = {c["backend"]: c for c in results["comparisons"]}
    assert set(by_backend) == {"flashmla+fp8", "flashmla_ops"}
    assert all(c["reference"] == "flashmla_ops+fp8" for c in results["comparisons"])
    assert by_backend["flashmla+fp8"]["passed"] and not by_backend["flashmla_ops"]["passed"]


# ---- deterministic: one prompt alone and inside batches ---------------------------------------------------
def test_dry_run_deterministic_configuration(e2e, capsys, tmp_path):
    servers = dry_run(e2e, capsys, tmp_path, "--modes", "cuda_graph,deterministic", "--deterministic-control")
    assert list(servers) == [
        ("tp1-cuda_graph", "flashmla_ops"),
        ("tp1-cuda_graph", "flashmla"),
        ("tp1-deterministic", "flashmla_ops+deterministic"),
        ("tp1-deterministic", "flashmla_ops"),
    ]
    _, cmd = servers[("tp1-deterministic", "flashmla_ops+deterministic")]
    assert "--enable-deterministic-inference" in cmd and flag(cmd, "--attention-backend") == "flashmla_ops"
    assert "--disable-cuda-graph" not in cmd and flag(cmd, "--cuda-graph-max-bs-decode") == "32"
    assert flag(cmd, "--page-size") == "64" and "--disable-radix-cache" in cmd
    # the control is the plain CUDA-graph server; no other server gets the flag
    assert servers[("tp1-deterministic", "flashmla_ops")][1] == servers[("tp1-cuda_graph", "flashmla_ops")][1]
    others = [c for k, (_, c) in servers.items() if k[1] != "flashmla_ops+deterministic"]
    assert not any("--enable-deterministic-inference" in c for c in others)
    # without --deterministic-control: the deterministic server alone
    servers = dry_run(e2e, capsys, tmp_path, "--modes", "deterministic")
    assert list(servers) == [("tp1-deterministic", "flashmla_ops+deterministic")]


def test_deterministic_batches(e2e):
    args = e2e.parse_args(["--modes", "deterministic"])
    assert args.deterministic_prompt_len == 300 and len(args.deterministic_other_lens) == 15
    target, others = e2e.deterministic_prompts(args, 1024)
    assert len(target) == 300 and [len(o) for o in others] == args.deterministic_other_lens
    assert target not in others
    batches = e2e.deterministic_batches(target, others)
    assert len(batches) == e2e.DETERMINISTIC_BATCHES == 2
    assert [len(b["input_ids"]) for b in batches] == [16, 8]  # two batch sizes: two captured graphs
    assert [b["target_index"] for b in batches] == [7, 7]
    for batch in batches:
        assert batch["input_ids"][batch["target_index"]] is target
    assert batches[0]["input_ids"] == others[:7] + [target] + others[7:]
    assert batches[1]["input_ids"] == others[1::2] + [target]
    # every batch runs as one CUDA graph: the graphs are captured up to the largest batch of any configuration
    assert e2e.max_batch(e2e.parse_args(["--deterministic-other-lens", ",".join(["5"] * 40)])) == 41
    for bad in (["--deterministic-other-lens", "5"], ["--deterministic-prompt-len", "0"]):
        with pytest.raises(SystemExit):
            e2e.parse_args(bad)


def result(lp: float, ids=(5, 6), top=None) -> dict:
    """One request's generate_with_logprobs result: two positions."""
    top = top if top is not None else [{"5": lp, "9": lp - 1.0}, {"6": -1.0, "3": -2.5}]
    return {"output_ids": list(ids), "token_logprobs": [lp, -1.0], "top_logprobs": top, "meta": {}}


def test_compare_identical_is_bitwise(e2e):
    same = e2e.compare_identical([result(-0.5)], [result(-0.5)])
    assert same["passed"] and same["identical"] and same["identical_positions"] == 2
    assert same["first_difference"] is None and same["max_abs_diff"] == 0.0

    ulp = math.nextafter(-0.5, 0.0)  # one float64 ulp: a tolerance-based comparison would pass it
    off = e2e.compare_identical([result(-0.5)], [result(ulp)])
    assert not off["passed"] and off["identical_positions"] == 0
    assert off["first_difference"]["position"] == 0
    assert off["first_difference"]["fields"] == ["token_logprob", "top_logprobs"]
    assert 0 < off["max_abs_diff"] < 1e-15

    later = [{"5": -0.5, "9": -1.5}, {"6": -1.0, "4": -2.5}]  # another token in the second top-k
    swapped = e2e.compare_identical([result(-0.5)], [result(-0.5, top=later)])
    assert not swapped["passed"] and swapped["identical_positions"] == 1
    assert swapped["first_difference"] == {
        "request": 0,
        "position": 1,
        "fields": ["top_logprobs"],
        "reference": {"top_logprobs": {"6": -1.0, "3": -2.5}},
        "other": {"top_logprobs": {"6": -1.0, "4": -2.5}},
    }
    diverged = e2e.compare_identical([result(-0.5)], [result(-0.5, ids=(5, 7))])
    assert diverged["first_difference"]["fields"] == ["output_id"]
    shorter = dict(
        result(-0.5), output_ids=[5], token_logprobs=[-0.5], top_logprobs=[result(-0.5)["top_logprobs"][0]]
    )
    assert e2e.compare_identical([result(-0.5)], [shorter])["first_difference"]["position"] == 1
    nan = e2e.compare_identical([result(math.nan)], [result(math.nan)])  # NaN is never "identical"
    assert not nan["passed"] and nan["first_difference"]["position"] == 0
    assert not e2e.compare_identical([], [])["passed"]  # nothing compared


def fake_generate(depends_on_batch: bool):
    """A stand-in for the server's /generate: greedy outputs derived from each prompt (and, to emulate a
    batch-dependent decode, from the batch size)."""

    def http(url, payload=None, timeout=600.0):
        assert url.endswith("/generate") and payload["return_logprob"]
        items = []
        for ids in payload["input_ids"]:
            lp = -1.0 / (1 + len(ids)) - (1e-9 * len(payload["input_ids"]) if depends_on_batch else 0.0)
            n = payload["sampling_params"]["max_new_tokens"]
            items.append(
                {
                    "meta_info": {
                        "output_token_logprobs": [[lp, ids[0], None]] * n,
                        "output_top_logprobs": [[[lp, ids[0], None], [lp - 1, 3, None]]] * n,
                    }
                }
            )
        return items

    return http


@pytest.mark.parametrize("depends_on_batch", [False, True])
def test_deterministic_run_compare_and_configuration_json(
    e2e, monkeypatch, capsys, tmp_path, depends_on_batch
):
    args = e2e.parse_args(["--modes", "deterministic", "--deterministic-control", "--new-tokens", "3"])
    monkeypatch.setattr(e2e, "http", fake_generate(depends_on_batch))
    name, control = e2e.DETERMINISTIC, e2e.BACKEND_UNDER_TEST
    outputs, runs = {}, []
    for server in (name, control):
        record, by_label = e2e.run_deterministic("http://x", args, 1024, server)
        assert list(by_label) == [server, f"{server}@batch1", f"{server}@batch2"]
        assert [b["batch_size"] for b in record["batches"]] == [16, 8] and record["target_len"] == 300
        assert all(len(got) == 1 and len(got[0]["output_ids"]) == 3 for got in by_label.values())
        outputs |= {(1, "deterministic", label): got for label, got in by_label.items()}
        runs.append(
            {"key": "tp1-deterministic", "tp": 1, "mode": "deterministic", "backend": server, "ok": True}
            | {"determinism": record, "batch_invariant_schedule_in_log": server == name}
        )
    results = {
        "environment": {},
        "models": {"default": {"path": "/m/v2"}},
        "settings": {},
        "runs": runs,
        "comparisons": [],
        "noise_floor": [],
    }
    e2e.add_comparisons(results, outputs, args)
    e2e.add_comparisons(results, outputs, args)  # idempotent
    comparisons = {c["backend"]: c for c in results["comparisons"]}
    assert set(comparisons) == {f"{s}@batch{i}" for s in (name, control) for i in (1, 2)}
    for label, c in comparisons.items():
        assert c["reference"] == label.split("@")[0] and c["control"] == (c["reference"] == control)
        assert c["passed"] is (not depends_on_batch)

    data = e2e.configuration_result(results, 1, "deterministic", args)
    path = e2e.write_configuration_json(tmp_path, data)
    assert path.name == "deterministic.json" and json.loads(path.read_text())["passed"] is data["passed"]
    assert data["reference"] == name and data["determinism"]["batches"][0]["target_index"] == 7
    assert len(data["comparisons"]) == 4 and len(data["control"]) == 2
    assert data["checks"]["batch_invariant_schedule_in_log"] and data["checks"]["all_servers_ran"]
    assert data["checks"]["all_compared"]
    assert data["passed"] is (not depends_on_batch)
    verdict = e2e.deterministic_verdict(results, runs[0])
    assert verdict == ("alone vs batches: identical 0/2 FAIL" if depends_on_batch else
                       "alone vs batches: identical 2/2 PASS")  # fmt: skip
    assert e2e.deterministic_verdict(results, runs[1]).startswith("control (no flag)")
    for run in runs:
        run["throughput"] = {"decode_tokens_per_s": 1000.0, "ms_per_decode_step": 1.0}
    results |= {
        "configurations": {"tp1-deterministic": data},
        "passed": data["passed"],
        "out": "o",
        "out_dir": "d",
    }
    e2e.print_table(results)
    assert verdict in capsys.readouterr().out

    # the control decides nothing; the schedule must show in the server log
    for c in results["comparisons"]:
        c["passed"] = c["identical"] = not c["control"]
    assert e2e.configuration_result(results, 1, "deterministic", args)["passed"]
    runs[0]["batch_invariant_schedule_in_log"] = False
    failing = e2e.configuration_result(results, 1, "deterministic", args)
    assert not failing["passed"] and not failing["checks"]["batch_invariant_schedule_in_log"]


def test_cuda_graph_batch_sizes(e2e, capsys, tmp_path):
    """``--cuda-graph-bs`` sets every graphed server's capture list (sorted, deduplicated) and the compiled
    server's --torch-compile-max-bs; eager servers get neither."""
    sent = ["--batch", "8", "--prompt-lens", "1,2,3,4", "--deterministic-other-lens", "1,2"]  # largest: 8
    servers = dry_run(
        e2e, capsys, tmp_path, "--modes", "eager,mtp,torch_compile", "--cuda-graph-bs", "8", "4", "8", *sent
    )
    for (key, _), (_, cmd) in servers.items():
        graphed = key != "tp1-eager"
        assert "--cuda-graph-max-bs-decode" not in cmd
        if graphed:
            i = cmd.index("--cuda-graph-bs-decode")
            assert cmd[i + 1 : i + 3] == ["4", "8"] and not any(a.isdigit() for a in cmd[i + 3 : i + 4])
        else:
            assert "--cuda-graph-bs-decode" not in cmd
    compiled = servers[("tp1-torch_compile", "flashmla_ops+torch_compile")][1]
    assert flag(compiled, "--torch-compile-max-bs") == "8"
    assert e2e.graph_batch_sizes(e2e.parse_args([]), "cuda_graph") == []
    assert e2e.graph_batch_sizes(
        e2e.parse_args(["--batch", "4", "--prompt-lens", "1,2"]), "torch_compile"
    ) == [
        2,
        4,
    ]
    for bad in (
        ["--cuda-graph-bs", "0", "32"],
        ["--cuda-graph-bs", "4"],  # the batches of 16 and 32 would run without a graph
        ["--batch", "0"],
        ["--prompt-lens", ""],
        ["--prompt-lens", "5,0"],
    ):
        with pytest.raises(SystemExit):
            e2e.parse_args(bad)
