"""`cocomix plan`: its parameter counts are the real model's, its FLOPs are the matmuls torch counts in a real
training step and a real extraction batch, its label-store bytes and files are what storage_schemas
writes, and user mistakes exit 2 with one line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from typer.testing import CliRunner

from pipeline import cli_plan, plan
from pipeline.cli import CocomixGroup
from storage_schemas import LabelSpec, LabelStore
from trainer.config import TrainConfig, build_config
from trainer.model import GPT

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every op torch's flop counter knows (mm, addmm, bmm, ...), as they run. FlopCounterMode
    itself cannot wrap autograd.grad on a leaf (its module tracker), which the extraction kernel uses."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


def invoke(*args):
    """The plan command under a root built as pipeline/cli.py builds it (CocomixGroup: UserError -> exit 2)."""
    root = typer.Typer(cls=CocomixGroup, add_completion=False)
    root.callback()(lambda: None)
    root.add_typer(cli_plan.app)
    return CliRunner().invoke(root, ["plan", *map(str, args)])


@pytest.mark.parametrize("name", ["gpt2-69m", "gpt2-69m-ntp", "gpt2-386m", "gpt2-1.4b", "gpt2-1.4b-ntp", "demo"])
@pytest.mark.parametrize("changes", [{}, {"bias": False}, {"concept_mix": False}, {"mode": "pause"}, {"mode": "kd"}])
def test_parameter_counts_equal_the_real_model(name, changes):
    tc = build_config(name, None, {"vocab_size": 50257, "n_concepts": 32768, **changes})
    with torch.device("meta"):
        model = GPT(tc.model_config())
    p = plan.student_params(tc)
    assert p["non_embedding"] == model.num_params()
    assert p["total"] == model.num_params(non_embedding=False)


def test_training_flops_by_hand():
    """d 64, 2 blocks, T 16, V 100: P_blk = 12*64^2 + 13*64 = 49984, N = 100*64 + 2*49984 + 128 = 106496."""
    ntp = TrainConfig(mode="ntp", vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=64)
    f = plan.train_flops(ntp, 1000)
    assert f["n"] == 106496 and f["six_nd"] == 6 * 106496 * 1000
    assert f["total"] == (6 * 106496 + 12 * 2 * 64 * 16) * 1000
    # cocomix, C 256 before block 1, k_c 8: N = 106496 + 64 + (64*256 + 256) + (256*64 + 64) = 139648;
    # N' = N - C d + 1 doubled block = 139648 - 16384 + 49984; attention 12 d T (1 + 4*1); gather 6 k_c d
    coco = TrainConfig(mode="cocomix", vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=64,
                       n_concepts=256, insert_layer=1, k_concept=8)
    f = plan.train_flops(coco, 1000)
    assert f["n"] == 139648 and f["matmul_params"] == 173248
    assert f["total"] == (6 * 173248 + 12 * 64 * 16 * 5 + 6 * 8 * 64) * 1000


@pytest.mark.parametrize("changes", [{"mode": "ntp"}, {"mode": "kd"}, {"mode": "cocomix"}, {"mode": "pause"},
                                     {"mode": "cocomix", "concept_mix": False}, {"mode": "ntp", "bias": False}])
def test_training_flops_are_the_counted_matmuls_of_a_real_step(changes):
    """Under SDPA's math backend attention is plain bmm at the full context, the plan's convention; what is
    left is the vectors (biases, norms) the plan counts as matrices, as nanoGPT does: exactly for ntp."""
    tc = TrainConfig(vocab_size=300, block_size=32, n_layer=3, n_head=2, n_embd=64, n_concepts=512,
                     insert_layer=1, k_concept=8, **changes)
    torch.manual_seed(0)
    model = GPT(tc.model_config())
    idx = torch.randint(0, 300, (2, 32))
    labels = {"cocomix": dict(concept_ids=torch.randint(0, 512, (2, 32, 4))),
              "kd": dict(teacher_ids=torch.randint(0, 300, (2, 32, 4)), teacher_logprobs=torch.full((2, 32, 4), -2.0))}
    with MatmulFlops() as counted, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx, **labels.get(tc.mode, {})).loss.backward()
    predicted = plan.train_flops(tc, idx.numel())["total"]
    if tc.mode in ("ntp", "kd"):
        vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
        assert predicted - counted.total == 6 * vectors * idx.numel()
    assert counted.total < predicted < 1.02 * counted.total


def test_extraction_flops_are_the_counted_matmuls_of_the_kernel():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.attribution import attribute
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=2, vocab_size=500, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)).eval().requires_grad_(False)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=1024, k=8, normalize="layer_norm")).eval()
    x = torch.randint(0, 500, (2, 32))
    with MatmulFlops() as counted, sdpa_kernel(SDPBackend.MATH):
        attribute(teacher, sae, 1, "resid_post_mlp", x, k=4)
    shape = plan.model_shape(teacher, "tiny")
    assert (shape.n_layer, shape.d, shape.head_params) == (4, 64, 500 * 64)
    f = plan.extract_flops(shape, plan.SAEShape(1024, 64, 8, "tiny"), 1, 32, x.numel())
    assert counted.total < f["total"] < 1.02 * counted.total
    assert f["total"] == f["per_token"] * x.numel() and 1 < f["dense_over_kernel"] < 3


def _written_bytes_and_files(root: Path, latents: int, teacher_k: int | None) -> tuple[float, int, str]:
    """Write one full unit with storage_schemas; bytes per token of its chunk files, and its file count."""
    spec = LabelSpec(token_fingerprint="t", window=8, k=4, n_latents=latents, teacher_k=teacher_k, chunk_windows=2)
    store = LabelStore.create(root, spec, {"train": 16})
    rng = np.random.default_rng(0)
    arrays = {n: rng.integers(0, 2, (16, *shape)).astype(dt) for n, (dt, shape) in spec.arrays().items()}
    store.write_unit("train", 0, arrays, tokens=np.zeros(16), seconds=0.0)
    chunks = [f for n in arrays for f in (root / "train" / n / "c").rglob("*") if f.is_file()]
    records = list((root / "units").iterdir())
    return sum(f.stat().st_size for f in chunks) / 16, len(chunks) + len(records), spec.ids_dtype


@pytest.mark.parametrize("latents, teacher_k, ids", [(32768, None, "uint16"), (70000, None, "uint32"),
                                                     (32768, 32, "uint16")])
def test_label_store_bytes_and_files_are_what_storage_schemas_writes(tmp_path, latents, teacher_k, ids):
    written, files, dtype = _written_bytes_and_files(tmp_path / "labels", latents, teacher_k)
    p = plan.label_store(latents, 4, 8, 16, 2, teacher_k or 0, vocab=50257)
    assert dtype == p["ids_dtype"] == ids
    assert p["per_token"] == written == (4 * (2 if ids == "uint16" else 4) + 8 + 1 + 6 * (teacher_k or 0))
    assert p["files"] == files
    assert p["files_per_billion"] == math.ceil(1e9 / 16) * files and p["token_store_total"] == 2 * 16


def test_predicted_over_measured_is_about_one_for_a_bare_matmul():
    """The bench's ratio (plan FLOPs / measured matmul peak, over measured time) on a case whose FLOPs are
    exact: a batch of products of the size the peak was measured on."""
    from bench.rehearsal import _timed, matmul_peak

    cpu = torch.device("cpu")
    a, b = torch.randn(64, 256, 256), torch.randn(64, 256, 256)
    # peak and products measured in turns, best of each: a machine shared with other jobs slows both alike
    peaks, times = [], []
    for _ in range(5):
        peaks.append(matmul_peak(cpu, torch.float32, n=256, seconds=0.1))
        times.append(_timed(cpu, lambda: torch.bmm(a, b)))
    ratio = 2 * 64 * 256**3 / max(peaks) / min(times)
    assert 0.3 < ratio < 1.5, ratio  # at most a little above 1: the peak is the best block, this the best of 5
    assert plan.wall_seconds(2e15, 2, 1000.0, 0.5) == 2.0


def test_plan_json_at_the_paper_shapes():
    r = invoke("--preset", "gpt2-69m", "--devices", 8, "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    t = p["teacher"]
    assert (t["n_layer"], t["d"], t["vocab"], t["params"]) == (12, 768, 50257, 124439808)  # GPT-2 small
    assert p["sae"]["latents"] == 32768 and p["student"]["n_concepts"] == 32768 and p["tokens"] == 40000 * 512 * 1024
    assert p["label_store"]["per_token"] == 17 and p["label_store"]["ids_dtype"] == "uint16"
    assert p["time"]["train_s"] == pytest.approx(p["flops"]["train"]["total"] / (8 * 989e12 * 0.4))
    mem = p["memory"]["train"]
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k not in ("total", "attention_scores_if_unfused")))


def test_plan_reads_a_local_teacher_and_sae_and_prints_text(tmp_path):
    from transformers import AutoModelForCausalLM

    r = invoke("--preset", "demo", "--teacher", DEMO / "teacher", "--sae", DEMO / "sae", "--json")  # layer: the SAE's
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    real = AutoModelForCausalLM.from_pretrained(DEMO / "teacher")
    assert p["teacher"]["params"] == sum(q.numel() for q in real.parameters())
    assert p["sae"]["latents"] == p["student"]["n_concepts"] == 3072
    assert p["student"]["vocab_size"] == real.config.vocab_size and p["sae"]["layer"] == 1
    text = invoke("--preset", "gpt2-1.4b", "--tokens", "2e9", "--devices", 64).stdout
    for word in ("FLOPs", "memory per device", "label store", "wall time on 64 device(s)", "concept logits"):
        assert word in text


def test_user_mistakes_exit_2_with_one_line(tmp_path):
    cases = [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "gpt2-69m", "--devices", -1], "--devices must be at least 1"),
        (["--preset", "gpt2-69m", "--teacher", tmp_path / "missing"], "is neither a local folder nor a cached hub"),
        (["--preset", "gpt2-69m", "--mfu", 1.5], "--mfu must be in (0, 1]"),
        (["--preset", "gpt2-69m", "--sae", DEMO / "sae", "--sae-latents", 10], "not both"),
        (["--preset", "gpt2-69m", "--sae", DEMO / "sae"], "SAE d_in 192 does not match the teacher's hidden size 768"),
        (["--preset", "gpt2-69m", "--layer", 12], "layer 12 is out of range"),
        (["--preset", "gpt2-69m", "--set", "n_concepts=100"], "n_concepts 100 differs from the SAE's 32768"),
        (["--preset", "gpt2-69m", "--set", "mode=kd", "--teacher-topk", 0], "kd mode trains on the teacher's stored"),
        ([], "give --preset NAME or --config FILE"),
    ]
    for args, message in cases:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
