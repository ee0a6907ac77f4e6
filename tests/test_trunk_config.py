"""Config checks fail fast (before any process group), preset sizes, and the FLOP/MFU count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.distributed as dist

from melama_mcore.cli import main as melama
from melama_mcore.components.metrics import MetricsLogger, StepStats
from melama_mcore.config.job_config import load_config
from melama_mcore.errors import ConfigError
from melama_mcore.models.llama.config_registry import PRESETS, flops_per_token, padded_vocab_size, parameter_count

BASE = ["model.preset=nano", "model.vocab_size=512", "training.seq_length=32", "training.device=cpu"]

BAD_CONFIGS = [
    # (world size, overrides, words the message must contain)
    (2, ["parallel.tensor_parallel=8"], ["4 attention heads are not divisible by tensor_parallel=8"]),
    (3, ["parallel.pipeline_parallel=3"], ["4 layers cannot be split", "= 3"]),
    (2, ["training.global_batch_size=6", "training.micro_batch_size=2"],
     ["global_batch_size 6 is not divisible by micro_batch_size x data_parallel", "multiple of 4"]),
    (2, ["parallel.tensor_parallel=4"], ["world size 2 is not divisible by", "= 4"]),
    (1, ["parallel.sequence_parallel=true"], ["sequence_parallel needs tensor_parallel > 1"]),
    (1, ["training.fp8=hybrid", "model.backend=native"],
     ["training.fp8 needs Transformer Engine", "FP8-capable GPU", "model.backend=native would train in bf16"]),
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2", "training.global_batch_size=3",
         "training.micro_batch_size=1"], ["interleaved schedule needs the number of micro-batches"]),
    (1, ["parallel.use_distributed_optimizer=false", "parallel.overlap_param_gather=true"],
     ["overlap_param_gather needs parallel.use_distributed_optimizer=true"]),
    (2, ["model.backend=local", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
     ["model.backend=local does not support sequence parallelism"]),
    (1, ["checkpoint.optimizer_format=model_space"], ["checkpoint.optimizer_format must be"]),
    (1, ["model.preset=llama3"], ["model.preset 'llama3' is unknown"]),
    (1, ["training.learning_rate=1"], ["unknown config key training.learning_rate"]),
    (1, ["training.train_iters=many"], ["training.train_iters: expected int"]),
    # Values that reached a ZeroDivisionError, an endless loop or an assertion inside megatron or the
    # trainer (issue 11 and issue 14 item 12), each refused with what to change.
    (2, ["parallel.tensor_parallel=0"], ["parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1"]),
    (2, ["training.micro_batch_size=0"], ["batch sizes must be >= 1"]),
    (1, ["model.num_query_groups=0", "model.num_layers=0", "model.make_vocab_size_divisible_by=0"],
     ["model.num_query_groups must be >= 1, got 0", "model.num_layers must be >= 1, got 0",
      "model.make_vocab_size_divisible_by must be >= 1, got 0"]),
    (1, ["model.hidden_size=60", "model.num_attention_heads=4", "model.num_query_groups=2"],
     ["hidden_size / num_attention_heads = 15 is odd", "even quotient"]),
    (1, ["model.rope_base=0", "model.init_method_std=-0.02"],
     ["model.rope_base (0.0) must be > 0", "model.init_method_std must be >= 0, got -0.02"]),
    (1, ["training.seq_length=0"], ["training.seq_length must be >= 1, got 0"]),
    (1, ["training.seq_length=256"], ["seq_length 256 exceeds the preset's 128 positions"]),
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4"],
     ["4 layers cannot be split into pipeline_parallel x virtual_pipeline = 8"]),
    (1, ["checkpoint.save_interval=0", "logging.log_interval=0"],
     ["checkpoint.save_interval must be >= 1 step, got 0", "above training.train_iters saves only at the end",
      "logging.log_interval must be >= 1 step, got 0"]),
    (1, ["logging.eval_iters=-1", "logging.eval_interval=-5", "logging.peak_tflops=0"],
     ["logging.eval_iters must be >= 0 (0: no validation), got -1", "logging.eval_interval must be >= 0",
      "logging.peak_tflops must be > 0"]),
    (1, ["checkpoint.keep_last=0", "checkpoint.preemption_grace_s=0"],
     ["checkpoint.keep_last must be >= 1, or null to keep every checkpoint; got 0",
      "checkpoint.preemption_grace_s must be > 0 seconds, or null"]),
    (1, ["training.train_iters=10", "training.stop_after_step=11"],
     ["training.stop_after_step=11 is never reached: use a step from 1 to training.train_iters (10)"]),
    (1, ["training.stop_after_step=0"], ["training.stop_after_step=0 is never reached"]),
    (1, ["training.seed=-1", "training.max_consecutive_skips=0"],
     ["training.seed must be in [0, 2**32), got -1", "training.max_consecutive_skips must be >= 1"]),
    (1, ["training.recompute=full", "training.recompute_num_layers=3"],
     ["training.recompute_num_layers=3 must divide the 4 layers of each pipeline stage"]),
    (2, ["parallel.pipeline_parallel=2", "training.recompute=full", "training.recompute_num_layers=0"],
     ["training.recompute_num_layers=0 must divide the 2 layers of each pipeline stage"]),
    (1, ["training.recompute=selective", "model.backend=local"],
     ["training.recompute with model.backend=local does not run on CPU", "use model.backend=native"]),
    (1, ["training.train_iters=10", "optimizer.lr_warmup_iters=10"],
     ["the learning-rate warm-up (10 steps) must end before training.train_iters (10)"]),
    (1, ["training.train_iters=3", "optimizer.warmup_fraction=0.9"],
     ["the learning-rate warm-up (3 steps) must end before training.train_iters (3)"]),
    (1, ["optimizer.lr_warmup_iters=-1"], ["optimizer.lr_warmup_iters must be >= 0 or null"]),
    (1, ["optimizer.beta1=1.0", "optimizer.eps=-1e-8", "optimizer.clip_grad=-1"],
     ["optimizer.beta1 (1.0) and optimizer.beta2 (0.95) must be in [0, 1)",
      "optimizer.eps (-1e-08), weight_decay (1e-05) and clip_grad (-1.0; 0: no clipping) must be >= 0"]),
    (1, ["output_dir=", "checkpoint.resume="],
     ["output_dir has no value: give it one", "checkpoint.resume has no value"]),
]


@pytest.mark.parametrize("world, overrides, words", BAD_CONFIGS)
def test_config_error_message_exit_code_and_no_process_group(world, overrides, words, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = melama(["train", *BASE, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in err
    assert not dist.is_initialized()


def test_all_problems_reported_at_once(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert melama(["train", *BASE, "parallel.tensor_parallel=8", "training.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "tensor_parallel=8" in err and "precision must be" in err


def test_missing_config_file_is_a_user_error(capsys, tmp_path):
    assert melama(["train", "--config", "no/such/recipe.yaml"]) == 2
    assert "config file not found: no/such/recipe.yaml" in capsys.readouterr().err
    assert melama(["plan", "--config", str(tmp_path), "--gpu", "h100-80gb", "--gpus", "8"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is a folder, not a config file: give a recipe YAML (see "
                                       "examples/configs/)\n")


def test_recipes_parse_and_pass_their_layout_checks():
    """Every shipped recipe is valid for its intended world size (its own comment says which)."""
    from melama_mcore.config.validate import Environment, resolve, validate
    from melama_mcore.models.llama.config_registry import resolve_arch

    gpus = {"llama2_70b_me_llama": 160, "llama2_13b": 32, "llama2_7b": 8,
            "llama2_13b_me_llama_chat": 8, "llama2_70b_me_llama_chat": 8}
    for name, world in gpus.items():
        cfg = load_config(f"examples/configs/{name}.yaml")
        env = Environment(world_size=world, cuda=True, transformer_engine=True, fp8_capable=True)
        validate(resolve(cfg, env), resolve_arch(cfg.model, 32000), env)
    cfg = load_config("examples/configs/tiny_cpu.yaml")
    env = Environment(world_size=2, cuda=False, transformer_engine=False, fp8_capable=False)
    validate(resolve(cfg, env), resolve_arch(cfg.model, 2000), env)
    # On CPU: fp32 (faster there), and the production path's distributed optimizer and overlap.
    assert cfg.training.precision == "fp32"
    assert cfg.parallel.use_distributed_optimizer and cfg.parallel.overlap_grad_reduce and cfg.parallel.overlap_param_gather


def test_me_llama_defaults():
    o = load_config(None).optimizer
    assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.clip_grad, o.warmup_fraction, o.lr_decay_style) == \
        (8e-6, 0.9, 0.95, 1e-5, 1.0, 0.05, "cosine")


def test_override_types():
    cfg = load_config(None, ["optimizer.lr=3e-4", "parallel.virtual_pipeline=null", "training.train_iters=7"])
    assert cfg.optimizer.lr == 3e-4 and cfg.parallel.virtual_pipeline is None and cfg.training.train_iters == 7
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["optimizer.lr"])


@pytest.mark.parametrize("preset, billions", [("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98)])
def test_preset_parameter_counts(preset, billions):
    assert round(parameter_count(PRESETS[preset]) / 1e9, 2) == billions


def test_parameter_count_equals_the_built_megatron_model():
    """The analytic count against a real GPTModel (built in a subprocess: CPU mode patches torch.cuda)."""
    script = (
        "from melama_mcore.config.job_config import load_config\n"
        "from melama_mcore.distributed import parallel\n"
        "from melama_mcore.models.llama.model import build_model_chunks\n"
        "from melama_mcore.startup import start\n"
        "cfg = load_config(None, ['model.preset=tiny', 'model.vocab_size=1024', 'training.seq_length=64',"
        " 'model.make_vocab_size_divisible_by=1', 'training.device=cpu'])\n"
        "runtime = start(cfg)\n"
        "model = build_model_chunks(cfg, runtime.arch, 'native')[0]\n"
        "print(sum(p.numel() for p in model.parameters())); parallel.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    built = int(out.strip().splitlines()[-1])
    assert built == parameter_count(PRESETS["tiny"], vocab_size=1024)


def test_70b_flops_and_mfu_match_a_hand_derivation(tmp_path):
    """LLaMA-2 70B, seq 4096, by hand (Megatron's convention: x3 fwd+bwd, x2 per multiply-add,
    causal attention halved): per token and layer
      QKV    2*8192*(8192 + 2*1024)   = 167,772,160
      attn   2*2 * 8192*4096 / 2      = 67,108,864     (QK^T and AV, causal half)
      proj   2*8192*8192               = 134,217,728
      MLP    2*3*8192*28672            = 1,409,286,144
      layer total                      = 1,778,384,896;  x 80 layers = 142,270,791,680
    The output layer counts the padded vocabulary the model is built with (a multiple of
    make_vocab_size_divisible_by 128 x TP), as Megatron-LM's num_floating_point_operations does:
      TP 1 or 2: 32000 is already a multiple of 128 (256):
        logits 2*8192*32000 = 524,288,000; forward 142,795,079,680; x3 = 428,385,239,040 FLOPs/token
      TP 8 (the Me-LLaMA recipe): 32000 -> 32768 (32 x 1024):
        logits 2*8192*32768 = 536,870,912; forward 142,807,662,592; x3 = 428,422,987,776 FLOPs/token
    """
    h, f, s, layers, d_kv = 8192, 28672, 4096, 80, 8 * 128

    def by_hand(vocab: int) -> int:
        layer = 2 * h * (h + 2 * d_kv) + 2 * 2 * h * s // 2 + 2 * h * h + 2 * 3 * h * f
        return 3 * (layers * layer + 2 * h * vocab)

    assert by_hand(32000) == 428_385_239_040 and by_hand(32768) == 428_422_987_776
    arch = PRESETS["llama2-70b"]
    for tp, vocab in ((1, 32000), (2, 32000), (4, 32256), (8, 32768)):
        assert padded_vocab_size(arch.vocab_size, 128, tp) == vocab
        assert flops_per_token(arch, 4096, padded_vocab_size(arch.vocab_size, 128, tp)) == by_hand(vocab)
    recipe = load_config("examples/configs/llama2_70b_me_llama.yaml")
    assert (recipe.parallel.tensor_parallel, recipe.model.make_vocab_size_divisible_by) == (8, 128)
    per_token = flops_per_token(arch, 4096, 32768)
    # A step of 1000 x 4096 tokens in 60 s on 160 GPUs of 312 TFLOP/s peak:
    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, num_gpus=160,
                           flops_per_token=per_token, peak_tflops=312.0, train_iters=10)
    record = logger.log_step(StepStats(step=1, loss=2.0, lr=8e-6, grad_norm=1.0, step_time_s=60.0,
                                       tokens=1000 * 4096))
    logger.close()
    tflops = 1000 * 4096 / 60.0 * 428_422_987_776 / 160 / 1e12  # 182.8 TFLOP/s per GPU, MFU 58.6%
    assert record["tflops_per_gpu"] == pytest.approx(tflops)
    assert record["mfu"] == pytest.approx(tflops / 312.0)
    assert record["tokens_per_s_per_gpu"] == pytest.approx(1000 * 4096 / 60.0 / 160)
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert written["mfu"] == pytest.approx(record["mfu"])
